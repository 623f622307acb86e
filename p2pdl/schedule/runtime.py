"""Entry point of a training node: `run_job_node(JobNodeOptions)` for the leader and workers.

The CLI builds the options (`JobNodeOptions.from_cli`) and runs `uvloop.run(run_job_node(o))`.
On stdout a node prints one JSON line when it has joined
(`{"event": "ready", "rank": r, "address": "h:p"}`; the leader prints it as soon as it listens,
so that others can be pointed at it), JSON lines for membership epochs / recoveries / stalls
(leader), and one `{"event": "done", ...}` line with its summary at the end. Errors: one line
on stderr and a non-zero exit status (2 for configuration errors, 1 for runtime failures).

For tests and benchmarks without the CLI: `python -m p2pdl.schedule.runtime '<json>'` runs
one node with `JobNodeOptions.from_json`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from p2pdl.collectives.api import Collectives
from p2pdl.config import Limits, Timeouts, is_loopback
from p2pdl.errors import ConfigError, P2PDLError
from p2pdl.mesh import Listener, Mesh, dial
from p2pdl.rendezvous import TABLE_TAG, parse_table
from p2pdl.schedule.checkpoint import Snapshot, load_checkpoint, save_checkpoint
from p2pdl.schedule.group_size import GroupSizeController
from p2pdl.schedule.job import Job
from p2pdl.schedule.leader import Leader, LeaderSettings
from p2pdl.schedule.protocol import LinkChannel, LocalChannel, decode
from p2pdl.schedule.task import TaskContext, resolve_task, task_digest, task_spec
from p2pdl.schedule.worker import JobError, ModelState, Worker
from p2pdl.transport import Credentials, Link, dial_handshake

__all__ = ["JobNodeOptions", "main", "run_job_node"]

log = logging.getLogger("p2pdl.schedule.runtime")


@dataclass(frozen=True, slots=True, kw_only=True)
class JobNodeOptions:
    """Everything one training node needs. `lead=True`: the leader (needs `job`); otherwise
    a worker that joins `leader`."""

    lead: bool
    job: str | None = None
    """Task reference "package.module:attr" (leader only; workers get the job from it)."""
    leader: tuple[str, int] | None = None
    """(host, port) of the leader to join (workers only)."""
    nodes: int = 1
    """Nodes, the leader included, to wait for before the first step (leader)."""
    min_nodes: int | None = None
    """Overrides the job's min_nodes: stop when fewer remain after a failure."""
    bsp: bool = False
    """One leader round trip per step (the baseline)."""
    group_size: int | Literal["auto"] | None = None
    """Steps per group or "auto"; None keeps the job's."""
    lookahead: int = 1
    """Groups pushed ahead of the running one."""
    checkpoint_dir: str | None = None
    checkpoint_every: int = 10
    """Groups between checkpoints."""
    resume: bool = False
    """Start from checkpoint_dir's checkpoint."""
    host: str = "127.0.0.1"
    port: int = 0
    secret: bytes | None = None
    insecure: bool = False
    cluster_id: str = "p2pdl"
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    start_timeout: float = 120.0
    """Leader: how long to wait for the first `nodes` nodes to be ready."""
    leader_timeout: float = 30.0
    """Worker: stop if the leader says nothing for this long (it pings every third of it)."""
    stall_timeout: float = 10.0
    """A step without progress for this long is reported to the leader's stall inspector."""
    prefetch_depth: int = 4
    job_overrides: Mapping[str, Any] = field(default_factory=dict)
    """Job spec fields that replace the task's (e.g. epochs, dataset_size, params)."""

    def __post_init__(self) -> None:
        if self.lead:
            if not self.job:
                raise ConfigError("the leader needs a job (--job module:attr)")
            if self.leader is not None:
                raise ConfigError("a node either leads (--lead) or joins (--leader), not both")
        elif self.leader is None:
            raise ConfigError("a worker needs the leader's address (--leader host:port)")
        for name in ("nodes", "lookahead", "checkpoint_every", "prefetch_depth"):
            value = getattr(self, name)
            low = 0 if name == "lookahead" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name.replace('_', '-')} must be an integer >= {low}")
        if self.min_nodes is not None and (
            not isinstance(self.min_nodes, int) or self.min_nodes < 1
        ):
            raise ConfigError("--min-nodes must be a positive integer")
        if (
            self.group_size is not None
            and self.group_size != "auto"
            and (not isinstance(self.group_size, int) or self.group_size < 1)
        ):
            raise ConfigError(
                f"--group-size must be a positive integer or 'auto', got {self.group_size!r}"
            )
        if self.resume and not self.checkpoint_dir:
            raise ConfigError("--resume needs --checkpoint-dir")
        for name in ("start_timeout", "leader_timeout", "stall_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{name} must be a positive number")
        if self.secret is not None and len(self.secret) < 8:
            raise ConfigError("the shared secret must be at least 8 bytes")
        if self.secret is None and not self.insecure and not is_loopback(self.host):
            raise ConfigError(
                f"refusing to listen on {self.host} without a shared secret; "
                "set P2PDL_SECRET or --secret-file, or pass --insecure"
            )

    @classmethod
    def from_cli(cls, args: Any, node_kwargs: Mapping[str, Any]) -> JobNodeOptions:
        """From the CLI's parsed `node` arguments and its `_node_kwargs` (secret, timeouts…)."""
        group_size: int | Literal["auto"] | None = None
        raw = getattr(args, "group_size", None)
        if raw is not None:
            if raw == "auto":
                group_size = "auto"
            else:
                try:
                    group_size = int(raw)
                except ValueError:
                    raise ConfigError(
                        f"--group-size must be an integer or 'auto', got {raw!r}"
                    ) from None
        lead = bool(getattr(args, "lead", False) or getattr(args, "job", None))
        values: dict[str, Any] = {
            "lead": lead,
            "job": getattr(args, "job", None),
            "leader": node_kwargs.get("leader") if not lead else None,
            "nodes": node_kwargs.get("world_size") or getattr(args, "nodes", None) or 1,
            "min_nodes": getattr(args, "min_nodes", None),
            "bsp": bool(getattr(args, "bsp", False)),
            "group_size": group_size,
            "lookahead": getattr(args, "lookahead", 1),
            "checkpoint_dir": getattr(args, "checkpoint_dir", None),
            "checkpoint_every": getattr(args, "checkpoint_every", 10),
            "resume": bool(getattr(args, "resume", False)),
            "stall_timeout": float(getattr(args, "stall_timeout", 10.0)),
            "secret": node_kwargs.get("secret"),
            "insecure": bool(node_kwargs.get("insecure", False)),
            "cluster_id": node_kwargs.get("cluster_id", "p2pdl"),
        }
        if node_kwargs.get("timeouts") is not None:
            values["timeouts"] = node_kwargs["timeouts"]
        if node_kwargs.get("host") is not None:
            values["host"] = node_kwargs["host"]
        if node_kwargs.get("port") is not None:
            values["port"] = node_kwargs["port"]
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> JobNodeOptions:
        """Options from a JSON object (tests, benchmarks): same field names; `leader` and
        addresses as "host:port"; `timeouts` as a mapping; `secret` as a string."""
        from p2pdl.membership import parse_address

        data = json.loads(text)
        if not isinstance(data, dict):
            raise ConfigError("options must be a JSON object")
        if isinstance(data.get("leader"), str):
            data["leader"] = parse_address(data["leader"], "leader")
        if isinstance(data.get("timeouts"), dict):
            data["timeouts"] = Timeouts(**data["timeouts"])
        if isinstance(data.get("secret"), str):
            data["secret"] = data["secret"].encode()
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}")
        return cls(**data)


def emit(event: str, **fields: Any) -> None:
    """One machine-readable JSON line on stdout."""
    print(json.dumps({"event": event, **fields}, default=str), flush=True)


async def run_job_node(options: JobNodeOptions) -> int:
    """Run one node of a training job to the end; returns the process exit status."""
    try:
        if options.lead:
            summary = await _run_leader(options)
        else:
            summary = await _run_worker(options)
    except ConfigError as exc:
        print(f"p2pdl node: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except P2PDLError as exc:
        print(f"p2pdl node: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    emit("done", **summary)
    return 0


def _build_job(options: JobNodeOptions, task: Any) -> Job:
    assert options.job is not None
    spec = dict(task_spec(task, options.job))
    spec.update(options.job_overrides)
    spec["task"] = options.job
    if options.min_nodes is not None:
        spec["min_nodes"] = options.min_nodes
    if options.bsp:
        spec["group_size"] = 1
    elif options.group_size is not None:
        spec["group_size"] = options.group_size
    if "max_nodes" not in spec:
        batch = spec.get("global_batch")
        valid = isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1
        # An invalid batch gets a placeholder so that validation names the batch itself.
        spec["max_nodes"] = batch if valid else max(1, options.nodes)
    try:
        job = Job.from_mapping(spec)
    except ConfigError as exc:
        raise ConfigError(f"malformed job spec of {options.job}: {exc}") from None
    if options.nodes > job.max_nodes:
        raise ConfigError(f"--nodes {options.nodes} exceeds the job's max_nodes {job.max_nodes}")
    if options.nodes < job.min_nodes:
        raise ConfigError(f"--nodes {options.nodes} is below the job's min_nodes {job.min_nodes}")
    return job


async def _setup(task: Any, job: Job, node_id: int) -> tuple[TaskContext, ModelState]:
    ctx = TaskContext(job, node_id=node_id)
    model = ModelState(job)
    ctx._allocate = model.allocate
    try:
        await asyncio.to_thread(task.setup, ctx)
    except P2PDLError:
        raise
    except Exception as exc:
        raise ConfigError(f"task setup failed: {exc!r}") from exc
    if ctx.optimizer is None:
        raise ConfigError("task setup() did not call ctx.init_model(weights, optimizer)")
    await asyncio.to_thread(model.warm_kernels)
    return ctx, model


def _check_resume(
    snap: Snapshot, meta: dict[str, Any], job: Job, model: ModelState, digest: str
) -> None:
    old = meta.get("job", {})
    for name in ("task", "dataset_size", "global_batch", "epochs", "seed", "drop_last"):
        mine = job.to_wire()[name]
        if old.get(name) != mine:
            raise ConfigError(
                f"--resume: the checkpoint was written for {name}={old.get(name)!r}, "
                f"this job has {mine!r}"
            )
    if meta.get("digest") != digest:
        log.warning("--resume: the task's source changed since the checkpoint was written")
    if snap.weights.size != model.size or sorted(snap.state) != sorted(model.state):
        raise ConfigError("--resume: the checkpoint does not fit the task's model")


async def _run_leader(options: JobNodeOptions) -> dict[str, Any]:
    assert options.job is not None
    task = resolve_task(options.job)
    job = _build_job(options, task)
    digest = task_digest(options.job)
    ctx, model = await _setup(task, job, 0)
    if options.resume:
        assert options.checkpoint_dir is not None
        snap, meta = load_checkpoint(options.checkpoint_dir)
        _check_resume(snap, meta, job, model, digest)
        model.restore(snap)
        log.info("resuming from the checkpoint of step %d", snap.step)
    creds = Credentials(options.cluster_id, options.secret)
    listener = Listener(creds, options.limits, options.timeouts)
    address = await listener.start(options.host, options.port)
    emit("ready", rank=0, address=f"{address[0]}:{address[1]}")
    leader_end, worker_end = LocalChannel.pair()
    settings = LeaderSettings(
        nodes=options.nodes,
        lookahead=options.lookahead,
        bsp=options.bsp,
        group_size=job.group_size,
        timeouts=options.timeouts,
        start_timeout=options.start_timeout,
        leader_timeout=options.leader_timeout,
        controller=GroupSizeController(),
    )
    leader = Leader(
        job=job,
        digest=digest,
        params=model.size,
        optimizer=model.opt.to_wire(),
        settings=settings,
        local_channel=leader_end,
        local_address=address,
        model=model,
        emit=emit,
    )
    listener.join_handler = leader.on_join
    writer = _CheckpointWriter(options, job, digest, model)
    worker = Worker(
        task=task,
        ctx=ctx,
        model=model,
        job=job,
        listener=listener,
        channel=worker_end,
        timeouts=options.timeouts,
        leader_timeout=None,
        stall_timeout=options.stall_timeout,
        prefetch_depth=options.prefetch_depth,
        on_boundary=writer.boundary if options.checkpoint_dir else None,
    )
    worker_task = asyncio.ensure_future(worker.run())
    leader_task = asyncio.ensure_future(leader.run())
    try:
        done, _ = await asyncio.wait(
            {worker_task, leader_task}, return_when=asyncio.FIRST_COMPLETED
        )
        if leader_task not in done:
            exc = worker_task.exception()
            if exc is not None:
                raise exc
            # The local worker said bye: the leader is collecting the others' byes.
        summary = await leader_task
        with contextlib.suppress(BaseException):
            async with asyncio.timeout(options.timeouts.shutdown):
                await worker_task
        await writer.wait()
        return summary
    finally:
        for t in (leader_task, worker_task):
            if not t.done():
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t
        leader_end.close()
        await listener.close()


class _CheckpointWriter:
    """Writes rank 0's boundary snapshot every K groups, off the event loop, one at a time."""

    def __init__(self, options: JobNodeOptions, job: Job, digest: str, model: ModelState) -> None:
        self.options = options
        self.meta = {"job": job.to_wire(), "digest": digest}
        self.model = model
        self.boundaries = 0
        self.pending: asyncio.Future[Any] | None = None

    def boundary(self, snap: Snapshot, group_id: int) -> None:
        self.boundaries += 1
        last = snap.step >= self.model.job.total_steps
        if self.boundaries % self.options.checkpoint_every and not last:
            return
        if self.pending is not None and not self.pending.done() and not last:
            return  # the previous write is still going: the next boundary will catch up
        assert self.options.checkpoint_dir is not None
        meta = {**self.meta, "group_id": group_id}
        previous = self.pending

        def write() -> None:
            save_checkpoint(self.options.checkpoint_dir or ".", snap, meta)

        async def run() -> None:
            if previous is not None:
                with contextlib.suppress(Exception):
                    await previous
            await asyncio.to_thread(write)

        self.pending = asyncio.ensure_future(run())

    async def wait(self) -> None:
        if self.pending is not None:
            await self.pending


async def _run_worker(options: JobNodeOptions) -> dict[str, Any]:
    assert options.leader is not None
    creds = Credentials(options.cluster_id, options.secret)
    listener = Listener(creds, options.limits, options.timeouts)
    address = await listener.start(options.host, options.port)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + options.timeouts.connect
    channel: LinkChannel | None = None
    worker: Worker | None = None
    try:
        host, port = address
        link = await dial(*options.leader, options.limits, deadline, label="the leader")
        if host in ("", "0.0.0.0", "::") and link._transport is not None:
            host = link._transport.get_extra_info("sockname")[0]
        async with asyncio.timeout_at(deadline):
            await dial_handshake(link, creds, -1, 0, {"join": True, "addr": [host, port]})
        first_frame = await _recv_first_frame(link, options)
        if first_frame is None:  # a plain cluster's leader: be a plain member of it
            return await _serve_plain_member(link, listener, options)
        first = decode(first_frame, sender=0)
        channel = LinkChannel(link, peer_rank=0, label="the leader", first_recv=2)
        if first["k"] == "error":
            raise JobError(f"the leader refused this node: {first['reason']}")
        if first["k"] != "job":
            raise JobError(f"expected the job from the leader, got {first['k']!r}")
        try:
            job = Job.from_wire(first["job"])
            task = resolve_task(job.task)
            digest = task_digest(job.task)
        except ConfigError as exc:
            await channel.send(
                {"k": "hello", "addr": [host, port], "digest": None, "error": str(exc)}
            )
            raise ConfigError(f"cannot run the leader's job: {exc}") from None
        await channel.send({"k": "hello", "addr": [host, port], "digest": digest, "error": None})
        reply = await _recv_first(channel, options)
        if reply["k"] == "error":
            raise JobError(f"the leader refused this node: {reply['reason']}")
        try:
            ctx, model = await _setup(task, job, first["node_id"])
        except ConfigError as exc:
            await channel.send({"k": "setup_done", "params": 0, "optimizer": {}, "error": str(exc)})
            raise
        await channel.send(
            {
                "k": "setup_done",
                "params": model.size,
                "optimizer": model.opt.to_wire(),
                "error": None,
            }
        )

        def ready(rank: int) -> None:
            emit("ready", rank=rank, address=f"{host}:{port}")

        worker = Worker(
            task=task,
            ctx=ctx,
            model=model,
            job=job,
            listener=listener,
            channel=channel,
            timeouts=options.timeouts,
            leader_timeout=options.leader_timeout,
            stall_timeout=options.stall_timeout,
            prefetch_depth=options.prefetch_depth,
            on_ready=ready,
        )
        return await worker.run()
    except TimeoutError:
        raise JobError(
            f"could not join the leader at {options.leader[0]}:{options.leader[1]} within "
            f"{options.timeouts.connect:.3g}s"
        ) from None
    finally:
        if channel is not None:
            channel.close()
        await listener.close()


async def _recv_first_frame(link: Link, options: JobNodeOptions) -> memoryview | None:
    """The leader's first control frame; None when the leader runs a plain cluster (its
    first frame is the rendezvous peer table, not a job)."""
    try:
        async with asyncio.timeout(options.leader_timeout):
            header, payload = await link.post(TABLE_TAG)
    except TimeoutError:
        raise JobError(f"no word from the leader for {options.leader_timeout:.3g}s") from None
    except P2PDLError as exc:
        raise JobError(f"lost the leader while joining: {exc}") from None
    if "peers" in header or "error" in header:
        link.plain_table = header  # type: ignore[attr-defined]
        return None
    return payload


async def _serve_plain_member(
    link: Link, listener: Listener, options: JobNodeOptions
) -> dict[str, Any]:
    """Join a leader that runs no job: form the mesh, then serve until SIGTERM/SIGINT."""
    rank, peers = parse_table(link.plain_table)  # type: ignore[attr-defined]
    link.close()
    mesh = Mesh(rank, peers, listener, options.timeouts)
    stop = asyncio.get_running_loop().create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(
            signum, lambda: stop.done() or stop.set_result(None)
        )
    collectives = Collectives(
        mesh, timeout=options.timeouts.operation, host_ids=[host for host, _port in peers]
    )
    try:
        await mesh.connect()
        await collectives.prepare()  # the leader's Node.start probes shared memory with us
        emit(
            "ready", rank=rank, world_size=len(peers), address=f"{peers[rank][0]}:{peers[rank][1]}"
        )
        await stop
    finally:
        await mesh.close()
        await listener.close()
        collectives.close()
    return {"rank": rank, "world_size": len(peers), "job": None}


async def _recv_first(channel: LinkChannel, options: JobNodeOptions) -> dict[str, Any]:
    try:
        async with asyncio.timeout(options.leader_timeout):
            return await channel.recv()
    except TimeoutError:
        raise JobError(f"no word from the leader for {options.leader_timeout:.3g}s") from None
    except P2PDLError as exc:
        raise JobError(f"lost the leader while joining: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    """`python -m p2pdl.schedule.runtime '<options json>'` (tests and benchmarks)."""
    import uvloop

    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.INFO if "--verbose" in args else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    args = [a for a in args if a != "--verbose"]
    if len(args) != 1:
        print(
            "usage: python -m p2pdl.schedule.runtime [--verbose] '<options json>'", file=sys.stderr
        )
        return 2
    try:
        options = JobNodeOptions.from_json(args[0])
    except (ConfigError, ValueError, TypeError) as exc:
        print(f"p2pdl node: error: {exc}", file=sys.stderr)
        return 2
    return uvloop.run(run_job_node(options))


if __name__ == "__main__":
    raise SystemExit(main())

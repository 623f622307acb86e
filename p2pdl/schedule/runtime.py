"""Running one node of a training job: `run_job_node(NodeConfig, JobOptions)`.

How the node reaches its cluster is its `NodeConfig` (the one node configuration type); what
it runs is `JobOptions`. A node whose config leads (`--lead`) runs the job's leader and
trains as rank 0; a node that joins (`--leader host:port`) follows whatever that leader
runs: a training job (it becomes a worker), or a plain cluster (it becomes a plain member
that serves collectives until SIGTERM/SIGINT).

On stdout a node prints one JSON line when it has joined
(`{"event": "ready", "rank": r, "address": "h:p"}`; the leader prints it as soon as it listens,
so that others can be pointed at it), JSON lines for membership epochs / recoveries / stalls
(leader), and one `{"event": "done", ...}` line with its summary at the end. Errors: one line
on stderr and a non-zero exit status (2 for configuration errors, 1 for runtime failures).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from p2pdl.config import NodeConfig
from p2pdl.errors import CollectiveTimeoutError, ConfigError, P2PDLError
from p2pdl.node import Node
from p2pdl.rendezvous import ControlChannel, LocalChannel, parse_table
from p2pdl.schedule.checkpoint import Snapshot, load_checkpoint, save_checkpoint
from p2pdl.schedule.errors import JobError
from p2pdl.schedule.group_size import GroupSizeController
from p2pdl.schedule.job import Job
from p2pdl.schedule.leader import Leader, LeaderSettings
from p2pdl.schedule.model import ModelState
from p2pdl.schedule.protocol import check
from p2pdl.schedule.task import TaskContext, resolve_task, task_digest, task_spec
from p2pdl.schedule.worker import Worker
from p2pdl.session import membership_of

__all__ = ["JobOptions", "JobOutcome", "check_job", "emit", "run_job", "run_job_node"]

log = logging.getLogger("p2pdl.schedule.runtime")


@dataclass(frozen=True, slots=True, kw_only=True)
class JobOptions:
    """What a training node runs. `job` and the group settings are the leader's; workers
    get the job from the leader."""

    job: str | None = None
    """Task reference "package.module:attr": what the leader runs; on a joining node, the
    one task it agrees to run (as if given with `allow_tasks`)."""
    allow_tasks: tuple[str, ...] = ()
    """A joining node runs only these tasks (and `job`); any other job is refused before
    any of its code is imported."""
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
    start_timeout: float = 120.0
    """Leader: how long to wait for the first `nodes` nodes to be ready."""
    leader_timeout: float = 30.0
    """Worker: stop if the leader says nothing for this long (it pings every third of it)."""
    stall_timeout: float = 10.0
    """A step without progress for this long is reported to the leader's stall inspector."""
    prefetch_depth: int = 4
    job_overrides: Mapping[str, Any] = field(default_factory=dict)
    """Job spec fields that replace the task's (e.g. epochs, dataset_size, params)."""
    adapt_task: Callable[[Any], Any] | None = None
    """A host's wrapper for the task once resolved from its reference (on this node only):
    p2pdl.spark hands the task the rows of its Spark partitions this way."""

    def __post_init__(self) -> None:
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

    @property
    def allowed(self) -> frozenset[str]:
        """The tasks a joining node agrees to run."""
        return frozenset((*self.allow_tasks, *((self.job,) if self.job else ())))

    def check_role(self, config: NodeConfig) -> None:
        """Leader-only settings on a leader only; a leader needs a job."""
        if config.mode == "lead":
            if not self.job:
                raise ConfigError("the leader needs a job (--job module:attr)")
            if self.allow_tasks:
                raise ConfigError("--allow-task is for joining nodes; the leader runs --job")
            return
        if config.mode != "join":
            raise ConfigError("a training node leads (--lead) or joins a leader (--leader)")
        leader_only = {
            "--min-nodes": self.min_nodes is not None,
            "--bsp": self.bsp,
            "--group-size": self.group_size is not None,
            "--checkpoint-dir": self.checkpoint_dir is not None,
            "--resume": self.resume,
        }
        given = [flag for flag, set_ in leader_only.items() if set_]
        if given:
            raise ConfigError(
                f"{', '.join(given)}: the leader's settings; a joining node gets its job "
                "from the leader"
            )


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """How one node's part of a job ended, for hosts that embed the runtime (p2pdl.spark)."""

    summary: dict[str, Any]
    task: Any
    """The task this node trained (None on a plain member)."""
    weights: np.ndarray | None
    """A copy of the final flat weights (None on a plain member)."""


def emit(event: str, **fields: Any) -> None:
    """One machine-readable JSON line on stdout."""
    print(json.dumps({"event": event, **fields}, default=str), flush=True)


async def run_job_node(config: NodeConfig, options: JobOptions) -> int:
    """Run one node of a training job to the end; returns the process exit status."""
    try:
        outcome = await run_job(config, options)
    except ConfigError as exc:
        print(f"p2pdl node: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except P2PDLError as exc:
        print(f"p2pdl node: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    emit("done", **outcome.summary)
    return 0


async def run_job(config: NodeConfig, options: JobOptions) -> JobOutcome:
    """Run one node of a training job to the end and return its outcome; raises ConfigError
    or another P2PDLError where `run_job_node` would print one and exit non-zero."""
    options.check_role(config)
    if config.mode == "lead":
        return await _run_leader(config, options)
    return await _run_worker(config, options)


def check_job(options: JobOptions) -> Job:
    """The validated job a leader with `options` would run, without starting anything: for
    hosts that check a job before any node starts (p2pdl.spark). Raises ConfigError."""
    if not options.job:
        raise ConfigError("the leader needs a job (--job module:attr)")
    return _build_job(options, _resolve(options.job, options))


def _resolve(reference: str, options: JobOptions) -> Any:
    task = resolve_task(reference)
    return options.adapt_task(task) if options.adapt_task is not None else task


def _build_job(options: JobOptions, task: Any) -> Job:
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
    if snap.weights.size != model.size or sorted(snap.state) != sorted(model.opt.state_names):
        raise ConfigError("--resume: the checkpoint does not fit the task's model")


def _optimizer_wire(model: ModelState) -> dict[str, Any]:
    """What every node's optimizer must agree on (the learning rate travels per step)."""
    return {**model.opt.to_wire(), "lr": 0.0}


async def _run_leader(config: NodeConfig, options: JobOptions) -> JobOutcome:
    assert options.job is not None
    task = _resolve(options.job, options)
    job = _build_job(options, task)
    digest = task_digest(options.job)
    ctx, model = await _setup(task, job, 0)
    if options.resume:
        assert options.checkpoint_dir is not None
        snap, meta = load_checkpoint(options.checkpoint_dir)
        _check_resume(snap, meta, job, model, digest)
        model.restore_checkpoint(snap)
        log.info("resuming from the checkpoint of step %d", snap.step)
    node = Node(config=config)
    address = await node.listen()
    emit("ready", rank=0, address=f"{address[0]}:{address[1]}")
    desk = node.join_desk()
    leader_end, worker_end = LocalChannel.pair(check)
    settings = LeaderSettings(
        nodes=options.nodes,
        lookahead=options.lookahead,
        bsp=options.bsp,
        group_size=job.group_size,
        timeouts=config.timeouts,
        start_timeout=options.start_timeout,
        leader_timeout=options.leader_timeout,
        controller=GroupSizeController(),
        checkpoint_every=options.checkpoint_every if options.checkpoint_dir else None,
    )
    leader = Leader(
        job=job,
        digest=digest,
        params=model.size,
        optimizer=_optimizer_wire(model),
        settings=settings,
        local_channel=leader_end,
        local_address=address,
        model=model,
        emit=emit,
        resumed=options.resume,
    )
    writer = _CheckpointWriter(options, job, digest)
    worker = Worker(
        task=task,
        ctx=ctx,
        model=model,
        job=job,
        node=node,
        channel=worker_end,
        timeouts=config.timeouts,
        leader_timeout=None,
        stall_timeout=options.stall_timeout,
        prefetch_depth=options.prefetch_depth,
        on_checkpoint=writer.write if options.checkpoint_dir else None,
    )

    async def admit_joiners() -> None:
        while True:
            leader.admit(await desk.accept())

    admitting = asyncio.ensure_future(admit_joiners())
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
            async with asyncio.timeout(config.timeouts.shutdown):
                await worker_task
        await writer.wait()
        return JobOutcome(summary, task, model.weights.copy())
    finally:
        for t in (admitting, leader_task, worker_task):
            if not t.done():
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t
        leader_end.close()
        desk.close()
        await node.close()


class _CheckpointWriter:
    """Writes rank 0's checkpoints off the event loop, one at a time, newest wins."""

    def __init__(self, options: JobOptions, job: Job, digest: str) -> None:
        self.options = options
        self.meta = {"job": job.to_wire(), "digest": digest}
        self.pending: asyncio.Future[Any] | None = None

    def write(self, snap: Snapshot, group_id: int) -> None:
        assert self.options.checkpoint_dir is not None
        meta = {**self.meta, "group_id": group_id}
        previous = self.pending
        folder = self.options.checkpoint_dir

        async def run() -> None:
            if previous is not None:
                with contextlib.suppress(Exception):
                    await previous
            await asyncio.to_thread(save_checkpoint, folder, snap, meta)

        self.pending = asyncio.ensure_future(run())

    async def wait(self) -> None:
        if self.pending is not None:
            await self.pending


async def _run_worker(config: NodeConfig, options: JobOptions) -> JobOutcome:
    assert config.leader is not None
    node = Node(config=config)
    channel: ControlChannel | None = None
    leader_text = f"{config.leader[0]}:{config.leader[1]}"
    try:
        host, port = await node.listen()
        loop = asyncio.get_running_loop()
        try:
            channel = await node.dial_leader(loop.time() + config.timeouts.connect)
        except CollectiveTimeoutError:
            raise JobError(
                f"could not join the leader at {leader_text} within {config.timeouts.connect:.3g}s"
            ) from None
        first = await _recv_first(channel, options)
        if first["k"] == "table":  # a plain cluster's leader: be a plain member of it
            return JobOutcome(await _serve_plain_member(node, first), None, None)
        first = check(first, sender="the leader")
        if first["k"] == "error":
            raise JobError(f"the leader refused this node: {first['reason']}")
        if first["k"] != "job":
            raise JobError(f"expected the job from the leader, got {first['k']!r}")
        try:
            job = Job.from_wire(first["job"])
            digest = _admit_task(job.task, first["digest"], options)
            task = _resolve(job.task, options)
        except (ConfigError, JobError) as exc:
            await channel.send({"k": "hello", "digest": None, "error": str(exc)})
            raise JobError(f"cannot run the leader's job: {exc}") from None
        await channel.send({"k": "hello", "digest": digest, "error": None})
        reply = check(await _recv_first(channel, options), sender="the leader")
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
                "optimizer": _optimizer_wire(model),
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
            node=node,
            channel=channel,
            timeouts=config.timeouts,
            leader_timeout=options.leader_timeout,
            stall_timeout=options.stall_timeout,
            prefetch_depth=options.prefetch_depth,
            on_ready=ready,
        )
        return JobOutcome(await worker.run(), task, model.weights.copy())
    finally:
        if channel is not None:
            channel.close()
        await node.close()


def _admit_task(reference: str, digest: str, options: JobOptions) -> str:
    """Agree to run the leader's task only if this node was told to, and only if its source
    here is what the leader runs — both checked before the task's module is imported."""
    allowed = options.allowed
    if reference not in allowed:
        told = ", ".join(sorted(allowed)) if allowed else "no task"
        raise JobError(
            f"the leader asks for task {reference}; this node was told to run {told} "
            f"(start it with --allow-task {reference} to accept it)"
        )
    mine = task_digest(reference)
    if mine != digest:
        raise JobError(
            f"task digest mismatch: the leader runs sha256 {digest} of "
            f"{reference.partition(':')[0]}'s source, this node has {mine}; every node must "
            "run the same task code"
        )
    return mine


async def _serve_plain_member(node: Node, table: dict[str, Any]) -> dict[str, Any]:
    """Join a leader that runs no job: form the session, then serve until SIGTERM/SIGINT."""
    rank, peers = parse_table(table)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    await node.enter(membership_of(0, peers), rank)
    emit("ready", rank=rank, world_size=len(peers), address=f"{peers[rank][0]}:{peers[rank][1]}")
    await stop
    return {"rank": rank, "world_size": len(peers), "job": None}


async def _recv_first(channel: ControlChannel, options: JobOptions) -> dict[str, Any]:
    try:
        async with asyncio.timeout(options.leader_timeout):
            return await channel.recv()
    except TimeoutError:
        raise JobError(f"no word from the leader for {options.leader_timeout:.3g}s") from None
    except P2PDLError as exc:
        raise JobError(f"lost the leader while joining: {exc}") from None

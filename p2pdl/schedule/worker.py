"""The worker: runs the groups the leader pushes, with only peer-to-peer AllReduce between steps.

Per step: the task fills the gradient buffer(s); the runtime appends the step's in-band
accounting (loss sum, sample count, sample-index sum) to the gradient and runs the sharded
step (`p2pdl.collectives.sharded.sharded_step`): one allreduce whose owners update their
range of the weights as its chunks are reduced and share the new weights — whatever
algorithm `auto` picks for the buffer (the one-hop exchange for small models, where every
rank owns everything; BigDL's sliced exchange; shared memory on one host; the per-host
hierarchy).

Membership epochs: each epoch is a session of the node (`Node.enter`), formed when the
leader says `epoch`; at `start` the members take rank 0's weights if asked (joins, the first
epoch), rebuild the optimizer state of their new ranges from the pieces the leader assigned
(`decisions.choose_rollback`), and keep the epoch's first boundary. At every group boundary
a node keeps a `Boundary` and hands a replica of its own state piece to the next rank.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from p2pdl.collectives import timeline
from p2pdl.collectives.compute import Compute
from p2pdl.collectives.sharded import gather_state, sharded_step
from p2pdl.config import Timeouts
from p2pdl.errors import P2PDLError, PeerLostError, ProtocolError
from p2pdl.node import Node
from p2pdl.rendezvous import Channel
from p2pdl.schedule.checkpoint import Snapshot
from p2pdl.schedule.decisions import Piece, holdings_from_wire
from p2pdl.schedule.errors import JobError
from p2pdl.schedule.job import Job
from p2pdl.schedule.model import TAIL, ModelState, StatePiece
from p2pdl.schedule.plan import IterationGroup, StepPlan, sample_indices
from p2pdl.schedule.prefetch import Prefetcher
from p2pdl.schedule.task import TaskContext
from p2pdl.session import membership_of

log = logging.getLogger("p2pdl.schedule.worker")

REPLICA_TAG = 17
"""Point-to-point tag of the state replica handed to the next rank at a boundary."""


class Worker:
    """One node's training loop, driven by the leader's control messages."""

    def __init__(
        self,
        *,
        task: Any,
        ctx: TaskContext,
        model: ModelState,
        job: Job,
        node: Node,
        channel: Channel,
        timeouts: Timeouts,
        leader_timeout: float | None,
        stall_timeout: float,
        prefetch_depth: int = 4,
        on_ready: Callable[[int], None] | None = None,
        on_checkpoint: Callable[[Snapshot, int], Any] | None = None,
    ) -> None:
        self.task = task
        self.ctx = ctx
        self.model = model
        self.job = job
        self.node = node
        self.channel = channel
        self.timeouts = timeouts
        self.leader_timeout = leader_timeout
        self.stall_timeout = stall_timeout
        self.on_ready = on_ready
        self.on_checkpoint = on_checkpoint
        self.epoch = -1
        self.rank = -1
        self.world_size = 0
        self.compute: Compute | None = None
        self._start: dict[str, Any] | None = None
        self._replicate = False
        self._groups: asyncio.Queue[tuple[IterationGroup, bool]] = asyncio.Queue()
        self._trainer: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._step_pool = ThreadPoolExecutor(1, thread_name_prefix="p2pdl-step")
        self._inline = bool(getattr(task, "inline", False))
        self._prepare = getattr(task, "prepare", None)
        self._prefetch = Prefetcher(self._prefetch_one, prefetch_depth)
        self._progress: tuple[int, int, str, float] | None = None
        self._stall_reported: tuple[int, int, str] | None = None
        self.steps_run = 0
        self.ready_announced = False

    # ----------------------------------------------------------------- control loop
    async def run(self) -> dict[str, Any]:
        """Follow the leader until it says stop; returns this node's summary."""
        self._watchdog = asyncio.ensure_future(self._watch_stalls())
        try:
            while True:
                message = await self._recv()
                kind = message["k"]
                if kind == "group":
                    self._on_group(message)
                elif kind == "epoch":
                    await self._on_epoch(message)
                elif kind == "start":
                    await self._on_start(message)
                elif kind == "abort":
                    await self._halt()
                    await self.channel.send(
                        {
                            "k": "aborted",
                            "epoch": message["epoch"],
                            "holdings": [h.to_wire() for h in self.model.holdings()],
                        }
                    )
                elif kind == "stop":
                    await self._halt()
                    summary = {
                        "rank": self.rank,
                        "weights_sha256": self.model.weights_sha256(),
                        "steps_run": self.steps_run,
                    }
                    await self.channel.send({"k": "bye", **summary})
                    return summary
                elif kind == "error":
                    raise JobError(f"the leader stopped the job: {message['reason']}")
                elif kind == "ping":
                    continue
                else:
                    raise ProtocolError(f"unexpected {kind} message from the leader", rank=0)
        finally:
            await self.close()

    async def _recv(self) -> dict[str, Any]:
        try:
            if self.leader_timeout is None:
                return await self.channel.recv()
            async with asyncio.timeout(self.leader_timeout):
                return await self.channel.recv()
        except TimeoutError:
            raise JobError(
                f"no word from the leader (rank 0) for {self.leader_timeout:.3g}s; stopping"
            ) from None
        except PeerLostError as exc:
            raise JobError(f"lost the leader (rank 0): {exc.detail or exc}") from None

    async def close(self) -> None:
        for task in (self._trainer, self._watchdog):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._prefetch.close()
        self._step_pool.shutdown(wait=False, cancel_futures=True)
        await self.node.leave()

    # -------------------------------------------------------------- membership epochs
    async def _halt(self) -> None:
        """Stop training (at once) and wait until no thread still touches the buffers."""
        if self._trainer is not None and not self._trainer.done():
            self._trainer.cancel()
            with contextlib.suppress(BaseException):
                await self._trainer
        self._trainer = None
        self._progress = None
        self._prefetch.clear()
        while not self._groups.empty():
            self._groups.get_nowait()
        if self.compute is not None:
            await self.compute.drain()
        # A step cancelled while its thread ran: wait for that thread to finish.
        await asyncio.wrap_future(self._step_pool.submit(lambda: None))

    async def _on_epoch(self, message: dict[str, Any]) -> None:
        """Leave the old session, roll back if told, form the new epoch's session."""
        await self._halt()
        await self.node.leave()
        if message["restore"] is not None:
            self.model.restore_step(message["restore"])
        peers = [(str(h), int(p)) for h, p in message["peers"]]
        self.epoch = message["epoch"]
        self.rank = message["rank"]
        self.world_size = len(peers)
        self._start = message
        self.ctx.rank, self.ctx.world_size = self.rank, self.world_size
        self.compute = Compute()
        try:
            await self.node.enter(membership_of(self.epoch, peers), self.rank, compute=self.compute)
        except P2PDLError as exc:
            await self._report_failure("connect", exc)
            return
        await self.channel.send({"k": "connected", "epoch": self.epoch})

    async def _on_start(self, message: dict[str, Any]) -> None:
        """Every node is connected: begin the epoch in the background (an abort from the
        leader must be able to stop it, as it stops training)."""
        if message["epoch"] != self.epoch or not self.node.has_session or self._start is None:
            return
        self._trainer = asyncio.ensure_future(self._begin_epoch())

    async def _begin_epoch(self) -> None:
        """Take rank 0's state if asked, rebuild the optimizer state of this node's new
        range, keep the first boundary, then train."""
        assert self._start is not None
        try:
            if self._start["sync"]:
                await self._sync_state()
            await self._assemble_state(self._start)
            await self._keep_boundary()
        except P2PDLError as exc:
            await self._report_failure("start", exc)
            return
        await self.channel.send({"k": "started", "epoch": self.epoch})
        if not self.ready_announced and self.on_ready is not None:
            self.ready_announced = True
            self.on_ready(self.rank)
        await self._train()

    async def _sync_state(self) -> None:
        """Everyone takes rank 0's weights and accounting (joins, the first epoch)."""
        model = self.model
        await self.node.broadcast(model.weights_ext, root=0)
        meta = model.meta_array()
        await self.node.broadcast(meta, root=0)
        model.load_meta_array(meta)

    def _owned(self, rank: int | None = None) -> tuple[int, int]:
        model = self.model
        start, stop = self.node.collectives.owned_range(model.size + TAIL, 4, rank=rank)
        return min(start, model.size), min(stop, model.size)

    async def _assemble_state(self, message: dict[str, Any]) -> None:
        """Own this epoch's range; its state comes from the pieces the leader assigned (one
        allreduce per state buffer of zeros and disjoint pieces: exact), or starts at zero."""
        model = self.model
        owned = self._owned()
        self._replicate = self.world_size > 1 and owned != (0, model.size)
        if not model.has_state or not message["assemble"]:
            model.update.own(*owned)
            return
        pieces = _pieces(message["contribute"], model.size)
        full = model.contribution(message["step"], pieces)
        for name in model.opt.state_names:
            await self.node.allreduce(full[name], "sum")
        model.update.own(*owned, source=full)

    async def _keep_boundary(self, group_id: int | None = None, checkpoint: bool = False) -> None:
        """Keep the boundary at the current step: the own piece, and the predecessor's
        replica (handed over now); write a checkpoint if this boundary is one."""
        model = self.model
        boundary = model.begin_boundary()
        if self._replicate and "own" in boundary.pieces:
            boundary.pieces["replica"] = await self._exchange_replicas(boundary.pieces["own"])
        model.keep(boundary)
        if checkpoint:
            full = await gather_state(self.node.collectives, model.update)
            if self.on_checkpoint is not None and self.rank == 0:
                self.on_checkpoint(model.snapshot(full), group_id if group_id is not None else -1)

    async def _exchange_replicas(self, own: StatePiece) -> StatePiece:
        """Send this node's own piece to the next rank; receive the previous rank's."""
        names = self.model.opt.state_names
        n = self.world_size
        succ, pred = (self.rank + 1) % n, (self.rank - 1) % n
        start, stop = self._owned(pred)
        outgoing = np.concatenate([own.arrays[name] for name in names]) if names else None
        incoming = np.empty(len(names) * (stop - start), np.float32)
        coll = self.node.collectives
        await asyncio.gather(
            coll.send(outgoing, succ, tag=REPLICA_TAG), coll.recv(incoming, pred, tag=REPLICA_TAG)
        )
        length = stop - start
        arrays = {name: incoming[i * length : (i + 1) * length] for i, name in enumerate(names)}
        return StatePiece(start, stop, arrays)

    async def _report_failure(self, phase: str, exc: P2PDLError) -> None:
        lost = list(getattr(exc, "ranks", ()) or getattr(exc, "missing", ()))
        log.warning("rank %d: %s failed in epoch %d: %s", self.rank, phase, self.epoch, exc)
        with contextlib.suppress(P2PDLError):
            await self.channel.send(
                {
                    "k": "failed",
                    "epoch": self.epoch,
                    "phase": phase,
                    "error": str(exc),
                    "lost": lost,
                }
            )

    async def _report_task_error(self, exc: Exception) -> None:
        """Tell the leader this node's task raised (phase "task": the leader stops the job
        instead of recovering into the same error); the leader's answer ends this node."""
        error = f"{type(exc).__name__}: {exc}"[:1000]
        log.error("rank %d: the task raised %s", self.rank, error, exc_info=exc)
        with contextlib.suppress(P2PDLError):
            await self.channel.send(
                {"k": "failed", "epoch": self.epoch, "phase": "task", "error": error, "lost": []}
            )

    # --------------------------------------------------------------------- training
    def _on_group(self, message: dict[str, Any]) -> None:
        group = IterationGroup.from_wire(message["plan"], rank=0)
        if group.epoch != self.epoch or self._trainer is None or self._trainer.done():
            return  # planned for a membership this node has left: the leader re-plans
        if group.world_size != self.world_size:
            raise ProtocolError(
                f"group {group.group_id} planned for {group.world_size} ranks, "
                f"epoch {self.epoch} has {self.world_size}",
                rank=0,
            )
        self._groups.put_nowait((group, message["checkpoint"]))
        mine = [s.per_rank[self.rank] for s in group.steps]
        if self._prepare is None:
            # Index arrays only: one background job per group (not one thread hop per step).
            self._prefetch.extend([((group.group_id, "all"), mine)])
        else:
            self._prefetch.extend([((group.group_id, k), [rs]) for k, rs in enumerate(mine)])

    def _prefetch_one(self, items: list[Any]) -> list[tuple[np.ndarray, Any]]:
        out = []
        for rank_samples in items:
            samples = sample_indices(self.job, rank_samples)
            prepared = None
            if self._prepare is not None and samples.size:
                prepared = self._prepare(self.ctx, samples)
            out.append((samples, prepared))
        return out

    async def _train(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                waited_from = loop.time()
                self._progress = (self.epoch, self.model.next_step, "wait", waited_from)
                with timeline.span("wait for group", "wait", self.rank):
                    group, checkpoint = await self._groups.get()
                wait = loop.time() - waited_from
                await self._run_group(group, checkpoint, wait)
        except asyncio.CancelledError:
            raise
        except P2PDLError as exc:
            self._progress = None
            await self._report_failure("step", exc)
        except Exception as exc:  # the task's own code: rerunning the step would raise again
            self._progress = None
            await self._report_task_error(exc)

    async def _run_group(self, group: IterationGroup, checkpoint: bool, wait: float) -> None:
        loop = asyncio.get_running_loop()
        model = self.model
        if group.start_step != model.next_step:
            raise ProtocolError(
                f"group {group.group_id} starts at step {group.start_step}, this node is at "
                f"{model.next_step}",
                rank=0,
            )
        t_compute = t_reduce = 0.0
        batches = None
        if self._prepare is None:
            with timeline.span("wait for batches", "wait", self.rank, group=group.group_id):
                batches = await self._prefetch.get((group.group_id, "all"))
        for k, plan in enumerate(group.steps):
            if batches is not None:
                samples, prepared = batches[k]
            else:
                with timeline.span("wait for batch", "wait", self.rank, step=plan.step):
                    ((samples, prepared),) = await self._prefetch.get((group.group_id, k))
            t0 = loop.time()
            self._progress = (self.epoch, plan.step, "compute", t0)
            with timeline.span("forward/backward", "compute", self.rank, step=plan.step):
                await self._compute(plan, samples, prepared)
            t1 = loop.time()
            self._progress = (self.epoch, plan.step, "allreduce", t1)
            with timeline.span("sharded step", "collective", self.rank, step=plan.step):
                await self._reduce(plan)
            t2 = loop.time()
            t_compute += t1 - t0
            t_reduce += t2 - t1
            data_epoch = plan.per_rank[0].epoch
            model.totals[data_epoch] += model.weights_ext[model.size : model.size + 3]
            model.opt_steps += 1
            model.next_step = plan.step + 1
            self.steps_run += 1
        tb = loop.time()
        self._progress = (self.epoch, model.next_step, "boundary", tb)
        with timeline.span("group boundary", "schedule", self.rank, group=group.group_id):
            await self._keep_boundary(group.group_id, checkpoint)
        t_boundary = loop.time() - tb
        await self.channel.send(
            {
                "k": "report",
                "epoch": self.epoch,
                "group": group.group_id,
                "steps": len(group.steps),
                "t_compute": t_compute,
                "t_reduce": t_reduce,
                "t_wait": wait,
                "t_boundary": t_boundary,
            }
        )

    async def _compute(self, plan: StepPlan, samples: np.ndarray, prepared: Any) -> None:
        model = self.model
        ctx = self.ctx
        n = model.size
        tail = model.grads_ext[0][n:]
        if samples.size == 0:
            for g in model.grads_ext:
                g.fill(0.0)
            return
        ctx.step = plan.step
        ctx.batch = prepared
        if self._inline:
            metrics = self.task.step(ctx, samples, plan.lr)
        else:
            metrics = await asyncio.wrap_future(
                self._step_pool.submit(self.task.step, ctx, samples, plan.lr)
            )
        ctx.batch = None
        try:
            loss = float(metrics["loss"])
        except (KeyError, TypeError, ValueError):
            raise P2PDLError(
                f"task.step must return a mapping with a numeric 'loss', got {metrics!r}"
            ) from None
        tail[0] = samples.size
        tail[1] = float(samples.sum())
        tail[2] = loss
        tail[3] = 0.0
        for g in model.grads_ext[1:]:
            g[n:] = 0.0

    async def _reduce(self, plan: StepPlan) -> None:
        """The sharded step: the gradient summed, divided by the global batch, applied by
        each owner to its range; the new weights (and accounting) land in weights_ext."""
        model = self.model
        await sharded_step(
            self.node.collectives,
            model.grads_ext,
            model.weights_ext,
            model.update,
            lr=plan.lr,
            steps_done=model.opt_steps,
            op="sum",
            scale=1.0 / max(1, plan.batch),
        )

    # ------------------------------------------------------------------ stall reports
    async def _watch_stalls(self) -> None:
        """Tell the leader when this node's current step has made no progress for a while."""
        period = max(0.05, self.stall_timeout / 4)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(period)  # a periodic check, not a synchronisation point
            progress = self._progress
            if progress is None or progress[2] == "wait":
                continue
            epoch, step, phase, since = progress
            stuck = loop.time() - since
            key = (epoch, step, phase)
            if stuck >= self.stall_timeout and self._stall_reported != key:
                self._stall_reported = key
                with contextlib.suppress(P2PDLError):
                    await self.channel.send(
                        {
                            "k": "stall",
                            "epoch": epoch,
                            "step": step,
                            "phase": phase,
                            "seconds": stuck,
                        }
                    )


def _pieces(raw: object, size: int) -> list[Piece]:
    """The pieces an epoch message asks this node to contribute (validated)."""
    (holding,) = holdings_from_wire([[0, raw]], size=size, sender="the leader")
    return list(holding.pieces)

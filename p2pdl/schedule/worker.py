"""The worker: runs the groups the leader pushes, with only peer-to-peer AllReduce between steps.

Per step: the task fills the gradient buffer(s); the runtime appends the step's in-band
accounting (loss sum, sample count, sample-index sum) to the gradient, and runs the
two-phase AllReduce with the sharded optimizer as `on_slice`:

* small models (`choose_algorithm` picks the one-hop `direct` exchange): every rank owns the
  whole buffer, `on_slice(0, n)` updates the weight buffer in place from the reduced
  gradient — no all-gather and no copy at all;
* otherwise one `sliced` allreduce with an `on_chunk` hook: the owner of each slice updates
  **its slice of the weight buffer** chunk by chunk as the chunks are reduced and puts the new
  weights in the chunk's place, so the all-gather of early chunks overlaps the reduction of
  later ones; the gathered buffer (the new weights) is copied into the weight buffer.

The optimizer state is kept full-size on every node; each owner updates the part it owns.
At a group boundary, when slices were owned by different ranks, the state is all-gathered so
that every node holds the whole of it; then the node takes an in-memory `Snapshot` (it keeps
the last two: survivors of a failure may have finished different boundaries, and roll back
to the latest one they all hold). Re-slicing for a new membership therefore needs no state
transfer among survivors; a joining node receives weights and state by broadcast from rank 0.

Membership epochs: each epoch gets a fresh `Mesh` on the node's one listener; mesh
handshakes carry the epoch, and the listener admits only the current epoch's ranks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from p2pdl import kernels
from p2pdl.collectives.api import Collectives, choose_algorithm
from p2pdl.collectives.compute import Compute
from p2pdl.config import Timeouts
from p2pdl.errors import P2PDLError, PeerLostError, ProtocolError
from p2pdl.mesh import Listener, Mesh
from p2pdl.schedule.checkpoint import Snapshot
from p2pdl.schedule.job import Job
from p2pdl.schedule.plan import IterationGroup, StepPlan, sample_indices
from p2pdl.schedule.protocol import Channel
from p2pdl.schedule.task import OptimizerConfig, TaskContext, optimizer_step

log = logging.getLogger("p2pdl.schedule.worker")

TAIL = 4
"""In-band accounting slots after the gradient: sample count, index sum, loss sum, spare
(the same order as `ModelState.totals`)."""

KEEP_SNAPSHOTS = 2


class JobError(P2PDLError):
    """The job cannot go on (told by the leader, or the leader is gone)."""


# ------------------------------------------------------------------ membership epochs
# ------------------------------------------------------------------------- prefetching
class Prefetcher:
    """A background thread preparing the sample indices (and `task.prepare`) of coming steps."""

    def __init__(self, fn: Callable[[Any], Any], depth: int = 4) -> None:
        self._fn = fn
        self._depth = max(1, depth)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="p2pdl-prefetch")
        self._pending: collections.deque[tuple[Any, Any]] = collections.deque()
        self._ready: collections.deque[tuple[Any, Future[Any]]] = collections.deque()

    def extend(self, items: list[tuple[Any, Any]]) -> None:
        """Queue (key, argument) pairs, in the order they will be asked for."""
        self._pending.extend(items)
        self._fill()

    def _fill(self) -> None:
        while len(self._ready) < self._depth and self._pending:
            key, arg = self._pending.popleft()
            self._ready.append((key, self._pool.submit(self._fn, arg)))

    async def get(self, key: Any) -> Any:
        if not self._ready:
            self._fill()
        if not self._ready or self._ready[0][0] != key:
            raise RuntimeError(f"prefetch order broken: asked for {key}")
        _, future = self._ready.popleft()
        self._fill()
        if future.done():
            return future.result()
        return await asyncio.wrap_future(future)

    def clear(self) -> None:
        self._pending.clear()
        for _, future in self._ready:
            future.cancel()
        self._ready.clear()

    def close(self) -> None:
        self.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- model state
class ModelState:
    """The runtime-owned buffers of one node: weights, gradients, optimizer state, accounting."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.size = 0
        self.weights_ext = np.zeros(TAIL, np.float32)
        self.grads_ext: list[np.ndarray] = []
        self.opt = OptimizerConfig()
        self.state: dict[str, np.ndarray] = {}
        self.opt_steps = 0
        self.totals = np.zeros((job.epochs, 3), np.float64)
        self.next_step = 0
        self.snapshots: dict[int, Snapshot] = {}

    def allocate(
        self, ctx: TaskContext, initial: np.ndarray, opt: OptimizerConfig, replicas: int
    ) -> None:
        size = initial.size
        self.size = size
        self.opt = opt
        self.weights_ext = np.zeros(size + TAIL, np.float32)
        self.weights_ext[:size] = initial
        self.grads_ext = [np.zeros(size + TAIL, np.float32) for _ in range(replicas)]
        self.state = {name: np.zeros(size + TAIL, np.float32) for name in opt.state_names}
        ctx.weights = self.weights_ext[:size]
        ctx.grads = [g[:size] for g in self.grads_ext]

    @property
    def weights(self) -> np.ndarray:
        return self.weights_ext[: self.size]

    def weights_sha256(self) -> str:
        return hashlib.sha256(self.weights.tobytes()).hexdigest()

    # ------------------------------------------------------------------- the optimizer
    def apply(self, start: int, stop: int, grad: np.ndarray, lr: float) -> None:
        """Optimizer step on weights[start:stop] with the (already normalised) gradient."""
        st = {name: array[start:stop] for name, array in self.state.items()}
        optimizer_step(
            self.opt,
            self.weights_ext[start:stop],
            grad,
            lr=lr,
            steps_done=self.opt_steps,
            momentum=st.get("momentum"),
            exp_avg=st.get("exp_avg"),
            exp_avg_sq=st.get("exp_avg_sq"),
            max_exp_avg_sq=st.get("max_exp_avg_sq"),
        )

    def warm_kernels(self) -> int:
        """Run every kernel a step can use once, on scratch arrays; returns how many calls.

        A process's first call of a kernel costs ~0.3 s even when Numba's on-disk cache holds
        it (LLVM start-up), and seconds when it must compile. Paid here, during setup, it
        stays out of the first group (it used to make group 0 ten times slower than the
        rest) and out of the leader's timings.
        """
        n = 8
        dtype = self.weights_ext.dtype
        modes = [False, True] if self.weights_ext.size >= kernels.parallel_threshold() else [False]
        dst, src = np.zeros(n, dtype), np.ones(n, dtype)
        calls = 0
        for parallel in modes:
            kernels.add_(dst, src, parallel=parallel)
            kernels.scale_(dst, 1.0, parallel=parallel)
            calls += 2
            for count in range(1, 6):  # the fixed-arity kernels and the general one
                kernels.sum_into(dst, [dst] + [src] * count, parallel=parallel)
                head = np.zeros(n, dtype)
                kernels.sum_into(head, [src] * (count + 1), parallel=parallel)
                calls += 2
        state = {name: np.zeros(n, dtype) for name in self.state}
        for steps_done in (0, 1):
            optimizer_step(
                self.opt,
                dst,
                src,
                lr=0.0,
                steps_done=steps_done,
                momentum=state.get("momentum"),
                exp_avg=state.get("exp_avg"),
                exp_avg_sq=state.get("exp_avg_sq"),
                max_exp_avg_sq=state.get("max_exp_avg_sq"),
            )
            calls += 1
        return calls

    # -------------------------------------------------------------------- snapshots
    def snapshot(self) -> Snapshot:
        snap = Snapshot(
            step=self.next_step,
            weights=self.weights.copy(),
            state={name: array[: self.size].copy() for name, array in self.state.items()},
            opt_steps=self.opt_steps,
            totals=self.totals.copy(),
        )
        self.snapshots[snap.step] = snap
        for old in sorted(self.snapshots)[:-KEEP_SNAPSHOTS]:
            del self.snapshots[old]
        return snap

    def restore(self, snap: Snapshot) -> None:
        if snap.weights.size != self.size or set(snap.state) != set(self.state):
            raise JobError(
                f"snapshot of step {snap.step} does not fit this model "
                f"({snap.weights.size} weights, state {sorted(snap.state)}; "
                f"model has {self.size}, {sorted(self.state)})"
            )
        self.weights_ext[: self.size] = snap.weights
        for name, array in self.state.items():
            array[: self.size] = snap.state[name]
        self.opt_steps = snap.opt_steps
        self.totals[...] = snap.totals
        self.next_step = snap.step

    def restore_step(self, step: int) -> None:
        snap = self.snapshots.get(step)
        if snap is None:
            raise JobError(
                f"cannot roll back to step {step}: this node holds snapshots of steps "
                f"{sorted(self.snapshots)}"
            )
        self.restore(snap)
        for later in [s for s in self.snapshots if s > step]:
            del self.snapshots[later]

    def meta_array(self) -> np.ndarray:
        """Scalars and accounting as one float64 array (for the join broadcast)."""
        return np.concatenate(
            [np.array([self.next_step, self.opt_steps], np.float64), self.totals.reshape(-1)]
        )

    def load_meta_array(self, meta: np.ndarray) -> None:
        self.next_step = int(meta[0])
        self.opt_steps = int(meta[1])
        self.totals[...] = meta[2:].reshape(self.totals.shape)


# ------------------------------------------------------------------------------ worker
class Worker:
    """One node's training loop, driven by the leader's control messages."""

    def __init__(
        self,
        *,
        task: Any,
        ctx: TaskContext,
        model: ModelState,
        job: Job,
        listener: Listener,
        channel: Channel,
        timeouts: Timeouts,
        leader_timeout: float | None,
        stall_timeout: float,
        prefetch_depth: int = 4,
        on_ready: Callable[[int], None] | None = None,
        on_boundary: Callable[[Snapshot, int], Any] | None = None,
    ) -> None:
        self.task = task
        self.ctx = ctx
        self.model = model
        self.job = job
        self.listener = listener
        self.channel = channel
        self.timeouts = timeouts
        self.leader_timeout = leader_timeout
        self.stall_timeout = stall_timeout
        self.on_ready = on_ready
        self.on_boundary = on_boundary
        self.epoch = -1
        self.rank = -1
        self.world_size = 0
        self.peers: list[tuple[str, int]] = []
        self.mesh: Mesh | None = None
        self.collectives: Collectives | None = None
        self.compute: Compute | None = None
        self._sync = False
        self._direct = True
        self._groups: asyncio.Queue[IterationGroup] = asyncio.Queue()
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
        self._inv_batch = 1.0
        self._lr = 0.0

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
                elif kind == "connect":
                    await self._on_connect(message)
                elif kind == "start":
                    await self._on_start(message)
                elif kind == "abort":
                    await self._halt()
                    await self.channel.send(
                        {
                            "k": "aborted",
                            "epoch": message["epoch"],
                            "snapshots": sorted(self.model.snapshots),
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
        if self.mesh is not None:
            await self.mesh.close()
            self.mesh = None
        if self.collectives is not None:
            self.collectives.close()
        if self.compute is not None:
            self.compute.close()

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
        await self._halt()
        if self.mesh is not None:
            await self.mesh.close()
            self.mesh = None
        if self.collectives is not None:
            self.collectives.close()  # its segments and its compute thread
            self.collectives = None
        if self.compute is not None:
            self.compute.close()
            self.compute = None
        if message["restore"] is not None:
            self.model.restore_step(message["restore"])
        peers = message["peers"]
        self.epoch = message["epoch"]
        self.rank = message["rank"]
        self.world_size = len(peers)
        self.peers = [(str(h), int(p)) for h, p in peers]
        self._sync = message["sync"]
        self.ctx.rank, self.ctx.world_size = self.rank, self.world_size
        self.listener.prepare(self.epoch, self.rank, self.world_size)
        await self.channel.send({"k": "prepared", "epoch": self.epoch})

    async def _on_connect(self, message: dict[str, Any]) -> None:
        """Build this epoch's mesh; no data flows on it until the leader says start."""
        if message["epoch"] != self.epoch:
            return
        try:
            mesh = Mesh(self.rank, self.peers, self.listener, self.timeouts, epoch=self.epoch)
            self.mesh = mesh
            await mesh.connect()
        except P2PDLError as exc:
            await self._report_failure("connect", exc)
            return
        self.compute = Compute()
        self.collectives = Collectives(
            mesh,
            timeout=self.timeouts.operation,
            compute=self.compute,
            host_ids=[host for host, _port in self.peers],
        )
        try:
            if self.collectives.one_host:  # every member probes here, at the same point
                await self.collectives.shm_usable()
        except P2PDLError as exc:
            await self._report_failure("connect", exc)
            return
        nbytes = self.model.weights_ext.nbytes
        self._direct = choose_algorithm(nbytes, self.world_size) == "direct"
        await self.channel.send({"k": "connected", "epoch": self.epoch})

    async def _on_start(self, message: dict[str, Any]) -> None:
        """Every node is connected: synchronise state if asked, then train."""
        if message["epoch"] != self.epoch or self.collectives is None:
            return
        try:
            if self._sync:
                await self._sync_state()
                self.model.snapshot()
        except P2PDLError as exc:
            await self._report_failure("start", exc)
            return
        await self.channel.send({"k": "started", "epoch": self.epoch})
        if not self.ready_announced and self.on_ready is not None:
            self.ready_announced = True
            self.on_ready(self.rank)
        self._trainer = asyncio.ensure_future(self._train())

    async def _sync_state(self) -> None:
        """Everyone takes rank 0's weights, optimizer state and accounting (joins, start)."""
        coll = self.collectives
        assert coll is not None
        model = self.model
        await coll.broadcast(model.weights_ext, root=0)
        for name in sorted(model.state):
            await coll.broadcast(model.state[name], root=0)
        meta = model.meta_array()
        await coll.broadcast(meta, root=0)
        model.load_meta_array(meta)

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

    # --------------------------------------------------------------------- training
    def _on_group(self, message: dict[str, Any]) -> None:
        group = IterationGroup.from_wire(message["plan"], rank=0)
        if group.epoch != self.epoch or self._trainer is None:
            return  # planned for a membership this node has left: the leader re-plans
        if group.world_size != self.world_size:
            raise ProtocolError(
                f"group {group.group_id} planned for {group.world_size} ranks, "
                f"epoch {self.epoch} has {self.world_size}",
                rank=0,
            )
        self._groups.put_nowait(group)
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
                group = await self._groups.get()
                wait = loop.time() - waited_from
                await self._run_group(group, wait)
        except asyncio.CancelledError:
            raise
        except P2PDLError as exc:
            self._progress = None
            await self._report_failure("step", exc)

    async def _run_group(self, group: IterationGroup, wait: float) -> None:
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
            batches = await self._prefetch.get((group.group_id, "all"))
        for k, plan in enumerate(group.steps):
            if batches is not None:
                samples, prepared = batches[k]
            else:
                ((samples, prepared),) = await self._prefetch.get((group.group_id, k))
            t0 = loop.time()
            self._progress = (self.epoch, plan.step, "compute", t0)
            await self._compute(plan, samples, prepared)
            t1 = loop.time()
            self._progress = (self.epoch, plan.step, "allreduce", t1)
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
        if not self._direct and model.state:
            assert self.collectives is not None
            for name in sorted(model.state):
                await self.collectives.allgather(model.state[name])
        snap = model.snapshot()
        if self.on_boundary is not None:
            self.on_boundary(snap, group.group_id)
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
        coll = self.collectives
        assert coll is not None
        model = self.model
        self._inv_batch = 1.0 / max(1, plan.batch)
        self._lr = plan.lr
        grads = model.grads_ext
        if self._direct:
            await coll.allreduce(
                grads if len(grads) > 1 else grads[0],
                algorithm="direct",
                on_slice=self._on_slice,
                local_copies=False,
            )
            return
        # One sliced allreduce: each owner updates every reduced chunk of its slice and puts
        # the new weights in its place, so sharing starts chunk by chunk and what every rank
        # gathers is the new weights.
        await coll.allreduce(
            grads if len(grads) > 1 else grads[0],
            # One host: shared memory when every member could map it (auto falls back to
            # sliced, for all members at once, if /dev/shm runs out). Otherwise BigDL's sliced.
            algorithm="auto" if coll.one_host else "sliced",
            on_chunk=self._on_chunk,
            local_copies=False,
        )
        np.copyto(model.weights_ext, grads[0])

    def _on_chunk(self, start: int, stop: int, reduced: np.ndarray) -> None:
        self._on_slice(start, stop, reduced)
        reduced[:] = self.model.weights_ext[start:stop]

    def _on_slice(self, start: int, stop: int, reduced: np.ndarray) -> None:
        """The owner's optimizer step: new weights land in the weight buffer's slice."""
        model = self.model
        n = model.size
        hi = min(stop, n)
        if start < hi:
            grad = reduced[: hi - start]
            kernels.scale_(grad, self._inv_batch)
            model.apply(start, hi, grad, self._lr)
        if stop > n:
            lo = max(start, n)
            model.weights_ext[lo:stop] = reduced[lo - start : stop - start]

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


def monotonic() -> float:
    return time.monotonic()

"""The runtime-owned model of one node: weights, gradients, sharded optimizer state, boundaries.

A task trains on views of these buffers (`ctx.weights`, `ctx.grads`). The weight and
gradient buffers carry `TAIL` extra elements after the model: the step's in-band accounting
(sample count, sample-index sum, loss sum) rides in the gradient's allreduce and lands in
the weight buffer's tail, so it is rolled back with the weights.

Optimizer state is kept only for the range this node owns (`ShardedUpdate`). At each group
boundary the node keeps a `Boundary`: the weights, its own state piece, and the replica of
its predecessor's piece (handed over at the boundary) — enough for the survivors of any one
lost node to rebuild the whole state (see `decisions.choose_rollback`). The last
`KEEP_BOUNDARIES` are kept: survivors of a failure may have finished different boundaries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from p2pdl import kernels
from p2pdl.collectives.sharded import OptimizerConfig, ShardedUpdate, optimizer_step
from p2pdl.schedule.checkpoint import Snapshot
from p2pdl.schedule.decisions import Holding, Piece
from p2pdl.schedule.errors import JobError
from p2pdl.schedule.job import Job

__all__ = ["KEEP_BOUNDARIES", "TAIL", "Boundary", "ModelState", "StatePiece"]

TAIL = 4
"""In-band accounting slots after the gradient: sample count, index sum, loss sum, spare
(the same order as `ModelState.totals`)."""

KEEP_BOUNDARIES = 2


@dataclass(frozen=True, slots=True)
class StatePiece:
    """State elements [start, stop) of every state buffer (arrays of stop - start)."""

    start: int
    stop: int
    arrays: Mapping[str, np.ndarray]


@dataclass(slots=True)
class Boundary:
    """What a node keeps of the boundary at global step `step` (see the module docstring)."""

    step: int
    weights: np.ndarray
    opt_steps: int
    totals: np.ndarray
    pieces: dict[str, StatePiece] = field(default_factory=dict)
    """By source: "own", "replica" (the predecessor's own piece), "full" (a checkpoint)."""

    def holding(self) -> Holding:
        return Holding(
            self.step,
            tuple(Piece(p.start, p.stop, source) for source, p in self.pieces.items()),
        )


class ModelState:
    """The buffers of one node and their history (see the module docstring)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.size = 0
        self.weights_ext = np.zeros(TAIL, np.float32)
        self.grads_ext: list[np.ndarray] = []
        self.opt = OptimizerConfig()
        self.update = ShardedUpdate(self.opt, self.weights_ext[:0])
        self.opt_steps = 0
        self.totals = np.zeros((job.epochs, 3), np.float64)
        self.next_step = 0
        self.boundaries: dict[int, Boundary] = {}

    def allocate(self, ctx: Any, initial: np.ndarray, opt: OptimizerConfig, replicas: int) -> None:
        size = initial.size
        self.size = size
        self.opt = opt
        self.weights_ext = np.zeros(size + TAIL, np.float32)
        self.weights_ext[:size] = initial
        self.grads_ext = [np.zeros(size + TAIL, np.float32) for _ in range(replicas)]
        self.update = ShardedUpdate(opt, self.weights_ext[:size])
        ctx.weights = self.weights_ext[:size]
        ctx.grads = [g[:size] for g in self.grads_ext]

    @property
    def weights(self) -> np.ndarray:
        return self.weights_ext[: self.size]

    @property
    def has_state(self) -> bool:
        return bool(self.opt.state_names)

    def weights_sha256(self) -> str:
        return hashlib.sha256(self.weights.tobytes()).hexdigest()

    def warm_kernels(self) -> int:
        """Run every kernel a step can use once, on scratch arrays; returns how many calls.

        A process's first call of a kernel costs ~0.3 s even when Numba's on-disk cache holds
        it (LLVM start-up), and seconds when it must compile. Paid here, during setup, it
        stays out of the first group and out of the leader's timings.
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
        state = {name: np.zeros(n, dtype) for name in self.opt.state_names}
        for steps_done in (0, 1):
            optimizer_step(self.opt, dst, src, lr=0.0, steps_done=steps_done, state=state)
            calls += 1
        return calls

    # ------------------------------------------------------------------ boundaries
    def own_piece(self) -> StatePiece:
        """A copy of this node's own state piece."""
        start, stop = self.update.range or (0, 0)
        return StatePiece(start, stop, {k: v.copy() for k, v in self.update.state.items()})

    def begin_boundary(self) -> Boundary:
        """The boundary at `next_step` with this node's own state piece (not kept yet: the
        replica is added first, then `keep`)."""
        return Boundary(
            step=self.next_step,
            weights=self.weights.copy(),
            opt_steps=self.opt_steps,
            totals=self.totals.copy(),
            pieces={"own": self.own_piece()} if self.has_state else {},
        )

    def keep(self, boundary: Boundary) -> None:
        """Remember `boundary` (the newest `KEEP_BOUNDARIES` are kept)."""
        self.boundaries[boundary.step] = boundary
        for old in sorted(self.boundaries)[:-KEEP_BOUNDARIES]:
            del self.boundaries[old]

    def holdings(self) -> list[Holding]:
        return [self.boundaries[step].holding() for step in sorted(self.boundaries)]

    def restore_step(self, step: int) -> Boundary:
        """Weights, accounting and step count of the boundary at `step`; later ones go."""
        boundary = self.boundaries.get(step)
        if boundary is None:
            raise JobError(
                f"cannot roll back to step {step}: this node holds the boundaries of steps "
                f"{sorted(self.boundaries)}"
            )
        self.weights_ext[: self.size] = boundary.weights
        self.opt_steps = boundary.opt_steps
        self.totals[...] = boundary.totals
        self.next_step = boundary.step
        for later in [s for s in self.boundaries if s > step]:
            del self.boundaries[later]
        return boundary

    def restore_checkpoint(self, snap: Snapshot) -> None:
        """Start from a checkpoint: its weights and accounting here, its full optimizer state
        kept as the "full" piece of the boundary it starts at (handed out at the first
        epoch's assembly)."""
        if snap.weights.size != self.size or set(snap.state) != set(self.opt.state_names):
            raise JobError(
                f"the checkpoint of step {snap.step} does not fit this model "
                f"({snap.weights.size} weights, state {sorted(snap.state)}; the model has "
                f"{self.size}, {sorted(self.opt.state_names)})"
            )
        self.weights_ext[: self.size] = snap.weights
        self.opt_steps = snap.opt_steps
        self.totals[...] = snap.totals
        self.next_step = snap.step
        self.boundaries = {
            snap.step: Boundary(
                step=snap.step,
                weights=snap.weights.copy(),
                opt_steps=snap.opt_steps,
                totals=snap.totals.copy(),
                pieces={"full": StatePiece(0, self.size, dict(snap.state))} if snap.state else {},
            )
        }

    def contribution(self, step: int, pieces: list[Piece]) -> dict[str, np.ndarray]:
        """Full-length zeroed state buffers holding `pieces` of boundary `step` (what this
        node adds to the state assembly)."""
        out = {name: np.zeros(self.size, np.float32) for name in self.opt.state_names}
        if not pieces:
            return out
        boundary = self.boundaries.get(step)
        if boundary is None:
            raise JobError(f"asked for the state of step {step}, which this node does not hold")
        for piece in pieces:
            held = boundary.pieces.get(piece.source)
            if held is None or not held.start <= piece.start <= piece.stop <= held.stop:
                raise JobError(
                    f"asked for {piece.source} state [{piece.start}, {piece.stop}) of step "
                    f"{step}, which this node does not hold"
                )
            for name in out:
                source = held.arrays[name]
                out[name][piece.start : piece.stop] = source[
                    piece.start - held.start : piece.stop - held.start
                ]
        return out

    def snapshot(self, full_state: Mapping[str, np.ndarray]) -> Snapshot:
        """The checkpoint form of the current state (`full_state`: every range gathered)."""
        return Snapshot(
            step=self.next_step,
            weights=self.weights.copy(),
            state={k: np.asarray(v, np.float32).copy() for k, v in full_state.items()},
            opt_steps=self.opt_steps,
            totals=self.totals.copy(),
        )

    def meta_array(self) -> np.ndarray:
        """Scalars and accounting as one float64 array (for the join broadcast)."""
        return np.concatenate(
            [np.array([self.next_step, self.opt_steps], np.float64), self.totals.reshape(-1)]
        )

    def load_meta_array(self, meta: np.ndarray) -> None:
        self.next_step = int(meta[0])
        self.opt_steps = int(meta[1])
        self.totals[...] = meta[2:].reshape(self.totals.shape)

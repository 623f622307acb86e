"""The sharded step with 8-bit wire compression and error feedback (`compression="int8-ef"`).

Across hosts the gradient's bytes are the step, so both halves of the sliced AllReduce move
int8 codes with one float32 scale per block (`kernels.quant`, 3.98x fewer bytes):

1. **Reduce-scatter.** Every rank quantises its piece of each peer's slice plus its residual
   (what earlier calls could not carry: error feedback, kept by the sender, where the
   compression happens) and sends the codes. The owner sums its own piece exactly and the
   dequantised pieces of the others, in rank order.
2. **Owner update.** The optimizer runs on the owner's *master* copy of its weight range
   (float32, exact), never on the shared weights.
3. **All-gather of deltas.** The owner quantises `master - shared` for its range and every
   rank, the owner included, adds the dequantised delta to its shared weights. Every rank
   applies the same bytes with the same float32 arithmetic, so the shared weights stay
   bit-identical everywhere; what a delta could not carry is still in `master - shared` and
   goes out with the next one (the feedback of this half needs no extra state).

The shared weights are what the model computes with; they trail the master weights by at most
one quantisation step. Checkpoints hold the shared weights (a restart takes them as master).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from p2pdl import kernels
from p2pdl.collectives import timeline
from p2pdl.collectives.context import as_bytes, gather_all
from p2pdl.collectives.op import SUB_BITS, Operation
from p2pdl.collectives.plan import SlicePlan
from p2pdl.collectives.readiness import GradientReadiness
from p2pdl.kernels.quant import QBLOCK, wire_bytes

NAME = "int8-ef"
_GATHER_SUB = 1 << (SUB_BITS - 1)
"""Frame numbers of the all-gather half on a link (the reduce-scatter half counts from 0)."""


@dataclass
class Int8Feedback:
    """What int8-ef keeps between steps on one rank: the senders' residual (full length, only
    the pieces of other ranks' slices are used) and the owner's master weights."""

    size: int
    residual: np.ndarray = field(init=False)
    master: np.ndarray | None = None
    """Exact weights of the owned range (made from the shared weights on first use)."""

    def __post_init__(self) -> None:
        self.residual = np.zeros(self.size, np.float32)


def _pack(codes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Views of a packed chunk: its scales first (4-byte aligned), then its int8 codes."""
    blocks = -(-n // QBLOCK)
    scales = codes[: 4 * blocks].view(np.float32)
    return scales, codes[4 * blocks : 4 * blocks + n].view(np.int8)


async def sharded_step_int8(
    collectives: Any,
    grads: list[np.ndarray],
    weights: np.ndarray,
    update: Any,
    feedback: Int8Feedback,
    *,
    lr: float,
    steps_done: int,
    op: str,
    scale: float | None,
    timeout: float | None,
    ready: GradientReadiness | None = None,
) -> None:
    """One int8-ef sharded step (see the module docstring); `weights[update.size:]` (an
    accounting tail) is summed exactly by a small allreduce after it. With `ready` the step
    may start while backward still writes `grads[0]` (one local replica only)."""
    size = update.size
    if weights.dtype != np.float32 or grads[0].dtype != np.float32:
        raise TypeError("int8-ef compresses float32 gradients and weights")
    if feedback.size != size:
        raise ValueError(f"the int8-ef state is for {feedback.size} weights, not {size}")
    if ready is not None and len(grads) > 1:
        raise ValueError("a step that starts before backward ends takes one local replica")
    if len(grads) > 1:
        kernels.sum_into(grads[0], grads)
    buf = grads[0]
    n = collectives.group.world_size
    if ready is not None and (n == 1 or weights.size > size):
        await ready.wait(0, weights.size)  # nothing to overlap with, or the tail comes last
    tail = buf[size:].copy() if weights.size > size else None
    if n == 1:
        _reduce_alone(buf, weights, update, size, lr, steps_done, op, scale)
    else:
        plan = collectives.plan(size)
        lo, hi = plan.slices[collectives.group.rank]
        if update.range is None:
            update.own(lo, hi)
        if update.range != (lo, hi):
            raise RuntimeError(
                f"int8-ef owns {(lo, hi)} but the optimizer state is for {update.range}"
            )
        if feedback.master is None:
            feedback.master = weights[lo:hi].copy()
        descriptor = f"sharded_step({NAME}, float32[{size}], {op})"
        operation = Operation(
            collectives.group, "sharded_step", descriptor, collectives.deadline(timeout)
        )
        step = _Step(collectives, operation, plan, buf[:size], weights[:size], update, feedback)
        step.ready = ready
        await operation.run(lambda: step.run(lr, steps_done, op, scale))
    if tail is not None:
        await collectives.allreduce(tail, op="sum", algorithm="direct", timeout=timeout)
        weights[size:] = tail


def _reduce_alone(
    buf: np.ndarray, weights: np.ndarray, update: Any, size: int, lr: float, steps: int,
    op: str, scale: float | None,
) -> None:  # fmt: skip
    grad = buf[:size]
    if scale is not None:
        kernels.scale_(grad, scale)
    if update.range is None:
        update.own(0, size)
    update.update(0, size, grad, lr=lr, steps_done=steps)


class _Step:
    """One call's executor: posts every receive, sends, reduces, updates and shares."""

    def __init__(
        self,
        collectives: Any,
        op: Operation,
        plan: SlicePlan,
        grad: np.ndarray,
        weights: np.ndarray,
        update: Any,
        feedback: Int8Feedback,
    ) -> None:
        self.c = collectives
        self.op = op
        self.plan = plan
        self.grad = grad
        self.weights = weights
        self.update = update
        self.feedback = feedback
        self.rank = op.rank
        self.peers = op.peers
        self.ready: GradientReadiness | None = None
        """Set when the step starts before backward ends: chunks are read once backward has
        written them, last ones first (the order backward writes them)."""

    def order(self, chunks: tuple[tuple[int, int], ...]) -> list[tuple[int, tuple[int, int]]]:
        numbered = list(enumerate(chunks))
        return numbered[::-1] if self.ready is not None else numbered

    async def _written(self, a: int, b: int) -> None:
        if self.ready is not None:
            await self.ready.wait(a, b)

    async def run(self, lr: float, steps_done: int, op_name: str, scale: float | None) -> None:
        plan, rank, peers, op = self.plan, self.rank, self.peers, self.op
        own_lo, _own_hi = plan.slices[rank]
        own_chunks = plan.chunks[rank]
        # Every receive is posted before anything is sent.
        incoming = {
            p: [np.empty(wire_bytes(b - a), np.uint8) for a, b in own_chunks] for p in peers
        }
        arrivals = {
            p: [op.recv(p, c, as_bytes(incoming[p][c])) for c in range(len(own_chunks))]
            for p in peers
        }
        deltas = {
            p: [np.empty(wire_bytes(b - a), np.uint8) for a, b in plan.chunks[p]] for p in peers
        }
        delta_arrivals = {
            p: [
                op.recv(p, _GATHER_SUB + c, as_bytes(deltas[p][c]))
                for c in range(len(plan.chunks[p]))
            ]
            for p in peers
        }
        divisor = float(self.op.world_size) if op_name == "mean" else 1.0
        factor = (1.0 / divisor) * (1.0 if scale is None else scale)
        await gather_all(
            *(self._contribute(p) for p in peers),
            self._own(own_chunks, own_lo, arrivals, incoming, factor, lr, steps_done),
            *(self._apply(p, delta_arrivals[p], deltas[p]) for p in peers),
        )

    async def _contribute(self, peer: int) -> None:
        """Quantise (with feedback) and send this rank's piece of `peer`'s slice."""
        residual = self.feedback.residual
        with timeline.span("reduce-scatter (int8)", "network", self.rank, to=peer):
            await self._send_pieces(peer, residual)

    async def _send_pieces(self, peer: int, residual: np.ndarray) -> None:
        for c, (a, b) in self.order(self.plan.chunks[peer]):
            await self._written(a, b)
            packed = np.empty(wire_bytes(b - a), np.uint8)
            scales, codes = _pack(packed, b - a)
            await self.c.compute.run(
                b - a,
                lambda a=a, b=b, s=scales, q=codes: kernels.quantize_int8(
                    self.grad[a:b], q, s, residual=residual[a:b]
                ),
            )
            await self.op.send(peer, c, as_bytes(packed))

    async def _own(
        self,
        chunks: tuple[tuple[int, int], ...],
        own_lo: int,
        arrivals: dict[int, list[asyncio.Future[Any]]],
        incoming: dict[int, list[np.ndarray]],
        factor: float,
        lr: float,
        steps_done: int,
    ) -> None:
        """Reduce each owned chunk in rank order, update the master copy, share the delta."""
        master = self.feedback.master
        assert master is not None
        for c, (a, b) in self.order(chunks):
            await self._written(a, b)
            with timeline.span("wait for peers", "wait", self.rank, chunk=c):
                await gather_all(*(arrivals[p][c] for p in self.peers))
            packed = np.empty(wire_bytes(b - a), np.uint8)

            def reduce_update_encode(
                a: int = a, b: int = b, c: int = c, packed: np.ndarray = packed
            ) -> None:
                acc = np.zeros(b - a, np.float32)
                for r in range(self.op.world_size):
                    if r == self.rank:
                        acc += self.grad[a:b]
                    else:
                        s, q = _pack(incoming[r][c], b - a)
                        kernels.dequantize_int8(acc, q, s, accumulate=True)
                if factor != 1.0:
                    kernels.scale_(acc, factor)
                mine = master[a - own_lo : b - own_lo]
                self.update.update(a, b, acc, lr=lr, steps_done=steps_done, weights=mine)
                shared = self.weights[a:b]
                delta = mine - shared
                s, q = _pack(packed, b - a)
                kernels.quantize_int8(delta, q, s)
                kernels.dequantize_int8(shared, q, s, accumulate=True)

            with timeline.span("owner update + int8 delta", "compute", self.rank, chunk=c):
                await self.c.compute.run(4 * (b - a), reduce_update_encode)
            for p in self.peers:
                await self.op.send(p, _GATHER_SUB + c, as_bytes(packed))

    async def _apply(
        self, peer: int, arrivals: list[asyncio.Future[Any]], deltas: list[np.ndarray]
    ) -> None:
        """Add `peer`'s dequantised weight deltas to the shared weights as they land."""
        with timeline.span("all-gather (int8 deltas)", "network", self.rank, source=peer):
            await self._apply_pieces(peer, arrivals, deltas)

    async def _apply_pieces(
        self, peer: int, arrivals: list[asyncio.Future[Any]], deltas: list[np.ndarray]
    ) -> None:
        for c, (a, b) in self.order(self.plan.chunks[peer]):
            await arrivals[c]
            s, q = _pack(deltas[c], b - a)
            await self.c.compute.run(
                b - a,
                lambda a=a, b=b, s=s, q=q: kernels.dequantize_int8(
                    self.weights[a:b], q, s, accumulate=True
                ),
            )

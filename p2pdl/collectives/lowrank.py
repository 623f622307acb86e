"""Low-rank gradient compression (PowerSGD, Vogels et al. 2019) with error feedback.

`compression="powersgd:rank=R"`. Each weight matrix's gradient ``M`` (rows x cols, plus this
rank's residual) is approximated by ``P @ Q.T``: every rank computes ``P = M @ Q``, the ranks
sum ``P`` (one allreduce, together with the small tensors, which go exact), orthonormalise it,
compute ``Q = M.T @ P`` and sum that (a second allreduce). ``P @ Q.T`` is then the same on
every rank, bit for bit (`kernels.lowrank` fixes every sum's order), so each rank applies the
same optimizer step to its replica of the weights and no weights travel at all. What the
shared basis misses of each rank's own gradient (``M - P @ P.T @ M``) stays in that rank's
residual and is added to its next gradient. ``Q`` is kept between steps (warm start).

Bytes per step per matrix: ``(rows + cols) * R`` float32 instead of ``rows * cols``; for
this project's language model at R = 4, about 1/70 of the gradient.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from p2pdl.collectives import timeline
from p2pdl.errors import ConfigError
from p2pdl.kernels import lowrank as kl

PREFIX = "powersgd"
_SPEC = re.compile(r"^powersgd(?::rank=(\d+))?$")
MAX_RANK = 64
Q_SEED = 0x5EED


@dataclass(frozen=True)
class LowRankSpec:
    """What `compression="powersgd:rank=R"` asks for."""

    rank: int = 4

    @classmethod
    def parse(cls, text: str) -> LowRankSpec:
        match = _SPEC.match(text)
        if match is None:
            raise ConfigError(f"compression {text!r}: expected 'powersgd' or 'powersgd:rank=R'")
        rank = int(match.group(1) or 4)
        if not 1 <= rank <= MAX_RANK:
            raise ConfigError(f"compression {text!r}: rank must be in 1..{MAX_RANK}")
        return cls(rank)


def is_lowrank(compression: str | None) -> bool:
    return compression is not None and compression.startswith(PREFIX)


@dataclass(frozen=True)
class Matrix:
    """A compressed gradient matrix: its place in the flat buffer and its shape."""

    offset: int
    rows: int
    cols: int

    @property
    def size(self) -> int:
        return self.rows * self.cols


def plan_matrices(
    shapes: Sequence[Sequence[int]], rank: int
) -> tuple[list[Matrix], list[tuple[int, int]]]:
    """Which tensors of a flat buffer (laid out in `shapes` order) are compressed as matrices
    (2-D and more: rows = first dimension) and which ranges go exact (vectors, and matrices
    too small for rank `rank` to save bytes). Pure."""
    matrices: list[Matrix] = []
    exact: list[tuple[int, int]] = []
    offset = 0
    for shape in shapes:
        n = math.prod(shape)
        if len(shape) >= 2 and n:
            rows, cols = int(shape[0]), n // int(shape[0])
            if (rows + cols) * rank < rows * cols:
                matrices.append(Matrix(offset, rows, cols))
                offset += n
                continue
        if n:
            if exact and exact[-1][1] == offset:
                exact[-1] = (exact[-1][0], offset + n)
            else:
                exact.append((offset, offset + n))
        offset += n
    return matrices, exact


@dataclass
class LowRankState:
    """One rank's PowerSGD state for one flat gradient: plan, warm-start Qs, residual."""

    spec: LowRankSpec
    size: int
    shapes: tuple[tuple[int, ...], ...]
    matrices: list[Matrix] = field(init=False)
    exact: list[tuple[int, int]] = field(init=False)
    residual: np.ndarray = field(init=False)
    qs: list[np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        total = sum(math.prod(s) for s in self.shapes)
        if total != self.size:
            raise ValueError(f"the shapes hold {total} elements, the weights {self.size}")
        self.matrices, self.exact = plan_matrices(self.shapes, self.spec.rank)
        self.residual = np.zeros(self.size, np.float32)
        # Every rank starts from the same Q: PCG64's uniform doubles are stable across NumPy
        # versions (its normal variates are not promised to be).
        rng = np.random.Generator(np.random.PCG64(Q_SEED))
        r = self.spec.rank
        self.qs = [(2.0 * rng.random(m.cols * r) - 1.0).astype(np.float32) for m in self.matrices]

    @property
    def wire_elements(self) -> int:
        """float32 values each rank contributes per step (both allreduces)."""
        r = self.spec.rank
        return sum((m.rows + m.cols) * r for m in self.matrices) + sum(b - a for a, b in self.exact)


async def lowrank_reduce(
    collectives: Any,
    grad: np.ndarray,
    state: LowRankState,
    *,
    mean: bool,
    tail: int = 0,
    timeout: float | None = None,
) -> None:
    """Replace `grad[:state.size]` by the PowerSGD approximation of the ranks' summed (or,
    with `mean`, averaged) gradient — the same bits on every rank — and `grad[size:size+tail]`
    by the exact sum of those extra values (accounting)."""
    size, r = state.size, state.spec.rank
    if grad.dtype != np.float32:
        raise TypeError("powersgd compresses float32 gradients")
    rank = collectives.group.rank
    n = collectives.group.world_size
    g = grad[:size]
    compute = collectives.compute
    deadline = collectives.deadline(timeout)
    loop_time = asyncio.get_running_loop().time
    exact_len = sum(b - a for a, b in state.exact) + tail
    p_len = sum(m.rows * r for m in state.matrices)
    first = np.empty(p_len + exact_len, np.float32)
    second = np.empty(sum(m.cols * r for m in state.matrices), np.float32)

    def project_all() -> None:
        np.add(g, state.residual, out=g)
        at = 0
        for m, q in zip(state.matrices, state.qs, strict=True):
            kl.project(g[m.offset : m.offset + m.size], q, first[at : at + m.rows * r],
                       m.rows, m.cols, r)  # fmt: skip
            at += m.rows * r
        for a, b in state.exact:
            first[at : at + b - a] = g[a:b]
            at += b - a
        first[at:] = grad[size : size + tail]

    with timeline.span("powersgd project", "compression", rank):
        await compute.run(4 * size, project_all)
    with timeline.span("allreduce P", "collective", rank):
        await collectives.allreduce(first, op="sum", timeout=max(0.0, deadline - loop_time()))

    def back_project_all() -> None:
        at = bt = 0
        for m in state.matrices:
            p = first[at : at + m.rows * r]
            kl.orthonormalize(p, m.rows, r)
            kl.back_project(g[m.offset : m.offset + m.size], p, second[bt : bt + m.cols * r],
                            m.rows, m.cols, r)  # fmt: skip
            at += m.rows * r
            bt += m.cols * r

    with timeline.span("powersgd back-project", "compression", rank):
        await compute.run(4 * size, back_project_all)
    local_q = second.copy()  # this rank's own Q: its residual is what its own factors miss
    with timeline.span("allreduce Q", "collective", rank):
        await collectives.allreduce(second, op="sum", timeout=max(0.0, deadline - loop_time()))

    def expand_all() -> None:
        scale = np.float32(1.0 / n) if mean else np.float32(1.0)
        at = bt = 0
        approx = np.empty(max((m.size for m in state.matrices), default=0), np.float32)
        for i, m in enumerate(state.matrices):
            q = second[bt : bt + m.cols * r]
            p = first[at : at + m.rows * r]
            local = g[m.offset : m.offset + m.size]
            out = approx[: m.size]
            # Error feedback (Vogels et al., Algorithm 2): this rank keeps M_i - P P^T M_i,
            # what the shared basis misses of its own gradient; the ranks' residuals sum to
            # exactly what the step did not apply.
            kl.expand(p, local_q[bt : bt + m.cols * r], out, m.rows, m.cols, r)
            np.subtract(local, out, out=state.residual[m.offset : m.offset + m.size])
            kl.expand(p, q, out, m.rows, m.cols, r)
            if mean:
                out *= scale
            local[:] = out
            state.qs[i] = q.copy()  # warm start: the summed Q, the same on every rank
            at += m.rows * r
            bt += m.cols * r
        for a, b in state.exact:
            part = first[at : at + b - a]
            g[a:b] = part * scale if mean else part
            state.residual[a:b] = 0.0
            at += b - a
        grad[size : size + tail] = first[at:]

    with timeline.span("powersgd expand", "compression", rank):
        await compute.run(4 * size, expand_all)

"""Two executors every gather, scatter, all-to-all and rooted reduction is built from.

* `move`: each rank sends given buffers to given peers and receives given buffers from
  given peers, straight into place, in frames of at most `chunk_bytes`, all at once. A
  buffer of zero bytes still travels as one empty frame, so every pair that is meant to talk
  does, and a rank that disagrees (about sizes, roots, the call itself) meets the others'
  descriptors and fails with `CollectiveMismatchError` instead of going unnoticed.
* `reduce_from`: the same for contributions to a reduction: the receiver reduces each chunk,
  in rank order with its own contribution at its own rank's place, as soon as every source's
  part of that chunk has landed, into its output (which may be its own input).

The callers (`api.py`) build the buffers from pure plans (`alltoall.plan_alltoall`, equal
parts); nothing here decides who sends what.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping, Sequence

import numpy as np

from p2pdl.collectives.context import ReduceContext, as_bytes, gather_all
from p2pdl.collectives.op import Operation
from p2pdl.collectives.plan import chunk_ranges

EMPTY = np.empty(0, np.uint8)
"""An empty frame: what a rank that has nothing to give sends, to be seen."""

HELLO_SUB = 1 << 23
"""Frame number of the empty frames the rooted collectives send besides their data."""
VERDICT_SUB = HELLO_SUB + 1
"""Frame number of the empty frame that says "everything you sent me matched"."""


def frames(size: int, chunk: int) -> tuple[tuple[int, int], ...]:
    """[0, size) in pieces of at most `chunk`; one empty piece for an empty buffer."""
    return chunk_ranges(0, size, max(1, chunk)) or ((0, 0),)


async def move(
    op: Operation,
    sends: Mapping[int, np.ndarray],
    recvs: Mapping[int, np.ndarray],
    chunk_bytes: int,
    *,
    sub: int = 0,
) -> None:
    """Send `sends[p]` to every p and receive `recvs[p]` from every p (flat uint8 views)."""
    arrivals = [
        op.recv(peer, sub + c, as_bytes(view[a:b]))
        for peer, view in recvs.items()
        for c, (a, b) in enumerate(frames(view.nbytes, chunk_bytes))
    ]

    async def send_to(peer: int, data: np.ndarray) -> None:
        for c, (a, b) in enumerate(frames(data.nbytes, chunk_bytes)):
            await op.send(peer, sub + c, as_bytes(data[a:b]))

    await gather_all(*arrivals, *(send_to(peer, data) for peer, data in sends.items()))


async def with_verdicts(
    op: Operation, work: Awaitable[None], *, to: Sequence[int], awaited: Sequence[int]
) -> None:
    """Run `work`, then tell the ranks in `to` that all they sent matched; return once
    every rank in `awaited` has said the same to this one.

    Where ranks agree pair by pair (each pair on its own sizes, or on a root), a rank that
    returned before another pair had found its disagreement would not see it; with the
    verdict it waits until its counterparts have checked everything (a rank that found a
    mismatch sends the abort instead, and every rank fails alike)."""
    arrivals = [op.recv(peer, VERDICT_SUB, None) for peer in awaited]
    try:
        await work
        for peer in to:
            await op.send(peer, VERDICT_SUB)
        await gather_all(*arrivals)
    finally:
        for arrival in arrivals:
            if not arrival.done():
                arrival.cancel()


async def reduce_from(
    ctx: ReduceContext,
    *,
    sends: Mapping[int, np.ndarray],
    sources: Sequence[int],
    own: np.ndarray | None,
    output: np.ndarray | None,
) -> None:
    """Send the contribution `sends[p]` to every p; reduce what every rank in `sources`
    sends this rank with `own` (in rank order) into `output`, chunk by chunk.

    With no `output` this rank only contributes. `output` may be `own` itself (in place);
    `ctx.buf` is not used. The mean's factor and `ctx.reduce_op` come from `ctx`.
    """
    chunks = frames(output.size if output is not None else 0, ctx.chunk_elems)
    pool = ctx.scratch
    held: list[np.ndarray] = []
    incoming: dict[int, np.ndarray] = {}
    arrivals: dict[int, list] = {}
    if output is not None:
        assert own is not None and own.size == output.size
        for peer in sources:
            raw = pool.take(output.nbytes)
            held.append(raw)
            landing = raw[: output.nbytes].view(output.dtype)
            incoming[peer] = landing
            arrivals[peer] = [
                ctx.op.recv(peer, c, as_bytes(landing[a:b])) for c, (a, b) in enumerate(chunks)
            ]
    order = sorted([*sources, ctx.rank])

    async def contribute(peer: int, data: np.ndarray) -> None:
        for c, (a, b) in enumerate(frames(data.size, ctx.chunk_elems)):
            await ctx.op.send(peer, c, as_bytes(data[a:b]))

    async def reduce_all() -> None:
        if output is None or own is None:
            return
        for c, (a, b) in enumerate(chunks):
            for peer in sources:
                await arrivals[peer][c]
            dst = output[a:b]
            mine = dst if own is output else own[a:b]  # the very view: the in-place kernels
            parts = [mine if r == ctx.rank else incoming[r][a:b] for r in order]
            await ctx.reduce_chunk(dst, parts)

    try:
        await gather_all(
            reduce_all(),
            *(contribute(peer, data) for peer, data in sends.items()),
            *(f for futures in arrivals.values() for f in futures),
        )
    finally:
        for raw in held:
            pool.give(raw)

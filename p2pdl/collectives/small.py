"""Latency-bound collectives: one message hop, no chunking, no pipelining.

* `allreduce_direct`: every rank sends its whole (small) buffer to every other rank and sums
  all of them in rank order, so every rank computes the same bits in one hop.
* `broadcast`: the root sends to everyone (small) or down a binomial tree (large).
* `barrier`: an empty frame to and from every rank.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from p2pdl.collectives.context import ReduceContext, as_bytes, gather_all
from p2pdl.collectives.op import Operation
from p2pdl.collectives.plan import binomial_children, binomial_parent, chunk_ranges


async def allreduce_direct(ctx: ReduceContext) -> None:
    buf, pool = ctx.buf, ctx.scratch
    wire = ctx.wire_dtype()
    compressed = ctx.compression is not None
    nbytes = buf.size * wire.itemsize
    held = {p: pool.take(nbytes) for p in ctx.peers}
    incoming = {p: raw[:nbytes].view(wire) for p, raw in held.items()}
    try:
        arrivals = [ctx.op.recv(p, 0, as_bytes(incoming[p])) for p in ctx.peers]
        if compressed:
            own16 = np.empty(buf.size, dtype=np.uint16)
            ctx.encode_round(buf, own16)  # our own share is rounded as everyone sees it
            payload = as_bytes(own16)
        else:
            payload = as_bytes(buf)
        # One small frame per peer: `send` returns at once unless the socket is full, so
        # sending in turn costs no task per peer (the receives are futures, filled by the
        # transport whatever this coroutine is doing).
        try:
            for p in ctx.peers:
                await ctx.op.send(p, 0, payload)
            await gather_all(*arrivals)
        except BaseException:
            for arrival in arrivals:
                arrival.cancel()
            raise
        if compressed:
            # Rank order with compressed peers: decode each into a float copy, then sum.
            decoded = {p: np.empty_like(buf) for p in ctx.peers}
            for p in ctx.peers:
                ctx.decode(incoming[p], decoded[p])
            sources = [buf if p == ctx.rank else decoded[p] for p in range(ctx.world_size)]
            saved, ctx.compression = ctx.compression, None
            try:
                await ctx.reduce_chunk(buf, sources)
            finally:
                ctx.compression = saved
        else:
            sources = [buf if p == ctx.rank else incoming[p] for p in range(ctx.world_size)]
            await ctx.reduce_chunk(buf, sources)
        if ctx.on_slice is not None:
            await ctx.finish_slice(0, buf.size)
    finally:
        for raw in held.values():
            pool.give(raw)


ACK_SUB = (1 << 23) - 1
"""Frame number of the acknowledgement every receiver sends the root."""


async def broadcast(op: Operation, buf: np.ndarray, root: int, chunk_elems: int) -> None:
    """Copy the root's `buf` into every rank's `buf`.

    Every receiver acknowledges to the root, and the root returns only once all have: ranks
    that disagree on the root (each believing it is the root, say) then meet each other's
    frames while their operation is still open, and fail with a mismatch error instead of
    returning different buffers.
    """
    n, rank = op.world_size, op.rank
    if n == 1:
        return
    flat = buf.reshape(-1).view(np.uint8)
    others = [p for p in range(n) if p != root]
    if rank == root:
        acks = [op.recv(p, ACK_SUB, None) for p in others]
    if flat.nbytes <= 256 * 1024 or n <= 3:
        if rank == root:
            await gather_all(*(op.send(p, 0, as_bytes(flat)) for p in others), *acks)
        else:
            await op.recv(root, 0, as_bytes(flat))
            await op.send(root, ACK_SUB)
        return
    chunks = chunk_ranges(0, flat.nbytes, max(chunk_elems, 1) * 4)
    children = binomial_children(rank, n, root)
    parent = binomial_parent(rank, n, root)
    await tree_forward(op, flat, parent, children, chunks, 0)
    if rank == root:
        await gather_all(*acks)
    else:
        await op.send(root, ACK_SUB)


async def tree_forward(
    op: Any,
    flat: np.ndarray,
    parent: int | None,
    children: tuple[int, ...],
    chunks: tuple[tuple[int, int], ...],
    base: int,
) -> None:
    """The way down a tree: receive each byte chunk of `flat` from `parent` straight into
    place (none at the root) and forward it to every child as soon as it has landed.
    Frames are numbered `base + chunk`."""
    arrivals = (
        [op.recv(parent, base + c, as_bytes(flat[a:b])) for c, (a, b) in enumerate(chunks)]
        if parent is not None
        else None
    )

    async def send_to(child: int) -> None:
        for c, (a, b) in enumerate(chunks):
            if arrivals is not None:
                await arrivals[c]
            await op.send(child, base + c, as_bytes(flat[a:b]))

    await gather_all(*(arrivals or []), *(send_to(child) for child in children))


async def barrier(op: Operation) -> None:
    """Return once every rank has entered the barrier."""
    peers = [p for p in range(op.world_size) if p != op.rank]
    await gather_all(*(op.recv(p, 0, None) for p in peers), *(op.send(p, 0) for p in peers))

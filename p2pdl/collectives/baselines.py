"""Baselines with the AllReduce API, for the scaling comparison the project is built on.

* `driver`: every rank sends its whole buffer to rank 0, which reduces and sends the result
  back to everyone — Spark's `reduce` with the driver in the middle; rank 0's link carries
  N copies, so time grows linearly with N.
* `tree`: a binomial-tree reduce to rank 0 then a tree broadcast — `treeAggregate`'s shape.
"""

from __future__ import annotations

import asyncio

import numpy as np

from p2pdl.collectives.context import ReduceContext, as_bytes
from p2pdl.collectives.plan import binomial_children, binomial_parent, chunk_ranges
from p2pdl.collectives.small import tree_forward

ROOT = 0


async def send_down(
    ctx: ReduceContext,
    parent: int | None,
    children: tuple[int, ...],
    chunks: tuple[tuple[int, int], ...],
    base: int,
) -> None:
    """The result's way down the tree: from `parent` into place (none at the root), and on
    to `children` chunk by chunk as it lands (`tree_forward`, the broadcast's way down)."""
    flat = ctx.buf.reshape(-1).view(np.uint8)
    item = ctx.buf.itemsize
    byte_chunks = tuple((a * item, b * item) for a, b in chunks)
    await tree_forward(ctx.op, flat, parent, children, byte_chunks, base)


async def reduce_up(
    ctx: ReduceContext, children: tuple[int, ...], parent: int | None, chunks
) -> None:
    """Sum this rank's buffer with its children's (rank order), passing chunks up early."""
    buf, pool = ctx.buf, ctx.scratch
    held = [pool.take(buf.nbytes) for _ in children]
    incoming = [raw[: buf.nbytes].view(buf.dtype) for raw in held]
    arrivals = [
        [ctx.op.recv(child, c, as_bytes(incoming[i][a:b])) for c, (a, b) in enumerate(chunks)]
        for i, child in enumerate(children)
    ]
    order = sorted([(ctx.rank, None), *((child, i) for i, child in enumerate(children))])
    try:
        for c, (a, b) in enumerate(chunks):
            await asyncio.gather(*(arrivals[i][c] for i in range(len(children))))
            dst = buf[a:b]
            sources = [dst if i is None else incoming[i][a:b] for _, i in order]
            if len(sources) > 1:
                await ctx.reduce_chunk(dst, sources, final=parent is None)
            elif parent is None:
                await ctx.reduce_chunk(dst, [dst], final=True)
            if parent is not None:
                await ctx.op.send(parent, c, as_bytes(dst))
    finally:
        for raw in held:
            pool.give(raw)


async def allreduce_driver(ctx: ReduceContext) -> None:
    n, rank = ctx.world_size, ctx.rank
    chunks = chunk_ranges(0, ctx.buf.size, ctx.chunk_elems)
    down = len(chunks)
    if rank == ROOT:
        children = tuple(range(1, n))
        await reduce_up(ctx, children, None, chunks)
        if ctx.on_slice is not None:
            await ctx.finish_slice(0, ctx.buf.size)
        await send_down(ctx, None, children, chunks, down)
    else:
        for c, (a, b) in enumerate(chunks):
            await ctx.op.send(ROOT, c, as_bytes(ctx.buf[a:b]))
        # The result lands where our contribution was; only post after it has been sent.
        await send_down(ctx, ROOT, (), chunks, down)


async def allreduce_tree(ctx: ReduceContext) -> None:
    n, rank = ctx.world_size, ctx.rank
    chunks = chunk_ranges(0, ctx.buf.size, ctx.chunk_elems)
    children = binomial_children(rank, n, ROOT)
    parent = binomial_parent(rank, n, ROOT)
    down = len(chunks)
    await reduce_up(ctx, children, parent, chunks)
    if parent is None and ctx.on_slice is not None:
        await ctx.finish_slice(0, ctx.buf.size)
    await send_down(ctx, parent, children, chunks, down)

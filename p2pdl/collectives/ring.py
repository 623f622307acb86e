"""Pipelined ring AllReduce: reduce-scatter then all-gather around the ring, chunk by chunk.

Each rank only talks to its two neighbours, so on networks where links (not the CPU) are the
bottleneck every link carries the minimum 2·S·(N−1)/N. A chunk is forwarded as soon as it has
been reduced, so the N−1 steps overlap instead of running one after another.
"""

from __future__ import annotations

import asyncio

import numpy as np

from p2pdl.collectives.context import ReduceContext, as_bytes, gather_all
from p2pdl.collectives.plan import (
    plan_slices,
    ring_allgather_order,
    ring_neighbours,
    ring_reduce_scatter_order,
)


async def allreduce_ring(ctx: ReduceContext) -> None:
    n, rank, buf = ctx.world_size, ctx.rank, ctx.buf
    plan = plan_slices(buf.size, n, ctx.chunk_elems)
    left, right = ring_neighbours(rank, n)
    rs_order = ring_reduce_scatter_order(rank, n)
    ag_order = ring_allgather_order(rank, n)
    wire = ctx.wire_dtype()
    compressed = ctx.compression is not None
    owned = (rank + 1) % n
    loop = asyncio.get_running_loop()
    ready = {
        s: [loop.create_future() for _ in plan.chunks[s]] for s in range(n)
    }  # ready[s][c]: chunk c of slice s may be sent on (reduced so far / received)
    for c in ready[rank]:
        c.set_result(None)

    max_slice = max(b - a for a, b in plan.slices)
    pool = ctx.scratch
    # One landing area per step: every receive is posted up front, and the left neighbour
    # may run a step ahead of us, so steps must not share scratch.
    held = [pool.take(max_slice * wire.itemsize) for _ in range(max(0, 2 * (n - 1)))]
    landing = [raw[: max_slice * wire.itemsize].view(wire) for raw in held]
    out16 = None
    if compressed:
        held.append(pool.take(2 * max_slice * 2))
        out16 = held[-1][: 2 * max_slice * 2].view(np.uint16)

    frames_per_step = max(len(c) for c in plan.chunks)

    def sub(phase: int, step: int, chunk: int) -> int:
        return (phase * (n - 1) + step) * frames_per_step + chunk

    # Post every receive up front: reduce-scatter chunks land in scratch, all-gather chunks
    # land in place (or in scratch to be decoded, when compressed).
    rs_arrivals: list[list[asyncio.Future]] = []
    for step, (_send, recv) in enumerate(rs_order):
        start = plan.slices[recv][0]
        target = landing[step]
        rs_arrivals.append(
            [
                ctx.op.recv(left, sub(0, step, c), as_bytes(target[a - start : b - start]))
                for c, (a, b) in enumerate(plan.chunks[recv])
            ]
        )
    ag_arrivals: list[list[asyncio.Future]] = []
    for step, (_send, recv) in enumerate(ag_order):
        start = plan.slices[recv][0]
        arrivals = []
        for c, (a, b) in enumerate(plan.chunks[recv]):
            if compressed:
                view = as_bytes(landing[n - 1 + step][a - start : b - start])
            else:
                view = as_bytes(buf[a:b])
            arrivals.append(ctx.op.recv(left, sub(1, step, c), view))
        ag_arrivals.append(arrivals)

    async def send_chunk(phase: int, step: int, slice_index: int, c: int, a: int, b: int) -> None:
        if out16 is None:
            await ctx.op.send(right, sub(phase, step, c), as_bytes(buf[a:b]))
            return
        start = plan.slices[slice_index][0]
        part = out16[(step % 2) * max_slice + a - start : (step % 2) * max_slice + b - start]
        ctx.encode(buf[a:b], part)
        await ctx.op.send(right, sub(phase, step, c), as_bytes(part))

    async def sender() -> None:
        for step, (send, _recv) in enumerate(rs_order):
            for c, (a, b) in enumerate(plan.chunks[send]):
                await ready[send][c]
                await send_chunk(0, step, send, c, a, b)
        for c in range(len(plan.chunks[owned])):
            await ag_ready[owned][c]
        for step, (send, _recv) in enumerate(ag_order):
            for c, (a, b) in enumerate(plan.chunks[send]):
                await ag_ready[send][c]
                await send_chunk(1, step, send, c, a, b)

    ag_ready = {s: [loop.create_future() for _ in plan.chunks[s]] for s in range(n)}

    async def receiver() -> None:
        last = len(rs_order) - 1
        for step, (_send, recv) in enumerate(rs_order):
            start = plan.slices[recv][0]
            for c, (a, b) in enumerate(plan.chunks[recv]):
                await rs_arrivals[step][c]
                dst = buf[a:b]
                incoming = landing[step][a - start : b - start]
                await ctx.reduce_chunk(dst, [dst, incoming], final=step == last)
                ready[recv][c].set_result(None)
        if ctx.on_slice is not None:
            await ctx.finish_slice(*plan.slices[owned])
        if compressed:
            staging = np.empty(max_slice, dtype=np.uint16)
            start = plan.slices[owned][0]
            for a, b in plan.chunks[owned]:
                ctx.encode_round(buf[a:b], staging[a - start : b - start])
        for c in ag_ready[owned]:
            c.set_result(None)
        for step, (_send, recv) in enumerate(ag_order):
            start = plan.slices[recv][0]
            for c, (a, b) in enumerate(plan.chunks[recv]):
                await ag_arrivals[step][c]
                if compressed:
                    ctx.decode(landing[n - 1 + step][a - start : b - start], buf[a:b])
                ag_ready[recv][c].set_result(None)

    try:
        await gather_all(sender(), receiver())
    finally:
        for raw in held:
            pool.give(raw)

"""BigDL's sliced AllReduce: all-to-all reduce-scatter to slice owners, then all-gather.

Rank j owns slice j. Every rank sends its piece of slice j straight to j in chunks; j sums
each chunk in rank order as soon as every contribution to it has landed, in whatever order
chunks complete (`SliceReducer` keeps the books), while later chunks are still arriving,
runs `on_slice` on the reduced slice, and sends the result to every rank, where it lands
directly in the caller's buffer. Each rank moves about
2·S·(N−1)/N bytes whatever N is, and no rank sits in the middle.
"""

from __future__ import annotations

import asyncio

import numpy as np

from p2pdl.collectives.context import ReduceContext, as_bytes, gather_all
from p2pdl.collectives.plan import SlicePlan, plan_slices
from p2pdl.collectives.reducer import SliceReducer


def _gather_sub(plan: SlicePlan, chunk: int) -> int:
    """Frame numbers on a link: reduce-scatter chunks first, then all-gather chunks."""
    return max(len(c) for c in plan.chunks) + chunk


async def reduce_scatter(ctx: ReduceContext, plan: SlicePlan, *, then_gather: bool) -> None:
    """Reduce-scatter (and, with `then_gather`, the all-gather that completes the allreduce)."""
    buf, rank, peers = ctx.buf, ctx.rank, ctx.peers
    own_start, own_stop = plan.slices[rank]
    own_chunks = plan.chunks[rank]
    wire = ctx.wire_dtype()
    compressed = ctx.compression is not None
    pool = ctx.scratch
    held: list[np.ndarray] = []

    def scratch(elems: int) -> np.ndarray:
        raw = pool.take(elems * wire.itemsize)
        held.append(raw)
        return raw[: elems * wire.itemsize].view(wire)

    own_len = own_stop - own_start
    incoming = {p: scratch(own_len) for p in peers}
    arrivals = {
        p: [
            ctx.op.recv(p, c, as_bytes(incoming[p][a - own_start : b - own_start]))
            for c, (a, b) in enumerate(own_chunks)
        ]
        for p in peers
    }
    # All-gather receives: uncompressed chunks land in place (the arrival futures are all
    # there is to wait for); compressed ones land in scratch and one task per peer decodes
    # them in order.
    gathered: list[asyncio.Future] = []
    decoders = []
    if then_gather:
        for p in peers:
            start, stop = plan.slices[p]
            landing = scratch(stop - start) if compressed else None
            chunk_arrivals = []
            for c, (a, b) in enumerate(plan.chunks[p]):
                if landing is not None:
                    view = as_bytes(landing[a - start : b - start])
                else:
                    view = as_bytes(buf[a:b])
                chunk_arrivals.append(ctx.op.recv(p, _gather_sub(plan, c), view))
            if landing is None:
                gathered.extend(chunk_arrivals)
            else:
                decoders.append(
                    _decode_arrivals(ctx, plan.chunks[p], chunk_arrivals, landing, start)
                )
    outgoing16 = scratch(plan.n - own_len) if compressed else None

    async def contribute(peer: int, offset: int) -> None:
        start, _stop = plan.slices[peer]
        for c, (a, b) in enumerate(plan.chunks[peer]):
            if outgoing16 is None:
                await ctx.op.send(peer, c, as_bytes(buf[a:b]))
            else:
                encoded = outgoing16[offset + a - start : offset + b - start]
                ctx.encode(buf[a:b], encoded)
                await ctx.op.send(peer, c, as_bytes(encoded))

    offsets: dict[int, int] = {}
    running = 0
    for p in peers:
        offsets[p] = running
        running += plan.slices[p][1] - plan.slices[p][0]

    own16 = scratch(own_len) if compressed and then_gather else None
    # Chunks of our slice become reducible in whatever order their last contribution lands;
    # each is reduced (and, with on_slice, updated) then published: `payloads[c]` holds what
    # to share, and every peer's queue gets `c`, so sharing follows completion order too.
    reducer = SliceReducer(len(own_chunks), peers)
    reducible: asyncio.Queue[int] = asyncio.Queue()
    for c in reducer.ready_at_start():
        reducible.put_nowait(c)

    def landed(peer: int, c: int, arrival: asyncio.Future) -> None:
        if not arrival.cancelled() and arrival.exception() is None and reducer.arrived(peer, c):
            reducible.put_nowait(c)

    for p in peers:
        for c, arrival in enumerate(arrivals[p]):
            arrival.add_done_callback(lambda f, p=p, c=c: landed(p, c, f))
    payloads: list[memoryview | None] = [None] * len(own_chunks)
    outboxes: dict[int, asyncio.Queue[int]] = (
        {p: asyncio.Queue() for p in peers} if then_gather else {}
    )

    def publish(c: int) -> None:
        a, b = own_chunks[c]
        if own16 is not None:
            part = own16[a - own_start : b - own_start]
            ctx.encode_round(buf[a:b], part)  # the owner too keeps the rounded value
            payloads[c] = as_bytes(part)
        else:
            payloads[c] = as_bytes(buf[a:b])
        for outbox in outboxes.values():
            outbox.put_nowait(c)

    async def share(peer: int) -> None:
        outbox = outboxes[peer]
        for _ in range(len(own_chunks)):
            c = await outbox.get()
            payload = payloads[c]
            assert payload is not None
            await ctx.op.send(peer, _gather_sub(plan, c), payload)

    # bf16 with nothing to run between reducing and sharing a chunk: add the last
    # contribution, scale and round to the shared words in one pass.
    fused = own16 is not None and ctx.compression == "bf16" and ctx.on_slice is None

    async def reduce_own() -> None:
        for _ in range(len(own_chunks)):
            c = await reducible.get()
            a, b = own_chunks[c]
            dst = buf[a:b]
            sources = [
                dst if p == rank else incoming[p][a - own_start : b - own_start]
                for p in range(ctx.world_size)
            ]
            if fused:
                assert own16 is not None
                part = own16[a - own_start : b - own_start]
                await ctx.reduce_chunk_encode_bf16(dst, sources, part)
                payloads[c] = as_bytes(part)
                for outbox in outboxes.values():
                    outbox.put_nowait(c)
                continue
            await ctx.reduce_chunk(dst, sources)
            if ctx.chunkwise:
                await ctx.finish_slice(a, b)  # an elementwise hook: run it piece by piece
            if then_gather and (ctx.on_slice is None or ctx.chunkwise):
                publish(c)
        if ctx.chunkwise:
            return
        if then_gather and ctx.on_slice is not None:
            await ctx.finish_slice(own_start, own_stop)
            for c in range(len(own_chunks)):
                publish(c)
        elif not then_gather:
            await ctx.finish_slice(own_start, own_stop)

    try:
        await gather_all(
            reduce_own(),
            *(contribute(p, offsets[p]) for p in peers),
            *((share(p) for p in peers) if then_gather else ()),
            *gathered,
            *decoders,
        )
    finally:
        for raw in held:
            pool.give(raw)


async def _decode_arrivals(
    ctx: ReduceContext,
    chunks: tuple[tuple[int, int], ...],
    arrivals: list[asyncio.Future],
    landing: np.ndarray,
    slice_start: int,
) -> None:
    """Decode one peer's compressed all-gather chunks into place as they land, in order."""
    for (a, b), arrival in zip(chunks, arrivals, strict=True):
        await arrival
        ctx.decode(landing[a - slice_start : b - slice_start], ctx.buf[a:b])


async def allreduce_sliced(ctx: ReduceContext) -> None:
    plan = plan_slices(ctx.buf.size, ctx.world_size, ctx.chunk_elems)
    await reduce_scatter(ctx, plan, then_gather=True)


async def allgather_slices(ctx: ReduceContext, plan: SlicePlan) -> None:
    """Every rank sends its own slice of `ctx.buf` to every other rank, into place."""
    rank, peers, buf = ctx.rank, ctx.peers, ctx.buf
    arrivals = [
        ctx.op.recv(p, c, as_bytes(buf[a:b]))
        for p in peers
        for c, (a, b) in enumerate(plan.chunks[p])
    ]

    async def send_to(peer: int) -> None:
        for c, (a, b) in enumerate(plan.chunks[rank]):
            await ctx.op.send(peer, c, as_bytes(buf[a:b]))

    await gather_all(*arrivals, *(send_to(p) for p in peers))

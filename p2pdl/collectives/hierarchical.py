"""Host-aware AllReduce: phase 1 across the processes of one host, phase 2 across hosts.

Ranks that share a host (the same `host_id`) first sum into their host's lowest rank over
the host's own loopback; those host leaders run BigDL's sliced AllReduce among themselves, so
only one copy of the buffer crosses each host's network link per direction; then every
leader hands the result back to its host's ranks. It is one operation: the three phases use
disjoint frame numbers of its tags, through `SubOperation` views over subsets of ranks.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from p2pdl.collectives.baselines import reduce_up, send_down
from p2pdl.collectives.context import ReduceContext
from p2pdl.collectives.op import Operation
from p2pdl.collectives.plan import chunk_ranges, plan_slices
from p2pdl.collectives.shm import ShmArena
from p2pdl.collectives.sliced import reduce_scatter
from p2pdl.errors import P2PDLError

PHASE_STRIDE = 1 << 22
"""Frame numbers of phase k start at k · PHASE_STRIDE (the op's tag space holds 2**24)."""


def host_groups(host_ids: Sequence[str]) -> list[list[int]]:
    """Ranks grouped by host, each group in rank order, groups ordered by their lowest rank."""
    groups: dict[str, list[int]] = {}
    for rank, host in enumerate(host_ids):
        groups.setdefault(host, []).append(rank)
    return sorted(groups.values(), key=lambda ranks: ranks[0])


def worth_it(host_ids: Sequence[str] | None) -> bool:
    """Hierarchy pays when there are several hosts and at least one runs several ranks."""
    if not host_ids:
        return False
    groups = host_groups(host_ids)
    return len(groups) > 1 and any(len(g) > 1 for g in groups)


class SubOperation:
    """An `Operation` seen by a subset of its ranks: local indices, shifted frame numbers."""

    def __init__(self, op: Operation, members: Sequence[int], phase: int) -> None:
        if op.rank not in members:
            raise ValueError(f"rank {op.rank} is not among {list(members)}")
        self.op = op
        self.members = list(members)
        self.offset = phase * PHASE_STRIDE
        self.rank = self.members.index(op.rank)
        self.world_size = len(self.members)

    def recv(self, peer: int, sub: int, view: memoryview | None) -> asyncio.Future[Any]:
        if sub >= PHASE_STRIDE:
            raise ValueError(f"frame number {sub} does not fit in one phase")
        return self.op.recv(self.members[peer], self.offset + sub, view)

    async def send(self, peer: int, sub: int, payload: memoryview | None = None) -> None:
        if sub >= PHASE_STRIDE:
            raise ValueError(f"frame number {sub} does not fit in one phase")
        await self.op.send(self.members[peer], self.offset + sub, payload)


async def allreduce_hierarchical(
    ctx: ReduceContext, host_ids: Sequence[str], arena: ShmArena | None = None
) -> None:
    """Phase 1 within each host, phase 2 across hosts' leaders, phase 3 back within hosts.

    With an `arena` whose host probe succeeded, phases 1 and 3 go through shared memory
    (`_within_host_shm`); otherwise over the host's loopback links.
    """
    op = ctx.op
    groups = host_groups(host_ids)
    local = next(g for g in groups if op.rank in g)
    leaders = [g[0] for g in groups]
    if arena is not None and arena.host_usable and len(local) > 1:
        async with arena.taking_turns(ctx.op):  # halves alternate per call: one at a time
            await _within_host_shm(ctx, arena, local, leaders)
        return
    is_leader = op.rank == local[0]
    chunks = chunk_ranges(0, ctx.buf.size, ctx.chunk_elems)
    # Sums stay plain until the very end: the mean's 1/N is the whole world's N.
    plain = dataclasses.replace(ctx, mean=False, on_slice=None, compression=None)

    # Phase 1: the host's ranks sum into its leader (rank order, chunk by chunk).
    up = dataclasses.replace(plain, op=SubOperation(op, local, 0))  # type: ignore[arg-type]
    children = tuple(range(1, len(local))) if is_leader else ()
    parent = None if is_leader else 0
    await reduce_up(up, children, parent, chunks)

    if is_leader:
        await _across_hosts(ctx, leaders, ctx.buf)
    # Phase 3: the leader hands the result to the host's other ranks.
    down = dataclasses.replace(plain, op=SubOperation(op, local, 2))  # type: ignore[arg-type]
    await send_down(down, parent, children, chunks, 0)


async def _across_hosts(ctx: ReduceContext, leaders: list[int], buf: np.ndarray) -> None:
    """Phase 2: the leaders run the sliced AllReduce on `buf` (owners run on_slice and the
    mean, whose 1/N is the whole world's N)."""
    op = ctx.op
    across = dataclasses.replace(
        ctx,
        buf=buf,
        op=SubOperation(op, leaders, 1),  # type: ignore[arg-type]
        mean=False,
        scale=1.0 / op.world_size if ctx.mean else None,
    )
    if len(leaders) > 1:
        plan = plan_slices(buf.size, len(leaders), ctx.chunk_elems)
        await reduce_scatter(across, plan, then_gather=True)
    else:
        await across.reduce_chunk(buf, [buf])
        await across.finish_slice(0, buf.size)


async def _within_host_shm(
    ctx: ReduceContext, arena: ShmArena, local: list[int], leaders: list[int]
) -> None:
    """Phases 1 and 3 through the host's shared memory.

    Every member copies its buffer into its segment and offers it to the leader ("in"); the
    leader sums them, in rank order, into its own segment, runs phase 2 there and offers it
    back ("out"); members copy the result out. No rank's buffer changes before every host
    has finished phase 1 (phase 2 needs every leader, and it works in the leader's segment),
    so a segment that cannot be reserved fails the call everywhere with nothing touched.
    """
    op, buf = ctx.op, ctx.buf
    parity = arena.calls % 2
    arena.calls += 1
    previous = arena.own
    own = arena.own_segment(buf.nbytes)  # SharedMemoryError here: nothing touched yet
    mine = own.half(parity, buf.dtype, buf.size)
    offer = memoryview(own.offer)
    up, down = SubOperation(op, local, 0), SubOperation(op, local, 2)
    serial = dataclasses.replace(
        ctx, mean=False, on_slice=None, compression=None, chunk_elems=max(1, buf.size)
    )
    if op.rank == local[0]:
        entered = [up.recv(i, 0, None) for i in range(1, len(local))]
        sources = [buf]
        for i, arrival in enumerate(entered, start=1):
            _header, payload = await arrival
            sources.append(await _map(arena, local[i], payload, parity, buf, op.deadline))
        # Every member is past the previous call: the segments they had to map are mapped.
        arena.withdraw_pending()
        await serial.reduce_chunk(mine, sources, final=False)
        await _across_hosts(ctx, leaders, mine)
        for i in range(1, len(local)):
            await down.send(i, 0, offer)
        await ctx.compute.run(buf.nbytes, lambda: np.copyto(buf, mine))
        if own is not previous:
            arena.withdraw_later(own)  # the members map it on this call's "out"
    else:
        result = down.recv(0, 0, None)
        await ctx.compute.run(buf.nbytes, lambda: np.copyto(mine, buf))
        await up.send(0, 0, offer)
        _header, payload = await result
        total = await _map(arena, local[0], payload, parity, buf, op.deadline)
        await ctx.compute.run(buf.nbytes, lambda: np.copyto(buf, total))
        own.withdraw()  # the leader mapped it before it summed


async def _map(
    arena: ShmArena, rank: int, payload: Any, parity: int, like: np.ndarray, deadline: float
) -> np.ndarray:
    """Half `parity` of `rank`'s segment as its offer `payload` names it (read-only)."""
    try:
        segment = await arena.peer_segment(rank, bytes(payload), deadline)
        return segment.half(parity, like.dtype, like.size)
    except (OSError, ValueError) as exc:
        raise P2PDLError(f"cannot map rank {rank}'s shared segment: {exc}") from None

"""Allreduce through shared memory when every rank runs on one host.

On one host, TCP costs two kernel copies per byte plus the loopback stack, and the four ranks
of a local cluster spend their cores on them. Here each rank owns one shared segment (a sealed
memfd, see `shmfd`) and the TCP links carry only two tiny frames per peer per call:

1. every rank copies its buffer into its segment and tells every peer ("in", with the
   segment's 64-byte offer, so peers fetch and map it once, and again only when it grows);
2. the owner of each slice (the same slices as `sliced`) sums that slice straight out of
   every rank's segment, in rank order, runs `on_slice`, writes the result back into the
   slice of its own segment, and tells every peer ("out");
3. every rank copies the other owners' results out of their segments.

Each segment has two halves used by alternate calls: a rank rewrites a half only after every
peer has entered the next call, i.e. has finished reading it. A segment is never a file: a
peer fetches its descriptor from the owner's fd server (an abstract Unix socket, one per
arena) with the offer's token, checks it (a memfd of the offered size, pages reserved, sealed
against shrinking and growing) and maps it read-only; only the owner maps its segment
writable. The owner withdraws a segment from its server as soon as every peer has mapped it
(after its first call), and the memory goes with the last mapping, so a killed process
leaves nothing behind. Deadlines, lost peers and mismatches are the operation's, as for every
other algorithm. `probe` checks once per group that every rank can fetch and map every other
rank's segment (not so across network namespaces, whose abstract sockets are apart, nor
between uids); `auto` uses this path only then.

Threat model: a segment is served only to a process of this uid that presents the random
token the owner sent over the authenticated, encrypted link, and no peer input is ever
opened as a path. Seals fix every segment's size, so no process can shrink what others map
(no SIGBUS), and a descriptor without them is refused before it is mapped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import mmap
import os
from collections.abc import Callable, Sequence

import numpy as np

from p2pdl.collectives.context import ReduceContext
from p2pdl.collectives.op import Operation
from p2pdl.collectives.plan import plan_slices
from p2pdl.collectives.shmfd import (
    OFFER_BYTES,
    FdServer,
    Offer,
    check,
    fetch,
    ident_of,
    sealed_memfd,
)
from p2pdl.errors import P2PDLError, SharedMemoryError

log = logging.getLogger("p2pdl.collectives")

_ALIGN = 64


class Segment:
    """One mapped segment: two halves of `half_bytes` each, read-only unless it is ours.

    `fd` stays open for this rank's own segments (its server hands out duplicates while
    the segment is offered); a peer's descriptor is closed once mapped.
    """

    def __init__(self, fd: int, size: int, *, writable: bool, label: str) -> None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        self.label = label
        self.size = size
        self.half_bytes = size // 2
        self.ident = b""
        """The segment's identity in its offers (peers' segments: to know it again)."""
        self.fd = -1
        self.id = 0
        self.offer = b""
        """This rank's own segment: the bytes its peers are told while it is offered."""
        self._server: FdServer | None = None

    @property
    def offered(self) -> bool:
        return self._server is not None

    def half(self, parity: int, dtype: np.dtype, count: int) -> np.ndarray:
        """The first `count` elements of half `parity`, as an array over the shared bytes."""
        nbytes = count * np.dtype(dtype).itemsize
        if nbytes > self.half_bytes:
            raise ValueError(f"{self.label} holds {self.half_bytes} bytes per half")
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=parity * self.half_bytes)

    def withdraw(self) -> None:
        """Stop serving this segment's descriptor (every peer that needs it has mapped it)."""
        if self._server is not None:
            self._server.withdraw(self.id)
            self._server = None

    def close(self) -> None:
        self.withdraw()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(BufferError):  # an array still views it: the GC unmaps it
            self._map.close()


class ShmArena:
    """This rank's own segment, its fd server, and the peers' segments it has mapped."""

    def __init__(self) -> None:
        self.own: Segment | None = None
        self.peers: dict[int, Segment] = {}
        self.calls = 0
        self.usable: bool | None = None
        """Whether every rank can map every other rank's segment (None: not probed yet)."""
        self.probing: asyncio.Future[bool] | None = None
        self.host_usable: bool | None = None
        """Whether the ranks of this rank's host can map each other's segments (for the
        hierarchical allreduce's phases within a host; None: not probed yet)."""
        self.host_probing: asyncio.Future[bool] | None = None
        self.pending: list[Segment] = []
        self.turn = asyncio.Lock()
        """One call at a time uses the segments, in call order (the halves alternate per
        call; two calls in flight at once, as DDP's buckets are, would share a half)."""
        self.server: FdServer | None = None
        """Serves this rank's offered segments (started with the first segment)."""
        self.make_fd: Callable[[int], int] = sealed_memfd
        """Makes a segment's memfd of the given size (a test swaps it to play a bad peer)."""
        self._ids = itertools.count(1)

    def own_segment(self, nbytes: int) -> Segment:
        """This rank's segment with at least `nbytes` per half (a new, larger one if needed),
        offered to its peers.

        Raises SharedMemoryError when the system cannot make or hold it; the old one stays.
        """
        old = self.own
        if old is not None and old.half_bytes >= nbytes:
            return old
        half = max(_ALIGN, -(-nbytes // _ALIGN) * _ALIGN)
        if old is not None:
            half = max(half, old.half_bytes * 2)  # grow geometrically
        self._fd_server()
        size = 2 * half
        fd = self.make_fd(size)
        try:
            segment = Segment(fd, size, writable=True, label=f"this rank's {size}-byte segment")
        except (OSError, ValueError) as exc:
            os.close(fd)
            raise SharedMemoryError(f"cannot map {size} bytes of shared memory: {exc}") from None
        segment.fd = fd
        segment.id = next(self._ids)
        self.offer(segment)
        self.own = segment
        if old is not None and old not in self.pending:
            old.close()  # (a pending one may still be fetched: `withdraw_pending` closes it)
        return segment

    def _fd_server(self) -> FdServer:
        if self.server is None:
            try:
                self.server = FdServer()
            except OSError as exc:
                raise SharedMemoryError(f"cannot serve shared segments: {exc}") from None
        return self.server

    def offer(self, segment: Segment) -> bytes:
        """The offer of our `segment`, served again under a fresh token if it was withdrawn
        (new peers need one to fetch it)."""
        if not segment.offered:
            server = self._fd_server()
            offer = server.offer(segment.id, segment.fd, segment.size)
            segment.offer, segment.ident = offer.pack(), offer.ident
            segment._server = server
        return segment.offer

    def withdraw_later(self, segment: Segment) -> None:
        """Withdraw `segment` at the next `withdraw_pending` (its peers map it after this
        call)."""
        self.pending.append(segment)

    def withdraw_pending(self) -> None:
        for segment in self.pending:
            if segment is self.own:
                segment.withdraw()
            else:
                segment.close()
        self.pending.clear()

    async def peer_segment(self, rank: int, data: bytes, deadline: float) -> Segment:
        """Peer `rank`'s segment as its offer `data` names it, mapped read-only on first
        sight (and again when it changes) once its descriptor has passed `shmfd.check`.

        Raises ValueError (a malformed offer, a refused or unfit descriptor) or OSError
        (the owner's server cannot be reached by `deadline`, loop time).
        """
        current = self.peers.get(rank)
        if current is not None and len(data) == OFFER_BYTES and current.ident == ident_of(data):
            return current
        offer = Offer.parse(data)
        fd = await fetch(offer, deadline)
        try:  # nothing awaits from here on: the descriptor is closed whatever happens
            check(fd, offer.size)
            segment = Segment(fd, offer.size, writable=False, label=f"rank {rank}'s segment")
        finally:
            os.close(fd)
        segment.ident = offer.ident
        previous = self.peers.get(rank)
        if previous is not None:
            previous.close()
        self.peers[rank] = segment
        return segment

    def close(self) -> None:
        """Close every segment and the fd server (the memory goes with the last mapping)."""
        for segment in self.pending:
            if segment is not self.own:
                segment.close()
        self.pending.clear()
        if self.own is not None:
            self.own.close()
            self.own = None
        for segment in self.peers.values():
            segment.close()
        self.peers.clear()
        if self.server is not None:
            self.server.close()
            self.server = None


async def probe(op: Operation, arena: ShmArena, members: Sequence[int] | None = None) -> bool:
    """Every rank of `members` (all ranks by default) fetches and maps every other member's
    segment; True on each of them iff all of them could. Ranks outside `members` take part
    in the operation (it keeps every rank's operation count) but exchange nothing."""
    group = list(range(op.world_size)) if members is None else list(members)
    peers = [p for p in group if p != op.rank]
    if op.rank not in group or not peers:
        return False
    try:
        offer = arena.offer(arena.own_segment(_ALIGN))
    except (OSError, SharedMemoryError) as exc:
        log.info("rank %d cannot offer a shared segment: %s", op.rank, exc)
        offer = b""
    offers = [op.recv(p, 0, None) for p in peers]
    for p in peers:
        await op.send(p, 0, memoryview(offer))
    mapped = bool(offer)
    for p, arrival in zip(peers, offers, strict=True):
        _header, payload = await arrival
        try:
            await arena.peer_segment(p, bytes(payload), op.deadline)
        except (OSError, ValueError) as exc:
            log.info("rank %d cannot map rank %d's shared segment: %s", op.rank, p, exc)
            mapped = False
    verdicts = [op.recv(p, 1, None) for p in peers]
    for p in peers:
        await op.send(p, 1, memoryview(b"\x01" if mapped else b"\x00"))
    everyone = mapped
    for arrival in verdicts:
        _header, payload = await arrival
        everyone = everyone and bytes(payload) == b"\x01"
    if arena.own is not None and everyone:
        arena.own.withdraw()  # every peer has mapped it
    return everyone


async def allreduce_shm(ctx: ReduceContext, arena: ShmArena) -> None:
    """Sum (or average) `ctx.buf` over ranks that share this host's memory."""
    async with arena.turn:  # FIFO: calls take their turns in call order on every rank
        await _allreduce_shm(ctx, arena)


async def _allreduce_shm(ctx: ReduceContext, arena: ShmArena) -> None:
    op, buf = ctx.op, ctx.buf
    n, rank, peers = ctx.world_size, ctx.rank, ctx.peers
    parity = arena.calls % 2
    arena.calls += 1
    own = arena.own_segment(buf.nbytes)
    mine = own.half(parity, buf.dtype, buf.size)
    # Receives first: a peer's frames find their futures whatever this coroutine is doing.
    entered = [op.recv(p, 0, None) for p in peers]
    reduced = [op.recv(p, 1, None) for p in peers]
    await ctx.compute.run(buf.nbytes, lambda: np.copyto(mine, buf))
    offer = memoryview(own.offer)
    for p in peers:
        await op.send(p, 0, offer)
    theirs: dict[int, np.ndarray] = {rank: mine}
    for p, arrival in zip(peers, entered, strict=True):
        _header, payload = await arrival
        try:
            segment = await arena.peer_segment(p, bytes(payload), op.deadline)
            theirs[p] = segment.half(parity, buf.dtype, buf.size)
        except (OSError, ValueError) as exc:
            raise P2PDLError(f"rank {rank} cannot map rank {p}'s shared segment: {exc}") from None
    # Single-threaded kernels: every rank sums its own slice at the same time, so the
    # cores are busy already (Numba's pool on top only oversubscribes them).
    ctx.chunk_elems = max(ctx.chunk_elems, buf.size)
    # The same slices as `sliced` and reduce_scatter/allgather: an owner's optimizer state
    # covers the same range whichever of them ran.
    bounds = plan_slices(buf.size, n, max(1, buf.size)).slices
    lo, hi = bounds[rank]
    if hi > lo:
        await ctx.reduce_chunk(buf[lo:hi], [theirs[p][lo:hi] for p in range(n)], final=True)
        await ctx.finish_slice(lo, hi)
        result, shared = buf[lo:hi], mine[lo:hi]
        await ctx.compute.run(result.nbytes, lambda: np.copyto(shared, result))
    for p in peers:
        await op.send(p, 1)
    for p, arrival in zip(peers, reduced, strict=True):
        await arrival
        a, b = bounds[p]
        if b > a:
            source, target = theirs[p][a:b], buf[a:b]
            await ctx.compute.run(target.nbytes, lambda s=source, t=target: np.copyto(t, s))
    own.withdraw()  # every peer has mapped it (they said "out" after mapping)

"""Allreduce through shared memory when every rank runs on one host.

On one host, TCP costs two kernel copies per byte plus the loopback stack, and the four ranks
of a local cluster spend their cores on them. Here each rank owns one shared segment (a file
in `/dev/shm`, mode 0600) and the TCP links carry only two tiny frames per peer per call:

1. every rank copies its buffer into its segment and tells every peer ("in", with the
   segment's name, so peers map it once and again only when it grows);
2. the owner of each slice (the same slices as `sliced`) sums that slice straight out of
   every rank's segment, in rank order, runs `on_slice`, writes the result back into the
   slice of its own segment, and tells every peer ("out");
3. every rank copies the other owners' results out of their segments.

Each segment has two halves used by alternate calls: a rank rewrites a half only after every
peer has entered the next call, i.e. has finished reading it. A segment's file is unlinked
as soon as every peer has mapped it (after its first call), so a killed process leaves no
file behind; deadlines, lost peers and mismatches are the operation's, as for every other
algorithm. `probe` checks once per group that every rank can map every other rank's
segment (not so across containers that share an address but not `/dev/shm`); `auto`
uses this path only then.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import re
import secrets
import time
from collections.abc import Sequence

import numpy as np

from p2pdl.collectives.context import ReduceContext
from p2pdl.collectives.op import Operation
from p2pdl.collectives.plan import plan_slices
from p2pdl.errors import P2PDLError, SharedMemoryError

SHM_DIR = "/dev/shm"
_NAME = re.compile(r"^p2pdl-[0-9]+-[0-9a-f]{16}$")
_ALIGN = 64


class Segment:
    """One mapped segment file: two halves of `half_bytes` each."""

    def __init__(self, name: str, fd: int, size: int) -> None:
        self.name = name
        self.size = size
        self.half_bytes = size // 2
        try:
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.linked = True

    def half(self, parity: int, dtype: np.dtype, count: int) -> np.ndarray:
        """The first `count` elements of half `parity`, as an array over the shared bytes."""
        nbytes = count * np.dtype(dtype).itemsize
        if nbytes > self.half_bytes:
            raise ValueError(f"segment {self.name} holds {self.half_bytes} bytes per half")
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=parity * self.half_bytes)

    def unlink(self) -> None:
        if self.linked:
            self.linked = False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, self.name))

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # an array still views it: the GC unmaps it
            self._map.close()


STALE_AFTER = 60.0
"""Seconds after which a dead process's segment file is surely not being mapped any more."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(min_age: float = STALE_AFTER) -> list[str]:
    """Unlink this user's segment files whose process is gone; returns their names.

    A file lives only until every peer has mapped it (one call), so only a process killed
    inside the call that created or grew its segment leaves one behind; the next arena on
    the host removes it.
    """
    removed: list[str] = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        if not _NAME.match(name):
            continue
        pid = int(name.split("-")[1])
        if pid == os.getpid() or _alive(pid):
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            info = os.stat(path)
            if info.st_uid != os.getuid() or time.time() - info.st_mtime < min_age:
                continue
            os.unlink(path)
        except OSError:
            continue
        removed.append(name)
    return removed


class ShmArena:
    """This rank's own segment and the peers' segments it has mapped."""

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

    def own_segment(self, nbytes: int) -> Segment:
        """This rank's segment with at least `nbytes` per half (a new, larger one if needed).

        Raises SharedMemoryError when `/dev/shm` cannot hold it; the old segment stays.
        """
        old = self.own
        if old is not None and old.half_bytes >= nbytes:
            return old
        half = max(_ALIGN, -(-nbytes // _ALIGN) * _ALIGN)
        if old is not None:
            half = max(half, old.half_bytes * 2)  # grow geometrically
        else:
            sweep_stale()
        name = f"p2pdl-{os.getpid()}-{secrets.token_hex(8)}"
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise SharedMemoryError(f"cannot create {path}: {exc.strerror}") from None
        try:
            # Reserve the pages now: a sparse file on a full tmpfs would SIGBUS on first touch.
            os.posix_fallocate(fd, 0, 2 * half)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            raise SharedMemoryError(
                f"cannot reserve {2 * half} bytes in {SHM_DIR}: {exc.strerror}"
            ) from None
        self.own = Segment(name, fd, 2 * half)
        if old is not None:
            old.unlink()
            old.close()
        return self.own

    def renew(self) -> Segment:
        """A new segment of the same size under a new name (the old one is let go)."""
        assert self.own is not None
        size = self.own.half_bytes
        old, self.own = self.own, None
        segment = self.own_segment(size)
        old.unlink()
        old.close()
        return segment

    def unlink_later(self, segment: Segment) -> None:
        """Unlink `segment` at the next `unlink_pending` (its peers map it after this call)."""
        self.pending.append(segment)

    def unlink_pending(self) -> None:
        for segment in self.pending:
            segment.unlink()
        self.pending.clear()

    def peer_segment(self, rank: int, name: str) -> Segment:
        """Peer `rank`'s segment `name`, mapped on first sight (and again when it changes)."""
        current = self.peers.get(rank)
        if current is not None and current.name == name:
            return current
        if not _NAME.match(name):
            raise ValueError(f"rank {rank} named a shared segment {name!r}")
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        segment = _map_peer(name, fd)
        if current is not None:
            current.close()
        self.peers[rank] = segment
        return segment

    def close(self) -> None:
        self.unlink_pending()
        if self.own is not None:
            self.own.unlink()
            self.own.close()
            self.own = None
        for segment in self.peers.values():
            segment.close()
        self.peers.clear()


def _map_peer(name: str, fd: int) -> Segment:
    try:
        size = os.fstat(fd).st_size
    except OSError:
        os.close(fd)
        raise
    segment = Segment(name, fd, size)
    segment.linked = False  # the owner unlinks it
    return segment


async def probe(op: Operation, arena: ShmArena, members: Sequence[int] | None = None) -> bool:
    """Every rank of `members` (all ranks by default) maps every other member's segment;
    True on each of them iff all of them could. Ranks outside `members` take part in the
    operation (it keeps every rank's operation count) but exchange nothing."""
    group = list(range(op.world_size)) if members is None else list(members)
    peers = [p for p in group if p != op.rank]
    if op.rank not in group or not peers:
        return False
    try:
        own = arena.own_segment(_ALIGN)
        if not own.linked:  # unlinked after an earlier probe: new peers need a name to open
            own = arena.renew()
        name = own.name
    except (OSError, SharedMemoryError):
        name = ""
    names = [op.recv(p, 0, None) for p in peers]
    for p in peers:
        await op.send(p, 0, memoryview(name.encode()))
    mapped = bool(name)
    for p, arrival in zip(peers, names, strict=True):
        _header, payload = await arrival
        try:
            arena.peer_segment(p, bytes(payload).decode())
        except (OSError, ValueError):
            mapped = False
    verdicts = [op.recv(p, 1, None) for p in peers]
    for p in peers:
        await op.send(p, 1, memoryview(b"\x01" if mapped else b"\x00"))
    everyone = mapped
    for arrival in verdicts:
        _header, payload = await arrival
        everyone = everyone and bytes(payload) == b"\x01"
    if arena.own is not None and everyone:
        arena.own.unlink()  # every peer has mapped it
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
    name = memoryview(own.name.encode())
    for p in peers:
        await op.send(p, 0, name)
    theirs: dict[int, np.ndarray] = {rank: mine}
    for p, arrival in zip(peers, entered, strict=True):
        _header, payload = await arrival
        try:
            segment = arena.peer_segment(p, bytes(payload).decode())
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
    own.unlink()  # every peer has mapped it (they said "out" after mapping)

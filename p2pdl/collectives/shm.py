"""Allreduce through shared memory when every rank runs on one host.

On one host, TCP costs two kernel copies per byte plus the loopback stack, and the four ranks
of a local cluster spend their cores on them. Here each rank owns one shared data segment and
one control block (sealed memfds, see `shmfd`), and a call needs no TCP frame at all once
every rank has mapped the others' segments (`shmsync` says how ranks wait for each other):

1. every rank copies its buffer into its segment, except its own slice (the same slices as
   `sliced`), names the call in its control block and says "enter";
2. the owner of each slice sums it straight out of its own buffer and every peer's segment,
   in rank order, into its segment (or into its buffer when `on_slice` must see it first;
   into both in one pass for a two-rank plain sum), and says "out";
3. every rank copies the other owners' results out of their segments, and its own.

The steps are one synchronous generator (`call_steps`) that yields only what it must wait
for; the loop drives it (`finish`), and a small call runs it where it is called until a wait
its spin does not meet (`inline`). A small plain float sum or mean runs them compiled
(`kernels.shmcall`, the same counters and data) and resumes them here only where that
stops (`Resume`).

A segment some peer has not mapped yet (new, grown, or mapped only by a hierarchical call's
members) has its 64-byte offer sent to every peer over the authenticated link on the call
that uses it, and the control block says so, so each peer takes that frame.
Each segment has two halves used by alternate calls: a rank rewrites a half only once every
peer has started a later call or finished the one that used it. A segment is never a file: a
peer fetches its descriptor from the owner's fd server (an abstract Unix socket, one per
arena) with the offer's token, checks it (a memfd of the offered size, pages reserved, sealed
against shrinking and growing) and maps it read-only; only the owner maps its segment
writable. The owner withdraws a segment from its server as soon as every peer has mapped it
(after its first call), and the memory goes with the last mapping, so a killed process
leaves nothing behind. Deadlines, lost peers and mismatches are the operation's, as for every
other algorithm: a peer's control block names its call's descriptor, so two different calls
fail as a mismatch. `probe` checks once per group that every rank can fetch and map every
other rank's control block and doorbell (not so across network namespaces, whose abstract
sockets are apart, nor between uids); `auto` uses this path only then.

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
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any, NamedTuple

import numpy as np

from p2pdl import kernels
from p2pdl.collectives import shmsync
from p2pdl.collectives.context import ReduceContext
from p2pdl.collectives.op import SUB_BITS, Operation
from p2pdl.collectives.plan import owner_slices
from p2pdl.collectives.shmfd import (
    OFFER_BYTES,
    FdServer,
    Offer,
    check,
    fetch,
    fetch_all,
    ident_of,
    sealed_memfd,
)
from p2pdl.collectives.shmsync import ControlBlock, Doorbell
from p2pdl.errors import CollectiveMismatchError, P2PDLError, SharedMemoryError
from p2pdl.kernels.shmcall import (
    AT_ENTER,
    AT_HOOK,
    AT_OUT,
    AT_REUSE,
    CONTROL_BYTES,
    CURRENT,
    DONE,
    ENTER,
    OFFERED,
    OUT,
    PARITY,
)

log = logging.getLogger("p2pdl.collectives")

_ALIGN = 64

PHASES: list[list[tuple[str, float]]] | None = None
"""When a list (benchmarks set it), each call appends its phases' `perf_counter` marks."""


def _mark(marks: list[tuple[str, float]] | None, name: str) -> None:
    if marks is not None:
        marks.append((name, time.perf_counter()))


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
        self.extra: tuple[int, ...] = ()
        """Descriptors served with it (a control block's doorbell)."""
        self.mapped_by: set[int] = set()
        """This rank's own segment: the peers known to have mapped it (a shared-memory call
        sends its offer to every peer unless all of its peers are here)."""
        self._server: FdServer | None = None
        self._views: dict[tuple[int, np.dtype, int], np.ndarray] = {}

    @property
    def offered(self) -> bool:
        return self._server is not None

    def half(self, parity: int, dtype: np.dtype, count: int) -> np.ndarray:
        """The first `count` elements of half `parity`, as an array over the shared bytes
        (kept: a call of the same size and type reuses it; `close` lets them go)."""
        key = (parity, dtype, count)
        view = self._views.get(key)
        if view is None:
            nbytes = count * np.dtype(dtype).itemsize
            if nbytes > self.half_bytes:
                raise ValueError(f"{self.label} holds {self.half_bytes} bytes per half")
            if len(self._views) >= 16:
                self._views.clear()
            view = self._views[key] = np.frombuffer(
                self._map, dtype=dtype, count=count, offset=parity * self.half_bytes
            )
        return view

    @property
    def mapping(self) -> mmap.mmap:
        return self._map

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
        self._views.clear()
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
        call; two calls in flight at once, as DDP's buckets are, would share a half): take
        it with `taking_turns`."""
        self.in_turn = 0
        """Calls that hold `turn` or wait for it (none: a call may run inline)."""
        self.server: FdServer | None = None
        """Serves this rank's offered segments (started with the first segment)."""
        self.make_fd: Callable[[int], int] = sealed_memfd
        """Makes a segment's memfd of the given size (a test swaps it to play a bad peer)."""
        self._ids = itertools.count(1)
        self.control: ControlBlock | None = None
        """This rank's control block (made by the first probe), and its segment and bell."""
        self.control_segment: Segment | None = None
        self.bell: Doorbell | None = None
        self.controls: dict[int, tuple[Segment, ControlBlock]] = {}
        """Peers' control blocks, mapped read-only by the probe."""
        self.bells: dict[int, int] = {}
        """Peers' doorbells (eventfds this rank may only ring)."""
        self.last_use = [0, 0]
        """The call (seq) that last wrote each half of this rank's segment."""
        self.cores = 0
        """The cores this process may run on (0: not asked yet; asked once: waits spin only
        when every rank of a call has one)."""
        self._peer_sets: dict[tuple[int, ...], PeerSet] = {}
        """Per set of peers, their control blocks and doorbells (dropped when those change)."""
        self._bounds: dict[tuple[int, int], tuple[tuple[int, int], ...]] = {}
        """Slice bounds per (size, world size), kept: planning them costs more than 4 KiB."""
        self.resumed = [0] * 5
        """Calls whose steps Python resumed where the compiled call stopped, per stage
        (`kernels.shmcall.AT_REUSE` … `AT_OUT`; index 0 unused)."""
        self.plans: dict[Any, Any] = {}
        """The compiled small call's plans (`inline`): they hold the addresses of mapped
        segments and control blocks, so every change of those drops them (`forget_plans`)
        before anything is unmapped."""

    def forget_plans(self) -> None:
        """Drop the compiled call's plans (a mapping they name is about to change)."""
        self.plans.clear()

    def taking_turns(self, op: Operation) -> _Turn:
        """`async with` it to hold `turn` (after this rank's earlier calls, FIFO: under
        `op`'s deadline, which it arms if it must wait)."""
        return _Turn(self, op)

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
        self.forget_plans()
        self.own = segment
        if old is not None and old not in self.pending:
            old.close()  # (a pending one may still be fetched: `withdraw_pending` closes it)
        return segment

    def bounds(self, size: int, n: int) -> tuple[tuple[int, int], ...]:
        """Each rank's slice of `size` elements (the plan `sliced` uses), kept per size."""
        key = (size, n)
        bounds = self._bounds.get(key)
        if bounds is None:
            if len(self._bounds) > 64:
                self._bounds.clear()
            bounds = self._bounds[key] = owner_slices(size, n)
        return bounds

    def own_control(self) -> Segment:
        """This rank's control block and doorbell, made once and offered to its peers."""
        segment = self.control_segment
        if segment is None:
            self._fd_server()
            fd = self.make_fd(CONTROL_BYTES)
            try:
                segment = Segment(fd, CONTROL_BYTES, writable=True, label="control")
                self.bell = Doorbell()
            except OSError as exc:
                os.close(fd)
                raise SharedMemoryError(f"cannot make a control block: {exc}") from None
            segment.fd = fd
            segment.id = next(self._ids)
            segment.extra = (self.bell.fd,)
            self.control_segment = segment
            self.control = ControlBlock(segment.mapping)
        self.offer(segment)
        return segment

    async def peer_control(self, rank: int, data: bytes, deadline: float) -> None:
        """Map peer `rank`'s control block (read-only) and keep its doorbell, as its offer
        `data` names them; ValueError or OSError as for `peer_segment`."""
        offer = Offer.parse(data)
        if offer.size != CONTROL_BYTES:
            raise ValueError(f"a control block is {CONTROL_BYTES} bytes, not {offer.size}")
        fds = await fetch_all(offer, deadline, 2)
        try:  # nothing awaits from here on: the descriptors are closed whatever happens
            check(fds[0], offer.size)
            if os.readlink(f"/proc/self/fd/{fds[1]}") != "anon_inode:[eventfd]":
                raise ValueError("its doorbell is not an eventfd")
            segment = Segment(fds[0], offer.size, writable=False, label=f"rank {rank}'s control")
        except BaseException:
            os.close(fds[1])
            raise
        finally:
            os.close(fds[0])
        segment.ident = offer.ident
        self.drop_control(rank)  # (and the plans)
        self.controls[rank] = (segment, ControlBlock(segment.mapping))
        self.bells[rank] = fds[1]
        self._peer_sets.clear()

    def peer_set(self, peers: Sequence[int]) -> PeerSet:
        """The control blocks and doorbells of `peers`, kept per set of peers.

        Raises P2PDLError when some peer's control block was never mapped (not probed).
        """
        key = tuple(peers)
        found = self._peer_sets.get(key)
        if found is None:
            if (
                self.control is None
                or self.bell is None
                or any(p not in self.controls for p in key)
            ):
                raise P2PDLError("shared memory was not probed between these ranks")
            found = self._peer_sets[key] = PeerSet(
                {p: self.controls[p][1] for p in key}, [self.bells[p] for p in key]
            )
        return found

    def spin_s(self, ranks: int) -> float:
        """How long a wait of a call among `ranks` ranks polls before it sleeps: only when
        every rank has a core (a spinning rank would otherwise take its peer's)."""
        if not self.cores:
            self.cores = shmsync.cores()
        return shmsync.SPIN_S if ranks <= self.cores else 0.0

    def drop_control(self, rank: int) -> None:
        self._peer_sets.clear()
        self.forget_plans()
        old = self.controls.pop(rank, None)
        if old is not None:
            old[1].release()
            old[0].close()
        bell = self.bells.pop(rank, None)
        if bell is not None:
            os.close(bell)

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
            offer = server.offer(segment.id, segment.fd, segment.size, segment.extra)
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
        self.forget_plans()
        previous = self.peers.get(rank)
        if previous is not None:
            previous.close()
        self.peers[rank] = segment
        return segment

    def close(self) -> None:
        """Close every segment and the fd server (the memory goes with the last mapping)."""
        self.forget_plans()
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
        for rank in list(self.controls):
            self.drop_control(rank)
        for rank in list(self.bells):
            self.drop_control(rank)
        if self.control is not None:
            self.control.release()
            self.control = None
        if self.control_segment is not None:
            self.control_segment.close()
            self.control_segment = None
        if self.bell is not None:
            self.bell.close()
            self.bell = None
        self.last_use = [0, 0]
        if self.server is not None:
            self.server.close()
            self.server = None


async def probe(op: Operation, arena: ShmArena, members: Sequence[int] | None = None) -> bool:
    """Every rank of `members` (all ranks by default) fetches and maps every other member's
    control block and doorbell; True on each of them iff all of them could. Ranks outside
    `members` take part in the operation (it keeps every rank's operation count) but
    exchange nothing."""
    group = list(range(op.world_size)) if members is None else list(members)
    peers = [p for p in group if p != op.rank]
    if op.rank not in group or not peers:
        return False
    try:
        offer = arena.offer(arena.own_control())
    except (OSError, SharedMemoryError) as exc:
        log.info("rank %d cannot offer a shared control block: %s", op.rank, exc)
        offer = b""
    offers = [op.recv(p, 0, None) for p in peers]
    for p in peers:
        await op.send(p, 0, memoryview(offer))
    mapped = bool(offer)
    for p, arrival in zip(peers, offers, strict=True):
        _header, payload = await arrival
        try:
            await arena.peer_control(p, bytes(payload), op.deadline)
        except (OSError, ValueError) as exc:
            log.info("rank %d cannot map rank %d's shared control block: %s", op.rank, p, exc)
            mapped = False
    verdicts = [op.recv(p, 1, None) for p in peers]
    for p in peers:
        await op.send(p, 1, memoryview(b"\x01" if mapped else b"\x00"))
    everyone = mapped
    for arrival in verdicts:
        _header, payload = await arrival
        everyone = everyone and bytes(payload) == b"\x01"
    if arena.control_segment is not None and everyone:
        arena.control_segment.withdraw()  # every peer has mapped it
    return everyone


class PeerSet:
    """The peers of a shared-memory call: their control blocks and the doorbells to ring."""

    def __init__(self, blocks: dict[int, ControlBlock], rings: list[int]) -> None:
        self.blocks = blocks
        self.block_list = list(blocks.values())
        self.rings = rings


async def allreduce_shm(ctx: ReduceContext, arena: ShmArena) -> None:
    """Sum (or average) `ctx.buf` over ranks that share this host's memory.

    Runs under a lazy operation (`Operation.run(lazy=True)`): whatever may wait for a peer
    arms it first (a receive or `expect` does so itself), so a call whose peers are ready
    never starts the deadline's timer or the link guards.
    """
    async with arena.taking_turns(ctx.op):
        steps = call_steps(ctx, arena)
        await finish(steps, advance(steps), ctx.op)


class _Turn:
    """Holding an arena's `turn` (see `ShmArena.taking_turns`)."""

    __slots__ = ("arena", "op")

    def __init__(self, arena: ShmArena, op: Operation) -> None:
        self.arena = arena
        self.op = op

    async def __aenter__(self) -> None:
        arena = self.arena
        arena.in_turn += 1
        try:
            if arena.turn.locked():
                self.op.arm()  # it waits for this rank's earlier calls
            await arena.turn.acquire()
        except BaseException:
            arena.in_turn -= 1
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self.arena.turn.release()
        self.arena.in_turn -= 1


class Wait:
    """What a step waits for: every peer's control block to say something (`ready`)."""

    __slots__ = ("call", "left", "ready")

    def __init__(self, call: _Call, ready: dict[int, Callable[[], bool]]) -> None:
        self.call = call
        self.ready = ready
        self.left: list[tuple[int, Callable[[], bool]]] = []

    def spin(self) -> bool:
        """Whether it holds now or after the bounded spin (`shmsync.spin_until`)."""
        self.left = shmsync.spin_until(self.ready, self.call.spin_s, self.call.yields)
        return not self.left

    async def sleep(self) -> None:
        """Until it holds (after `spin` said no), on the doorbell, within the deadline."""
        call = self.call
        await shmsync.sleep_until(call.op, call.control, call.bell, self.left)


Need = Wait | Callable[[], Awaitable[Any]]
"""What the steps of a call yield: a `Wait`, or work that must be awaited (frames, the
reduce thread, the caller's `on_slice`), whose result is sent back."""
Steps = Generator[Need, Any, None]


def advance(steps: Steps, value: Any = None, error: BaseException | None = None) -> Need | None:
    """Run `steps` (sending `value`, or throwing `error`, first) until they finish (None) or
    need something that cannot be had on this thread without waiting: a `Wait` that its
    spin did not meet, or work to await.

    Synchronous: the blocking facade runs it on the caller's thread (`Collectives.
    allreduce_inline`), the loop runs it between awaits (`finish`)."""
    while True:
        try:
            need = steps.throw(error) if error is not None else steps.send(value)
        except StopIteration:
            return None
        value = error = None
        if not isinstance(need, Wait) or not need.spin():
            return need


async def finish(steps: Steps, need: Need | None, op: Operation) -> None:
    """Carry out `steps` from `need` on the loop, inside `op`'s `run`: sleep on waits, await
    work (with `op` armed first: its deadline and loss watch cover whatever is awaited)."""
    while need is not None:
        value: Any = None
        error: BaseException | None = None
        try:
            if isinstance(need, Wait):
                value = await need.sleep()
            else:
                op.arm()
                value = await need()
        except BaseException as exc:  # into the steps: they say "done", then it propagates
            error = exc
        need = advance(steps, value, error)


class _Call:
    """One shared-memory call on one rank: its sequence number and how it waits."""

    def __init__(self, ctx: ReduceContext, arena: ShmArena, peers: list[int], yields: int) -> None:
        control, bell = arena.control, arena.bell
        assert control is not None and bell is not None
        found = arena.peer_set(peers)
        self.op = ctx.op
        self.arena = arena
        self.control = control
        self.bell = bell
        self.seq = (ctx.op.base >> SUB_BITS) + 1
        self.blocks = found.blocks
        self.peer_blocks = found.block_list
        self.rings = found.rings
        self.spin_s = arena.spin_s(ctx.world_size)
        self.yields = yields

    def say(self, word: int) -> None:
        self.control.words[word] = self.seq
        shmsync.ring(self.peer_blocks, self.rings)

    def until(self, word: int) -> Steps:
        """Until every peer has said `word` for this call (an error if one moved past it
        without)."""
        seq = self.seq
        blocks = self.blocks
        if not all(block.words[word] >= seq for block in blocks.values()):
            yield Wait(
                self,
                {
                    p: (lambda b=block: b[word] >= seq or b[CURRENT] > seq)
                    for p, block in blocks.items()
                },
            )
            for p, block in blocks.items():
                if block[word] < seq:
                    raise P2PDLError(
                        f"{self.op.name}: rank {p} left shared-memory call {seq} for call "
                        f"{block[CURRENT]} before it was done"
                    )

    def reusable(self, parity: int) -> Steps:
        """Until no peer can still read half `parity` of this rank's segment."""
        last = self.arena.last_use[parity]
        if last and not all(
            b.words[CURRENT] > last or b.words[DONE] >= last for b in self.blocks.values()
        ):
            yield Wait(
                self,
                {
                    p: (lambda b=block: b[CURRENT] > last or b[DONE] >= last)
                    for p, block in self.blocks.items()
                },
            )
        self.arena.last_use[parity] = self.seq


def call_steps(
    ctx: ReduceContext,
    arena: ShmArena,
    yields: int = shmsync.YIELDS,
    resume: Resume | None = None,
) -> Steps:
    """The steps of one shared-memory call (see the module docstring), from "current" to
    "done" ("done" also when they fail or are abandoned); `yields`: how often a wait yields
    the core before it gives up spinning, when ranks outnumber cores.

    `resume`: the rest of a call that the compiled small call (`kernels.shmcall`) took
    part of the way (a plain float sum or mean, on segments every peer has mapped, as it
    runs; with an owner's hook, at most up to the hook)."""
    peers = ctx.peers
    call = _Call(ctx, arena, peers, yields)
    if resume is None:
        resume = Resume(AT_REUSE, arena.calls % 2, ())
        arena.calls += 1
        call.say(CURRENT)
    else:
        arena.resumed[resume.stage] += 1
    try:
        yield from _steps(ctx, arena, call, resume, peers)
    finally:
        call.say(DONE)


class Resume(NamedTuple):
    """Where a call's steps start: `stage` (`kernels.shmcall.AT_REUSE`: "current" said;
    `AT_ENTER`: its data in and "enter" said; `AT_HOOK`: its slice reduced, the owner's hook
    to run; `AT_OUT`: its slice reduced and "out" said), on half `parity`; from `AT_HOOK`,
    `halves[p]` is the half each peer named for it (read before "out": a peer may move on
    to its next call once this rank has said it)."""

    stage: int
    parity: int
    halves: Sequence[int]


def _steps(
    ctx: ReduceContext, arena: ShmArena, call: _Call, resume: Resume, peers: list[int]
) -> Steps:
    stage, parity, halves = resume
    op, buf = ctx.op, ctx.buf
    n, rank = ctx.world_size, ctx.rank
    marks: list[tuple[str, float]] | None = None
    if PHASES is not None:
        marks = [("start", time.perf_counter())]
        PHASES.append(marks)
    nbytes = buf.nbytes
    large = nbytes >= INLINE_BYTES
    own = arena.own_segment(nbytes)  # SharedMemoryError here: nothing touched yet
    mine = own.half(parity, buf.dtype, buf.size)
    # The same slices as `sliced` and reduce_scatter/allgather: an owner's optimizer state
    # covers the same range whichever of them ran.
    bounds = arena.bounds(buf.size, n)
    lo, hi = bounds[rank]
    descriptor = op.descriptor.encode()
    offering = False
    if stage < AT_ENTER:
        yield from call.reusable(parity)
        _mark(marks, "setup")
        # This rank's own slice is summed straight from `buf`.
        if large:
            yield lambda: ctx.compute.run(nbytes, lambda: _copy_around(mine, buf, lo, hi))
        else:
            _copy_around(mine, buf, lo, hi)
        _mark(marks, "copy-in")
        # A segment some peer has not mapped (new, grown, or mapped only by the members of a
        # hierarchical call) is offered again to every peer on this call, and the control
        # block says so: each peer then takes the offer frame, whether or not it needs it.
        offering = not own.mapped_by.issuperset(peers)
        if offering:
            offer = memoryview(arena.offer(own))
            yield lambda: _send_all(op, peers, offer)
        call.control.enter(call.seq, parity, own.ident, descriptor, offered=offering)
        shmsync.ring(call.peer_blocks, call.rings)
    if stage < AT_HOOK:
        theirs, owned_in_buf = yield from _reduce_own(
            ctx, arena, call, descriptor, mine, (lo, hi), large, marks
        )
    else:  # the compiled call summed this rank's slice into `buf` and its segment
        theirs = {p: arena.peers[p].half(halves[p], buf.dtype, buf.size) for p in peers}
        owned_in_buf = True
        if stage == AT_HOOK:  # (its hook may change the result: then into the segment)
            yield from _run_hook(ctx, buf[lo:hi], mine[lo:hi], lo, hi)
    if stage < AT_OUT:
        call.say(OUT)

    def copy_own() -> None:
        if ctx.on_slice is None and not owned_in_buf:
            np.copyto(buf[lo:hi], mine[lo:hi])

    def copy_theirs() -> None:
        for p in peers:
            a, b = bounds[p]
            np.copyto(buf[a:b], theirs[p][a:b])

    # This rank's own result first, while the other owners finish theirs.
    if large:
        yield lambda: ctx.compute.run((hi - lo) * buf.itemsize, copy_own)
    else:
        copy_own()
    _mark(marks, "copy-own")
    yield from call.until(OUT)
    _mark(marks, "wait-out")
    if large:
        yield lambda: ctx.compute.run(nbytes, copy_theirs)
    else:
        copy_theirs()
    _mark(marks, "copy-out")
    if offering:
        own.mapped_by.update(peers)  # each said "out" after mapping it
    own.withdraw()


def _reduce_own(
    ctx: ReduceContext,
    arena: ShmArena,
    call: _Call,
    descriptor: bytes,
    mine: np.ndarray,
    own_slice: tuple[int, int],
    large: bool,
    marks: list[tuple[str, float]] | None,
) -> Generator[Need, Any, tuple[dict[int, np.ndarray], bool]]:
    """Once every peer has entered: check that they called the same, map their halves,
    and sum this rank's slice (`own_slice`) into its segment (and `buf` when `on_slice`
    must see it, or for a fused two-rank sum); the peers' halves, and whether `buf` holds
    this rank's result already."""
    op, buf, rank, n, peers = ctx.op, ctx.buf, ctx.rank, ctx.world_size, ctx.peers
    lo, hi = own_slice
    nbytes = buf.nbytes
    yield from call.until(ENTER)
    _mark(marks, "wait-enter")
    theirs: dict[int, np.ndarray] = {}
    seq = call.seq
    for p, block in call.blocks.items():
        if not block.names(descriptor):
            raise CollectiveMismatchError(
                op.name,
                f"rank {p} called {block.descriptor()}, rank {rank} called {op.descriptor}",
                [p, rank],
            )
        segment = arena.peers.get(p)
        if block.words[OFFERED] != seq and segment is not None and segment.ident == block.ident():
            theirs[p] = segment.half(int(block.words[PARITY]) & 1, buf.dtype, buf.size)
        else:
            theirs[p] = yield lambda p=p, block=block: _peer_half(op, arena, p, block, buf)
    # Single-threaded kernels: every rank sums its own slice at the same time, so the
    # cores are busy already (Numba's pool on top only oversubscribes them).
    ctx.chunk_elems = max(ctx.chunk_elems, buf.size)
    owned_in_buf = False  # this rank's own result already in `buf` (not only its segment)
    if hi > lo:
        if ctx.on_slice is not None:  # it must see (and may change) the result in `buf`
            result = buf[lo:hi]
            sources = [result if p == rank else theirs[p][lo:hi] for p in range(n)]
            if result.nbytes >= ctx.compute.inline_bytes:  # (as `finish_slice` would)
                yield lambda: _reduce_on_slice(ctx, result, sources, mine[lo:hi], lo, hi, large)
            else:
                ctx.reduce_now(result, sources, final=True)
                yield from _run_hook(ctx, result, mine[lo:hi], lo, hi)
        else:
            sources = [buf[lo:hi] if p == rank else theirs[p][lo:hi] for p in range(n)]
            if nbytes < SMALL_BYTES and ctx.plain_sum:
                _sum_small(mine[lo:hi], sources, ctx.final_scale())
            elif n == 2 and ctx.plain_sum and ctx.final_scale() is None:
                # Two ranks, a plain sum: own + peer's into `buf` and the segment in one pass
                # (IEEE addition commutes: the same bits as peer + own on the other rank).
                peer_slice = theirs[peers[0]][lo:hi]

                def fused() -> None:
                    kernels.add_copy_(buf[lo:hi], peer_slice, mine[lo:hi], parallel=False)

                owned_in_buf = True
                if large:
                    yield lambda: ctx.compute.run(nbytes, fused)
                else:
                    fused()
            elif large:
                yield lambda: ctx.reduce_chunk(mine[lo:hi], sources, final=True)
            else:
                ctx.reduce_now(mine[lo:hi], sources, final=True)
    _mark(marks, "reduce")
    return theirs, owned_in_buf


def _run_hook(
    ctx: ReduceContext, result: np.ndarray, shared: np.ndarray, lo: int, hi: int
) -> Steps:
    """The owner's `on_slice` on its reduced slice `result` (awaited if it returns an
    awaitable), then the slice as it left it into this rank's segment (`shared`)."""
    assert ctx.on_slice is not None
    returned = ctx.on_slice(lo, hi, result)
    if isinstance(returned, Awaitable):
        yield lambda: returned
    np.copyto(shared, result)


async def _send_all(op: Operation, peers: list[int], payload: memoryview) -> None:
    for p in peers:
        await op.send(p, 0, payload)


async def _reduce_on_slice(
    ctx: ReduceContext,
    result: np.ndarray,
    sources: list[np.ndarray],
    shared: np.ndarray,
    lo: int,
    hi: int,
    large: bool,
) -> None:
    """The owner's slice reduced into `buf`, the caller's `on_slice` run on it, and the
    result (as it left it) copied into this rank's segment."""
    await ctx.reduce_chunk(result, sources, final=True, inline=not large)
    await ctx.finish_slice(lo, hi)
    await _work(ctx, result.nbytes, lambda: np.copyto(shared, result))


def _copy_around(mine: np.ndarray, buf: np.ndarray, lo: int, hi: int) -> None:
    """Copy `buf` into `mine` except [lo, hi)."""
    if lo:
        np.copyto(mine[:lo], buf[:lo])
    if hi < buf.size:
        np.copyto(mine[hi:], buf[hi:])


INLINE_BYTES = 4 << 20
"""Below this a call copies and sums on the loop thread: while it runs the loop has no frames
of it to serve (calls take turns), and at 1 MiB the four hops to the reduce thread (~30-60 µs
each) cost more than the copies they moved (`bench allreduce --phases`)."""


async def _work(ctx: ReduceContext, nbytes: int, fn: Callable[[], None]) -> None:
    """`fn()` on the loop thread below INLINE_BYTES, else on the reduce thread."""
    if nbytes < INLINE_BYTES:
        fn()
    else:
        await ctx.compute.run(nbytes, fn)


SMALL_BYTES = 64 * 1024
"""Below this a plain float sum (`ReduceContext.plain_sum`) adds with NumPy's ufuncs (~1.4 µs
a call) rather than the kernels (~2.6 µs with their argument checks): the same additions in
the same order, so the same bits. Other ops and dtypes take the kernels whatever the size."""


def _sum_small(dst: np.ndarray, sources: list[np.ndarray], scale: float | None) -> None:
    """dst = ((s0 + s1) + s2) + ..., then the mean's scale (by the kernel: same rounding).
    Overflow gives inf, as in the kernels, without NumPy's warning."""
    with np.errstate(all="ignore"):
        np.add(sources[0], sources[1], out=dst)
        for source in sources[2:]:
            np.add(dst, source, out=dst)
    if scale is not None:
        kernels.scale_(dst, scale)


async def _peer_half(
    op: Operation, arena: ShmArena, p: int, block: ControlBlock, buf: np.ndarray
) -> np.ndarray:
    """Half of peer `p`'s segment that its control block names for this call, mapped (and
    fetched first, with the offer it sent on this call, when it is new to this rank)."""
    ident = block.ident()
    segment = arena.peers.get(p)
    if block[OFFERED] == (op.base >> SUB_BITS) + 1:  # it sent its offer on this call
        _header, payload = await op.recv(p, 0, None, limit=OFFER_BYTES)
        if segment is None or segment.ident != ident:
            try:
                segment = await arena.peer_segment(p, bytes(payload), op.deadline)
            except (OSError, ValueError) as exc:
                raise P2PDLError(
                    f"rank {op.rank} cannot map rank {p}'s shared segment: {exc}"
                ) from None
    if segment is None or segment.ident != ident:
        raise P2PDLError(
            f"rank {p} names a shared segment that rank {op.rank} has not mapped, and sent "
            "no offer for it"
        )
    return segment.half(block[PARITY] & 1, buf.dtype, buf.size)

"""One collective in flight: its tags, its single deadline, its failure modes.

Every rank numbers its collectives in call order; operation `k` owns the tags
`[k << SUB_BITS, (k + 1) << SUB_BITS)` on every link, so many collectives can be in flight on
one connection without their frames crossing. Every data frame carries the operation's
descriptor (kind, size, dtype, op, algorithm); a receiver that sees a different one fails the
operation with `CollectiveMismatchError` and tells every other rank, so all of them fail
with the same clear message instead of hanging. A lost peer or the deadline fails the whole
operation, and the error names the ranks that were missing.

Leaving: a rank returns from a collective only once every frame it owes the others for it
has been handed to its sockets, and closing a node flushes those frames, says goodbye and
waits for the peers' side (`Link.shutdown`). So a rank that has returned may leave: frames it
sent before it left stay receivable, and frames still addressed to it are dropped (it needs
nothing more). A rank that leaves or dies *before* delivering what another rank waits for is
named in that rank's `PeerLostError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from p2pdl.errors import (
    CollectiveMismatchError,
    CollectiveTimeoutError,
    P2PDLError,
    PeerLostError,
    ProtocolError,
    SharedMemoryError,
)

log = logging.getLogger("p2pdl.collectives")

UNSIZED_LIMIT = 4096
"""The most a receive without a buffer accepts from a peer (names, acks, verdicts)."""

SUB_BITS = 24
ABORT_SUB = (1 << SUB_BITS) - 1
T = TypeVar("T")


class LinkLike(Protocol):
    """What an operation needs from a transport link."""

    lost: P2PDLError | None
    closed_here: bool

    def post(
        self, tag: int, view: memoryview | None = None, check: Any = None, *, limit: int = ...
    ) -> asyncio.Future[tuple[dict[str, Any], memoryview]]: ...

    def opening(self, lo: int, hi: int) -> list[asyncio.Future[None]]: ...

    async def send(self, header: dict[str, Any], payload: memoryview | None = None) -> None: ...

    def send_nowait(self, header: dict[str, Any]) -> None: ...

    def retire(self, lo: int, hi: int) -> None: ...

    def guard(self, lo: int, hi: int, check: Any, on_error: Any) -> None: ...


class Group(Protocol):
    """What an operation needs from the mesh: ranks, links, loss notifications, op numbers."""

    rank: int
    world_size: int

    def link(self, rank: int) -> LinkLike:
        """The link to `rank` (also once lost: it then fails what it cannot deliver)."""
        ...

    def watch(self, callback: Callable[[int, P2PDLError], None]) -> Callable[[], None]: ...

    def next_op_id(self) -> int: ...


def _nothing() -> None:
    pass


class Operation:
    """Tags, descriptor checks, missing-rank bookkeeping and failure for one collective.

    A collective involves every rank and takes the next operation number. A point-to-point
    message involves two ranks: it gives its own tag range (`base`) and its one `peers`.
    """

    def __init__(
        self,
        group: Group,
        name: str,
        descriptor: str,
        deadline: float,
        *,
        base: int | None = None,
        peers: Sequence[int] | None = None,
        pair_descriptors: Mapping[int, str] | None = None,
        timeout: float | None = None,
    ) -> None:
        self.group = group
        self.name = name
        self.descriptor = descriptor
        self.pair_descriptors = pair_descriptors
        """Per peer, what the two ranks of that link must agree on instead of `descriptor`
        (the sizes of uneven gathers, scatters and all-to-alls: each pair knows its own)."""
        self.deadline = deadline
        """Loop time by which the whole operation must be done (one deadline per call)."""
        self.timeout = (
            max(0.0, deadline - asyncio.get_running_loop().time()) if timeout is None else timeout
        )
        """The seconds it was given (for messages); given, not computed, for an operation made
        off the loop (the blocking facade's inline call, whose deadline is set on handoff)."""
        self.rank = group.rank
        self.world_size = group.world_size
        self.base = group.next_op_id() << SUB_BITS if base is None else base
        self.peers = (
            [p for p in range(group.world_size) if p != group.rank]
            if peers is None
            else list(peers)
        )
        self._waiting: dict[asyncio.Future[Any], int] = {}
        self._progress: dict[asyncio.Future[Any], Callable[[], bool]] = {}
        self._error: P2PDLError | None = None
        self._task: asyncio.Task[Any] | None = None
        self._cancelled = False
        self._reported = False
        self._armed = False
        self._unwatch: Callable[[], None] = _nothing
        self._timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------------- frames
    def _check(self, peer: int) -> Callable[[dict[str, Any], int], None]:
        abort_tag = self.base | ABORT_SUB

        def check(header: dict[str, Any], _size: int) -> None:
            if header.get("t") == abort_tag:
                raise self._abort_error(header)
            theirs = header.get("d")
            mine = self.descriptor_with(peer)
            if theirs != mine:
                raise CollectiveMismatchError(
                    self.name,
                    f"rank {peer} called {theirs}, rank {self.rank} called {mine}",
                    [peer, self.rank],
                )

        return check

    def descriptor_with(self, peer: int) -> str:
        """What this rank's frames to and from `peer` carry."""
        pairs = self.pair_descriptors
        return self.descriptor if pairs is None else pairs.get(peer, self.descriptor)

    def recv(
        self, peer: int, sub: int, view: memoryview | None, *, limit: int = UNSIZED_LIMIT
    ) -> asyncio.Future[Any]:
        """Post a receive for frame `sub` from `peer` into `view` (None: a new buffer of at
        most `limit` bytes: names, acknowledgements and verdicts are tiny)."""
        if not self._armed and self._task is not None:
            self.arm()
        future = self.group.link(peer).post(self.base | sub, view, self._check(peer), limit=limit)
        self._waiting[future] = peer
        future.add_done_callback(self._settled)
        return future

    def expect(self, peer: int, done: Callable[[], bool]) -> asyncio.Future[None]:
        """A future for something `peer` must do for this operation outside its link (shared
        memory progress); the caller sets it once `done()` holds. Until then a timeout names
        `peer`, and a lost link to it fails the operation unless `done()` holds by then (it
        finished its part and left)."""
        if not self._armed and self._task is not None:
            self.arm()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[future] = peer
        self._progress[future] = done
        future.add_done_callback(self._settled)
        lost = self.group.link(peer).lost
        if lost is not None:  # lost before this wait began: the watcher has already fired
            self._on_peer_lost(peer, lost)
        return future

    def _settled(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            # Fix: a cancelled receive never arrived, so it stays "waiting". The deadline
            # cancels every receive before `run` reads `_waiting`; popping them here made
            # every timeout report "waiting for no rank" instead of naming who was missing.
            return
        self._waiting.pop(future, None)
        self._progress.pop(future, None)
        error = future.exception()
        if isinstance(error, P2PDLError):
            self.fail(error)

    async def send(self, peer: int, sub: int, payload: memoryview | None = None) -> None:
        """Send frame `sub` to `peer`; dropped if the peer has gone (it needs nothing more:
        had it still needed this frame, it would not have returned; had it died, the ranks
        waiting for it find out)."""
        if not self._armed and self._task is not None:
            self.arm()
        link = self.group.link(peer)
        if link.lost is None:
            try:
                await link.send({"t": self.base | sub, "d": self.descriptor_with(peer)}, payload)
                return
            except PeerLostError:
                pass
        if link.closed_here:  # this node is leaving: the operation cannot finish here
            assert link.lost is not None
            raise link.lost
        log.debug("%s: dropped frame %d for rank %d, which has left", self.name, sub, peer)

    # ------------------------------------------------------------------------ running
    async def run(self, body: Callable[[], Awaitable[T]], *, lazy: bool = False) -> T:
        """Run `body` under the deadline; translate loss, mismatch and timeout into errors.

        The body runs in the caller's task (no task per operation); `fail` cancels that task
        while the operation runs (the deadline's timer too), and `run` turns the cancellation
        back into the error. `lazy`: arm the operation (`arm`) only once the body is about to
        wait for a peer — its receives and `expect` arm it, and a body that may wait on
        anything else must call `arm` first — so a call that finds every peer ready
        (shared memory) pays for no guards, watcher or timer.
        """
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        if not lazy:
            self.arm()
        try:
            if self._error is not None:  # an abort that arrived before we started
                raise self._error
            return await body()
        except asyncio.CancelledError:
            if self._cancelled and task.uncancel() == 0 and self._error is not None:
                raise self._error from None
            raise
        except P2PDLError as exc:
            self._error = self._error or exc
            raise self._error from None
        finally:
            self._task = None
            if self._armed:
                self._disarm()
            if self._error is not None:
                self._broadcast_abort(self._error)
            self._retire()
            group = self.group
            span = self.base + (1 << SUB_BITS)
            opening = [
                future
                for peer in self.peers
                for future in group.link(peer).opening(self.base, span)
            ]
            if opening:
                # Payloads being decrypted into this operation's buffers off the loop: the
                # operation returns only once nothing writes them any more.
                with contextlib.suppress(BaseException):
                    await asyncio.shield(asyncio.gather(*opening, return_exceptions=True))

    def end_detached(self, error: P2PDLError | None) -> None:
        """End an operation that ran off the loop without `run` (the blocking facade's inline
        call): tell the other ranks its error, and retire its tags. On the loop."""
        if error is not None:
            self._error = error
            self._broadcast_abort(error)
        self._retire()

    def arm(self) -> None:
        """Check this operation's frames as they arrive (an abort frame fails it), watch for
        lost links, and start the deadline's timer; once per operation."""
        if self._armed:
            return
        self._armed = True
        group = self.group
        span = self.base + (1 << SUB_BITS)
        for peer in self.peers:
            link = group.link(peer)
            # Every frame of this operation from `peer` is checked as it arrives, posted
            # for or not (frames that came before are checked now); an abort frame fails the
            # operation with the reason it carries. (A lost link fails the receives that
            # need it, when they are posted.)
            if link.lost is None:
                link.guard(self.base, span, self._check(peer), self.fail)
        self._unwatch = group.watch(self._on_peer_lost)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(self.deadline, self._expire)

    def _disarm(self) -> None:
        self._armed = False
        self._unwatch()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        """The deadline: fail with the ranks still missing (receives not in, progress not
        made)."""
        self._timer = None
        missing = {p for f, p in self._waiting.items() if not f.done()}
        self.fail(CollectiveTimeoutError(self.name, self.timeout, missing))

    def fail(self, error: P2PDLError) -> None:
        """Fail the operation with `error` (first error wins)."""
        if self._error is None:
            if isinstance(error, PeerLostError) and not error.operation:
                error = PeerLostError(error.ranks, error.detail, operation=self.name)
            self._error = error
        if self._task is not None and not self._cancelled:
            self._cancelled = True
            self._task.cancel()

    def _on_peer_lost(self, rank: int, error: P2PDLError) -> None:
        # A peer that already delivered everything this operation needs from it may leave
        # (it finished first and closed); sends to it still fail on their own.
        for future, done in list(self._progress.items()):
            if self._waiting.get(future) == rank and not future.done() and done():
                future.set_result(None)
        if not any(p == rank and not f.done() for f, p in self._waiting.items()):
            return
        if isinstance(error, ProtocolError):
            self.fail(ProtocolError(f"{self.name}: {error}", rank=rank))
            return
        detail = error.detail if isinstance(error, PeerLostError) else str(error)
        self.fail(PeerLostError([rank], detail, operation=self.name))

    def _abort_error(self, header: dict[str, Any]) -> P2PDLError:
        """The error another rank's abort frame reports (it already told everyone)."""
        self._reported = True
        reason = header.get("reason", "aborted")
        reason = reason[:1000] if isinstance(reason, str) else "aborted"
        kind = header.get("kind")
        raw_ranks = header.get("ranks")
        ranks = [
            r
            for r in (raw_ranks if isinstance(raw_ranks, list) else [])[: self.world_size]
            if isinstance(r, int) and not isinstance(r, bool) and 0 <= r < self.world_size
        ]
        if kind == "mismatch":
            return CollectiveMismatchError(self.name, reason, ranks)
        if kind == "lost":
            return PeerLostError(ranks, f"reported by another rank: {reason}", operation=self.name)
        who = f"rank {ranks[0]}" if ranks else "another rank"
        if kind == "shm":
            return SharedMemoryError(f"{self.name}: {who}: {reason}")
        if kind == "failed":
            return P2PDLError(f"{self.name}: {who} failed: {reason}")
        return P2PDLError(f"{self.name}: {reason}")

    def _broadcast_abort(self, error: P2PDLError) -> None:
        if self._reported:
            return
        self._reported = True
        if isinstance(error, CollectiveMismatchError):
            kind, ranks, reason = "mismatch", list(error.ranks), error.detail
        elif isinstance(error, PeerLostError):
            kind, ranks, reason = "lost", list(error.ranks), error.detail
        elif isinstance(error, SharedMemoryError):
            # Every rank must learn it at once: they all drop shared memory together.
            kind, ranks, reason = "shm", [self.rank], str(error)
        elif isinstance(error, CollectiveTimeoutError):
            return  # timeouts are seen by everyone on their own
        else:
            kind, ranks, reason = "failed", [self.rank], str(error)
        header = {"t": self.base | ABORT_SUB, "kind": kind, "ranks": ranks, "reason": reason}
        for peer in self.peers:
            self.group.link(peer).send_nowait(header)

    def _retire(self) -> None:
        for peer in self.peers:
            self.group.link(peer).retire(self.base, self.base + (1 << SUB_BITS))

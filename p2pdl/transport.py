"""Authenticated, encrypted TCP links between ranks: handshake, tagged frames, posted buffers.

The transport knows connections, tags and buffers — never what a slice or a step is.

* Handshake (lock-step: the link reads the next handshake frame only when the handshake
  asks for it, so a peer cannot queue anything before it has authenticated):

      client → server   hello  {v, cluster, rank, epoch, join, nonce, auth, enc}
      server → client   hello  {v, rank, nonce, auth, enc}
      server → client   proof  HMAC(k, "server" ‖ H)      H: hash of both hellos as sent
      client → server   proof  HMAC(k, "client" ‖ H)
      server → client   welcome (sealed)                  or a reject, and the link closes

  k comes from the stretched secret (`p2pdl.crypto`); the session keys from the secret and
  H, one per direction. With encryption (the default) every later frame is sealed (AES-256-GCM
  records with the frame number as nonce): a changed, dropped, replayed or reordered frame
  fails the link with `ProtocolError`, never a wrong result. `encryption=False` keeps the
  authenticated handshake and sends plain frames (trusted fabrics only); both ends must agree.
  Without a secret (`insecure`) there are no proofs and no encryption.
* Receiving: a caller posts a buffer for `(peer, tag)`; the payload is read by the kernel
  straight into it — for a sealed frame the ciphertext, whose tag lands in a small buffer of
  its own, opened in place once complete (large ones on the reduce threads, `offload`). A frame that
  arrives before its buffer is kept in memory when small (bounded per connection); a large
  one pauses reading until its buffer is posted, so memory never grows with what a peer
  claims. A receive posted without a buffer states the most it accepts.
* Sending: plain frames go to the event loop as two buffers (`writelines`), never joined;
  sealed frames are numbered when `send` is called and written in that order, their
  payloads encrypted into scratch (large ones off the loop). Write-buffer limits of zero
  make `send` return only once its bytes have left user space: the caller may reuse the
  buffer at once, and a slow peer slows its sender (backpressure as a future).
* A violation closes that connection with a logged reason; the node serves everyone else.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from p2pdl.config import Limits
from p2pdl.crypto import (
    NONCE_BYTES,
    TAG_BYTES,
    Opener,
    Sealer,
    Transcript,
    proof,
    proofs_match,
    session_keys,
    stretch,
)
from p2pdl.errors import (
    AuthenticationError,
    P2PDLError,
    PeerLostError,
    ProtocolError,
)
from p2pdl.wire import (
    HANDSHAKE_SCRATCH,
    PREFIX,
    VERSION,
    Frame,
    FrameHead,
    FrameReader,
    encode_head,
    pack_header,
    sealed_prefix,
)

log = logging.getLogger("p2pdl.transport")

HeaderCheck = Callable[[dict[str, Any], int], None]
"""Validates a frame's header (and payload length) against what the receiver expects."""

Offload = Callable[[int, Callable[[], Any]], Awaitable[Any]]
"""Runs `fn` touching `nbytes` bytes (inline when small, on a worker thread when large)."""

DEFAULT_UNSIZED = 64 * 1024
"""The most a receive posted without a buffer accepts, unless it says otherwise."""

REFUSED = "handshake refused"
"""All an unauthenticated peer learns of why it was turned away."""


class _Posted:
    """A receive waiting for one tag: a destination (or none: allocate up to `limit`)."""

    __slots__ = ("check", "future", "limit", "view")

    def __init__(
        self,
        view: memoryview | None,
        check: HeaderCheck | None,
        future: asyncio.Future,
        limit: int,
    ) -> None:
        self.view = view
        self.check = check
        self.future = future
        self.limit = limit


@dataclass(slots=True)
class _Landing:
    """A sealed payload being read: its ciphertext lands in its final buffer, its tag here;
    it is opened in place on delivery. `counted`: it counts against the early budget."""

    head: FrameHead
    plain: int
    tag: bytearray
    counted: bool


@dataclass(slots=True)
class _Out:
    """One sealed frame on its way out, in frame-number order."""

    seq: int
    prefix: bytes
    head: bytes
    written: asyncio.Future[None]
    payload: memoryview | None = None
    ready: bool = False


_RETIRED_KEPT = 256
"""Retired tag ranges a link remembers (late frames of older operations are rare)."""

OFFLOAD_BYTES = 256 * 1024
"""Payloads from this size are sealed and opened through `offload` (the reduce threads)."""


class Link(asyncio.BufferedProtocol):
    """One TCP connection to one peer. Before `authenticated`, frames go to the handshake."""

    def __init__(self, limits: Limits, *, label: str = "peer", dialing: bool = False) -> None:
        self.limits = limits
        self.label = label
        self.rank: int | None = None
        self.authenticated = False
        self.lost: P2PDLError | None = None
        self.departed = False
        """The peer said goodbye: every frame it sent came before that, and no more will."""
        self.closed_here = False
        """This side closed the link (its node is leaving): nothing may use it any more."""
        self.offload: Offload | None = None
        """Where large payloads are sealed and opened (None: on the loop)."""
        self.peer_address: tuple[str, int] | None = None
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._transport: asyncio.Transport | None = None
        handshake_header = limits.max_header if dialing else limits.handshake_header
        self._reader = FrameReader(
            max_header=handshake_header, max_payload=0, scratch=HANDSHAKE_SCRATCH
        )
        self._posted: dict[int, _Posted] = {}
        self._early: dict[int, tuple[dict[str, Any], bytearray]] = {}
        self._early_bytes = 0
        self._handshake: collections.deque[tuple[dict[str, Any], bytes]] = collections.deque()
        self._handshake_waiter: asyncio.Future[None] | None = None
        self._handshake_frame = False
        self._holding = False
        """Reading is held by the lock-step handshake (not by a missing post)."""
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._reading_paused = False
        self._retired: dict[int, int] = {}
        """Retired tag ranges, start -> stop, oldest first (at most `_RETIRED_KEPT`)."""
        self._retired_starts: list[int] = []
        """The same starts, sorted: one bisect tells whether a tag is retired."""
        self._retired_newest: int | None = None
        """The start of the range retired last (the next adjacent one extends it)."""
        self._guards: list[tuple[int, int, HeaderCheck, Callable[[P2PDLError], None]]] = []
        self._discard_buffer: memoryview | None = None
        self._sealer: Sealer | None = None
        self._opener: Opener | None = None
        self._landing: _Landing | None = None
        self._opening: dict[int, asyncio.Future[None]] = {}
        """Sealed payloads being opened off the loop, by tag (awaited by `settle`)."""
        self._outq: collections.deque[_Out] = collections.deque()
        self._scratch_free: list[bytearray] = []
        self.on_lost: Callable[[Link], None] | None = None
        self._deferred_loss: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer_address = (str(peer[0]), int(peer[1]))
        transport.set_write_buffer_limits(high=0, low=0)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.lost is not None:
            # Closing politely (or already failed): whatever still arrives is read and
            # dropped, never written into a buffer a caller posted.
            return self._scratch()
        try:
            return self._reader.get_buffer()
        except Exception as exc:  # never raise here: uvloop would tear the loop's state down
            self._fail(ProtocolError(f"receive state broken: {exc}", rank=self.rank))
            return self._scratch()

    def _scratch(self) -> memoryview:
        if self._discard_buffer is None:
            self._discard_buffer = memoryview(bytearray(1 << 16))
        return self._discard_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.lost is not None:
            return
        self._reader.advance(nbytes)
        self._process()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        detail = f"connection closed ({exc})" if exc else "connection closed by peer"
        self._fail(PeerLostError([self.rank] if self.rank is not None else [], detail))
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def local_host(self) -> str | None:
        """This end's address on the connection."""
        if self._transport is None:
            return None
        sockname = self._transport.get_extra_info("sockname")
        return str(sockname[0]) if sockname else None

    # ----------------------------------------------------------------------- receiving
    def _process(self) -> None:
        reader = self._reader
        try:
            while self.lost is None and not self._reading_paused:
                event = reader.poll()
                if event is None:
                    return
                if isinstance(event, FrameHead):
                    if not self._route(event):
                        self._pause_reading()
                        return
                else:
                    self._deliver(event)
        except ProtocolError as exc:
            self._fail(ProtocolError(str(exc), rank=self.rank))

    def _wire_plain(self, head: FrameHead) -> int:
        """The plaintext length of a frame's payload (a sealed record less its tag)."""
        if self._opener is None or not head.payload_len:
            return head.payload_len
        if head.payload_len < TAG_BYTES:
            raise ProtocolError(f"sealed payload of {head.payload_len} bytes has no room for a tag")
        return head.payload_len - TAG_BYTES

    def _route(self, head: FrameHead) -> bool:
        """Give a parsed header its payload destination; False means wait for a post."""
        header = head.header
        if not self.authenticated:
            if head.payload_len:
                raise ProtocolError("payload before authentication")
            self._handshake.append((header, head.raw))
            self._handshake_frame = True
            self._reader.provide(memoryview(b""))
            # Lock-step: nothing more is read until the handshake asks for it.
            self._holding = True
            self._pause_reading()
            if self._handshake_waiter is not None and not self._handshake_waiter.done():
                self._handshake_waiter.set_result(None)
            return True
        tag = header.get("t")
        plain = self._wire_plain(head)
        if not isinstance(tag, int) or isinstance(tag, bool):
            if header.get("bye") is True and not plain:
                self._reader.provide(memoryview(b""))
                return True
            raise ProtocolError(f"frame without an integer tag: {sorted(header)}")
        posted = self._posted.get(tag)
        if posted is None:
            if self._is_retired(tag):
                self._reader.discard()
                return True
            if self._guards and not self._guard_passes(tag, header, plain):
                self._reader.discard()
                return True
            if tag in self._early:
                raise ProtocolError(f"two frames for tag {tag}")
            if plain <= self.limits.eager_payload and (
                self._early_bytes + plain <= self.limits.eager_budget
            ):
                self._early_bytes += plain
                self._provide(head, plain, memoryview(bytearray(plain)), counted=True)
                return True
            return False
        if posted.check is not None:
            try:
                posted.check(header, plain)
            except P2PDLError as exc:
                self._refuse(tag, posted, exc)
                return True
        if posted.view is None:
            if plain > posted.limit:
                self._refuse(
                    tag,
                    posted,
                    ProtocolError(
                        f"sent {plain} bytes for tag {tag}, at most {posted.limit} are accepted",
                        rank=self.rank,
                    ),
                )
                return True
            posted.view = memoryview(bytearray(plain))
        elif posted.view.nbytes != plain:
            self._refuse(
                tag,
                posted,
                ProtocolError(
                    f"sent {plain} bytes for tag {tag}, the posted buffer holds "
                    f"{posted.view.nbytes}",
                    rank=self.rank,
                ),
            )
            return True
        self._provide(head, plain, posted.view)
        return True

    def _provide(
        self, head: FrameHead, plain: int, destination: memoryview, *, counted: bool = False
    ) -> None:
        """The payload lands in `destination` itself; a sealed one's tag in a small buffer
        of its own, and the ciphertext is opened in place when the frame is complete."""
        if self._opener is None or not plain:
            self._reader.provide(destination)
            return
        tag = bytearray(TAG_BYTES)
        self._landing = _Landing(head, plain, tag, counted)
        self._reader.provide(destination, memoryview(tag))

    def _refuse(self, tag: int, posted: _Posted, error: P2PDLError) -> None:
        del self._posted[tag]
        if not posted.future.done():
            posted.future.set_exception(error)
        self._reader.discard()

    def _deliver(self, frame: Frame) -> None:
        if self._handshake_frame:  # already queued for the handshake when its header came
            self._handshake_frame = False
            return
        tag = frame.header.get("t")
        if tag is None:  # the peer's goodbye
            self.departed = True
            self._fail(
                PeerLostError(
                    [self.rank] if self.rank is not None else [], f"{self.label} closed its node"
                ),
                keep_open=True,
            )
            return
        landing, self._landing = self._landing, None
        posted = self._posted.pop(tag, None)
        buffer = frame.payload.obj
        if posted is not None and posted.view is not None and buffer is posted.view.obj:
            if landing is not None:
                self._open_posted(tag, landing, posted)
            elif not posted.future.done():
                posted.future.set_result((frame.header, posted.view))
            return
        if not isinstance(buffer, bytearray):
            return  # its receive was posted, then cancelled: nobody wants this frame now
        # The payload went to an early buffer: no receive was posted when its header came.
        if landing is not None:
            opener = self._opener
            assert opener is not None
            try:
                opener.open_payload_in_place(
                    landing.head.seq, landing.head.prefix, frame.payload, bytes(landing.tag)
                )
            except ProtocolError as exc:
                self._fail(ProtocolError(str(exc), rank=self.rank))
                return
        self._early_bytes -= len(buffer)
        if posted is not None:
            # The receive was posted while this payload was still arriving: copy it over.
            self._fill(posted, tag, frame.header, buffer)
            return
        self._early_bytes += len(buffer)
        self._early[tag] = (frame.header, buffer)

    def _open_posted(self, tag: int, landing: _Landing, posted: _Posted) -> None:
        """Open a sealed payload in the posted buffer it landed in (large ones off the loop)."""
        opener = self._opener
        view = posted.view
        assert opener is not None and view is not None
        head = landing.head
        tag_bytes = bytes(landing.tag)

        def open_record() -> None:
            opener.open_payload_in_place(head.seq, head.prefix, view, tag_bytes)

        if self.offload is None or landing.plain < OFFLOAD_BYTES:
            try:
                open_record()
            except ProtocolError as exc:
                self._fail(ProtocolError(str(exc), rank=self.rank))
                return
            if not posted.future.done():
                posted.future.set_result((head.header, view))
            return
        self._opening[tag] = asyncio.ensure_future(
            self._open_off_loop(tag, open_record, posted, head.header)
        )

    async def _open_off_loop(
        self,
        tag: int,
        open_record: Callable[[], None],
        posted: _Posted,
        header: dict[str, Any],
    ) -> None:
        assert self.offload is not None and posted.view is not None
        try:
            await self.offload(posted.view.nbytes, open_record)
        except ProtocolError as exc:
            self._fail(ProtocolError(str(exc), rank=self.rank))
            if not posted.future.done():
                posted.future.set_exception(self.lost or exc)
            return
        finally:
            self._opening.pop(tag, None)
        if not posted.future.done():
            posted.future.set_result((header, posted.view))

    def _fill(self, posted: _Posted, tag: int, header: dict[str, Any], buffer: bytearray) -> None:
        """Complete a receive from a frame that was kept in memory (it came early)."""
        future, view, check = posted.future, posted.view, posted.check
        try:
            if check is not None:
                check(header, len(buffer))
            if view is None:
                if len(buffer) > posted.limit:
                    raise ProtocolError(
                        f"sent {len(buffer)} bytes for tag {tag}, at most {posted.limit} are "
                        "accepted",
                        rank=self.rank,
                    )
                view = memoryview(buffer)
            elif view.nbytes != len(buffer):
                raise ProtocolError(
                    f"sent {len(buffer)} bytes for tag {tag}, "
                    f"the posted buffer holds {view.nbytes}",
                    rank=self.rank,
                )
            else:
                view[:] = buffer
        except P2PDLError as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result((header, view))

    def post(
        self,
        tag: int,
        view: memoryview | None = None,
        check: HeaderCheck | None = None,
        *,
        limit: int = DEFAULT_UNSIZED,
    ) -> asyncio.Future[tuple[dict[str, Any], memoryview]]:
        """Expect one frame with `tag`; its payload lands in `view` (or a new buffer of at
        most `limit` bytes).

        The future resolves to `(header, payload_view)`; it fails with the link's error if
        the connection is lost, or with the error `check` raised for a mismatched header.
        """
        future: asyncio.Future[tuple[dict[str, Any], memoryview]] = self._loop.create_future()
        if view is not None and view.format != "B":
            view = view.cast("B")
        posted = _Posted(view, check, future, limit)
        early = self._early.pop(tag, None)
        if early is not None:
            # Frames that arrived complete stay deliverable after the peer left: it sent
            # them before it went, and the receiver may still need them.
            header, buffer = early
            self._early_bytes -= len(buffer)
            self._fill(posted, tag, header, buffer)
            return future
        if self.lost is not None:
            future.set_exception(self.lost)
            return future
        if tag in self._posted:
            raise RuntimeError(f"tag {tag} is already posted on the link to {self.label}")
        self._posted[tag] = posted
        pending = self._reader.pending_head
        if pending is not None and pending.header.get("t") == tag:
            self._resume_reading()
        return future

    def _guard_passes(self, tag: int, header: dict[str, Any], size: int) -> bool:
        for lo, hi, check, on_error in self._guards:
            if lo <= tag < hi:
                try:
                    check(header, size)
                except P2PDLError as exc:
                    on_error(exc)
                    return False
        return True

    def guard(
        self, lo: int, hi: int, check: HeaderCheck, on_error: Callable[[P2PDLError], None]
    ) -> None:
        """Check every frame with a tag in [lo, hi) as it arrives, posted for or not.

        A frame that fails `check` is dropped and `on_error` gets the error: an operation
        learns at once that a peer called something else, even when it never posts a
        receive for that peer's frames. Frames already waiting are checked now.
        """
        self._guards.append((lo, hi, check, on_error))
        for tag in [t for t in self._early if lo <= t < hi]:
            header, buffer = self._early[tag]
            if not self._guard_passes(tag, header, len(buffer)):
                self._early_bytes -= len(self._early.pop(tag)[1])
        pending = self._reader.pending_head
        if pending is not None and self._reading_paused and not self._holding:
            tag = pending.header.get("t", -1)
            plain = self._wire_plain(pending)
            if lo <= tag < hi and not self._guard_passes(tag, pending.header, plain):
                self._reader.discard()
                self._resume_reading()

    def unguard(self, check: HeaderCheck) -> None:
        """Stop checking frames with `check` (a watch that is over; the range stays open)."""
        self._guards = [g for g in self._guards if g[2] is not check]

    def _is_retired(self, tag: int) -> bool:
        # Every finished operation retires its range, so this runs for every frame that
        # arrives before its receive is posted: a bisect, not a scan over 256 ranges.
        starts = self._retired_starts
        index = bisect.bisect_right(starts, tag) - 1
        return index >= 0 and tag < self._retired[starts[index]]

    def retire(self, lo: int, hi: int) -> None:
        """Drop frames with tags in [lo, hi) from now on: they belong to an abandoned operation.

        Ranges must not overlap (each is one operation's tags); the newest 256 are kept, and
        one that starts where the newest ends extends it (operations mostly finish in order,
        so a run of them costs one entry).

        Posted receives in the range are cancelled and early frames freed; a large frame that
        was waiting for its buffer is skipped so the connection flows again.
        """
        retired = self._retired
        newest = self._retired_newest
        if newest is not None and retired.get(newest) == lo:
            retired[newest] = hi
        else:
            if lo not in retired:
                bisect.insort(self._retired_starts, lo)
            retired[lo] = max(hi, retired.get(lo, hi))
            self._retired_newest = lo
            if len(retired) > _RETIRED_KEPT:
                oldest = next(iter(retired))
                del retired[oldest]
                self._retired_starts.remove(oldest)
        if self._guards:
            self._guards = [g for g in self._guards if not (lo <= g[0] and g[1] <= hi)]
        if self._posted:
            for tag in [t for t in self._posted if lo <= t < hi]:
                self.cancel_post(tag)
        if self._early:
            for tag in [t for t in self._early if lo <= t < hi]:
                self._early_bytes -= len(self._early.pop(tag)[1])
        pending = self._reader.pending_head
        if (
            pending is not None
            and lo <= pending.header.get("t", -1) < hi
            and self._reading_paused
            and not self._holding
        ):
            self._resume_reading()

    def opening(self, lo: int, hi: int) -> list[asyncio.Future[None]]:
        """Sealed payloads with tags in [lo, hi) still being opened into posted buffers (an
        operation that ends waits for them, so no buffer is written after it returned)."""
        return [future for tag, future in self._opening.items() if lo <= tag < hi]

    def cancel_post(self, tag: int) -> None:
        """Forget a posted receive (after a failed collective); its frame, if late, is kept.

        A payload already arriving into the cancelled buffer is skipped from here on, so the
        caller's memory is not written after the receive was given up.
        """
        posted = self._posted.pop(tag, None)
        if posted is None:
            return
        if not posted.future.done():
            posted.future.cancel()
        arriving = self._reader.receiving_head
        if arriving is not None and arriving.header.get("t") == tag:
            self._reader.abandon()
            self._landing = None

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None and not self._holding:
            self._reading_paused = False
            pending = self._reader.pending_head
            if pending is not None:
                try:
                    routed = self._route(pending)
                except ProtocolError as exc:
                    self._fail(ProtocolError(str(exc), rank=self.rank))
                    return
                if not routed:
                    self._pause_reading()
                    return
            self._process()
            if not self._reading_paused and self.lost is None:
                self._transport.resume_reading()

    # ---------------------------------------------------------------- scratch buffers
    def _take_scratch(self, nbytes: int) -> bytearray:
        for index, buffer in enumerate(self._scratch_free):
            if len(buffer) >= nbytes:
                return self._scratch_free.pop(index)
        return bytearray(nbytes)

    def _give_scratch(self, buffer: bytearray) -> None:
        if len(self._scratch_free) < 4:
            self._scratch_free.append(buffer)

    # ------------------------------------------------------------------------- sending
    async def send(self, header: dict[str, Any], payload: memoryview | None = None) -> None:
        """Queue one frame; return once it has left user space (or fail if the link is lost)."""
        if self.lost is not None:
            raise self.lost
        transport = self._transport
        assert transport is not None
        if payload is not None and payload.format != "B":
            payload = payload.cast("B")
        if self._sealer is None:
            if payload is None or payload.nbytes == 0:
                transport.write(encode_head(header, 0))
            else:
                transport.writelines((encode_head(header, payload.nbytes), payload))
            await self._drained()
            return
        out = self._queue_sealed(header, payload)
        if payload is not None and out.payload is not None:
            if self.offload is not None and payload.nbytes >= OFFLOAD_BYTES:
                # Once numbered, a sealed frame must go out whatever happens to its sender
                # (the peer opens frames in order): the sealing runs shielded.
                sealing = asyncio.ensure_future(self._seal_off_loop(out, payload))
                sealing.add_done_callback(_retrieve)
                await asyncio.shield(sealing)
            else:
                self._sealer.seal_payload_into(out.seq, out.prefix, payload, out.payload)
        out.ready = True
        self._flush()
        if not out.written.done():  # behind a frame still being sealed off the loop
            await out.written
        await self._drained()
        if out.payload is not None:
            self._give_scratch(out.payload.obj)  # type: ignore[arg-type]

    async def _drained(self) -> None:
        if self._write_paused:
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter
            if self.lost is not None:
                raise self.lost

    def _queue_sealed(self, header: dict[str, Any], payload: memoryview | None) -> _Out:
        sealer = self._sealer
        assert sealer is not None
        seq = sealer.number()
        packed = pack_header(header)
        plain = payload.nbytes if payload is not None else 0
        prefix = sealed_prefix(len(packed) + TAG_BYTES, plain + TAG_BYTES if plain else 0)
        out = _Out(
            seq,
            prefix,
            prefix + sealer.seal_header(seq, prefix, packed),
            self._loop.create_future(),
        )
        if plain:
            out.payload = memoryview(self._take_scratch(plain + TAG_BYTES))[: plain + TAG_BYTES]
        self._outq.append(out)
        return out

    async def _seal_off_loop(self, out: _Out, payload: memoryview) -> None:
        sealer, target, offload = self._sealer, out.payload, self.offload
        assert sealer is not None and target is not None and offload is not None

        def seal() -> None:
            sealer.seal_payload_into(out.seq, out.prefix, payload, target)

        try:
            await offload(payload.nbytes, seal)
        finally:
            out.ready = True  # (if sealing failed, the peer fails the link on this frame)
            self._flush()

    def _flush(self) -> None:
        """Write the sealed frames that are ready, in frame-number order."""
        transport = self._transport
        while self._outq and self._outq[0].ready:
            out = self._outq.popleft()
            if self.lost is None and transport is not None and not transport.is_closing():
                if out.payload is None:
                    transport.write(out.head)
                else:
                    transport.writelines((out.head, out.payload))
            if not out.written.done():
                out.written.set_result(None)

    def send_nowait(self, header: dict[str, Any]) -> None:
        """Queue a payload-less control frame without waiting (used for error reports)."""
        if self.lost is not None or self._transport is None:
            return
        if self._sealer is None:
            self._transport.write(encode_head(header, 0))
            return
        out = self._queue_sealed(header, None)
        out.ready = True
        self._flush()

    # ------------------------------------------------------------------------ handshake
    async def next_handshake_message(self) -> tuple[dict[str, Any], bytes]:
        """The peer's next handshake frame (header, its bytes as they arrived)."""
        while not self._handshake:
            if self.lost is not None:
                raise self.lost
            self._handshake_waiter = self._loop.create_future()
            self._release()
            done, _ = await asyncio.wait(
                {self._handshake_waiter, self.closed}, return_when=asyncio.FIRST_COMPLETED
            )
            if self._handshake_waiter not in done and not self._handshake:
                raise self.lost or PeerLostError([], "connection closed during handshake")
        return self._handshake.popleft()

    def _release(self) -> None:
        """Let the reader go on (the handshake wants the next frame, or it is over)."""
        if self._holding:
            self._holding = False
            self._resume_reading()

    def send_handshake(self, raw: bytes) -> None:
        """Write a plain handshake frame whose header bytes are `raw` (they are hashed)."""
        if self._transport is not None and self.lost is None:
            self._transport.write(PREFIX.pack(b"P2", VERSION, 0, len(raw), 0) + raw)

    def start_sealing(self, send_key: bytes, recv_key: bytes) -> None:
        """From now on every frame this side sends is sealed, and every frame it reads must
        be (the handshake holds the reader, so the switch falls between two frames)."""
        self._sealer = Sealer(send_key)
        self._opener = Opener(recv_key, self.label)
        self._reader.expect_sealed(self._opener)

    def mark_authenticated(self, rank: int) -> None:
        self.rank = rank
        self.label = f"rank {rank}" if rank >= 0 else "a joining node"
        if self._opener is not None:
            self._opener.peer = self.label
        self.authenticated = True
        self._reader.set_limits(
            max_header=self.limits.max_header, max_payload=self.limits.max_payload
        )
        self._release()

    @property
    def sealed(self) -> bool:
        return self._sealer is not None

    # ------------------------------------------------------------------------- failure
    def _fail(self, error: P2PDLError, *, keep_open: bool = False) -> None:
        if self.lost is not None:
            return
        if self._opening and isinstance(error, PeerLostError) and not self.closed_here:
            # Frames that arrived whole before the peer left are still being opened: they
            # are delivered first, then the loss (a departed peer served them).
            if self._deferred_loss is None:
                self._deferred_loss = asyncio.ensure_future(self._fail_later(error, keep_open))
            return
        self.lost = error
        if isinstance(error, ProtocolError):
            log.warning("closing connection to %s: %s", self.label, error)
        for posted in self._posted.values():
            if not posted.future.done():
                posted.future.set_exception(error)
        self._posted.clear()
        if isinstance(error, (ProtocolError, AuthenticationError)):
            self._early.clear()  # from a peer that broke the protocol: nothing is trusted
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        for out in self._outq:
            if not out.written.done():
                out.written.set_result(None)
        self._outq.clear()
        if self._handshake_waiter is not None and not self._handshake_waiter.done():
            self._handshake_waiter.set_result(None)
        if self._transport is not None and not keep_open:
            self._transport.abort() if isinstance(error, ProtocolError) else self._transport.close()
        if self.on_lost is not None:
            self.on_lost(self)

    async def _fail_later(self, error: P2PDLError, keep_open: bool) -> None:
        while self._opening:
            await asyncio.gather(*self._opening.values(), return_exceptions=True)
        self._fail(error, keep_open=keep_open)

    def close(self) -> None:
        """Close the connection now; pending receives fail with PeerLostError."""
        self.closed_here = True
        self._fail(PeerLostError([self.rank] if self.rank is not None else [], "closed locally"))

    async def shutdown(self, timeout: float) -> None:
        """Close politely: frames already queued (error reports above all) reach the peer.

        Pending receives fail at once. Queued frames go out, then a goodbye, then FIN;
        whatever still arrives is read and dropped until the peer closes its side too, or
        `timeout` passes. Closing a socket with unread data makes the kernel send a reset,
        and a reset makes the peer's kernel drop what it had not read yet: the abort frame
        that named the rank that really failed would be lost, and the peer would blame this
        rank instead.
        """
        self.closed_here = True
        transport = self._transport
        if self._outq and self.lost is None:
            # Sealed frames still being encrypted: they go out before the goodbye.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*(out.written for out in list(self._outq)))
        if self.lost is None and transport is not None and not transport.is_closing():
            if self.authenticated:
                # Goodbye first: the peer learns that everything this node owed it came
                # before, and names a departure (not a crash) if it still waits for more.
                self.send_nowait({"bye": True})
            self._fail(
                PeerLostError([self.rank] if self.rank is not None else [], "closed locally"),
                keep_open=True,
            )
            if transport.can_write_eof():
                with contextlib.suppress(OSError, RuntimeError):
                    transport.write_eof()
            if self._reading_paused:
                self._reading_paused = False
                self._holding = False
                transport.resume_reading()
        else:
            self.close()
            if transport is None:
                return
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.closed)
        except TimeoutError:
            if self._transport is not None:
                self._transport.abort()


# --------------------------------------------------------------------------- handshake
@dataclass(frozen=True, slots=True)
class Credentials:
    """What both ends must agree on: the cluster, the shared secret, encryption."""

    cluster_id: str
    secret: bytes | None = field(default=None, repr=False)
    encryption: bool = True

    @property
    def auth(self) -> bool:
        return self.secret is not None

    @property
    def sealed(self) -> bool:
        """Frames after the handshake are encrypted (needs a secret)."""
        return self.secret is not None and self.encryption

    def stretched(self) -> bytes:
        assert self.secret is not None
        return stretch(self.secret, self.cluster_id)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a background task's failure as seen (its sender reports it, or has gone)."""
    if not task.cancelled():
        task.exception()


def _is_nonce(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == NONCE_BYTES


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _send_reject(link: Link, reason: str, *, retry: bool = False) -> None:
    """Tell the peer why it is turned away: in detail once it has authenticated (the frame
    is sealed then), and nothing but `REFUSED` before."""
    if link.sealed or link.authenticated:
        link.send_nowait({"h": "reject", "reason": reason[:200], "retry": retry})
    else:
        link.send_handshake(pack_header({"h": "reject", "reason": REFUSED, "retry": False}))


def _modes(creds: Credentials) -> dict[str, bool]:
    return {"auth": creds.auth, "enc": creds.sealed}


def _check_modes(theirs: dict[str, Any], creds: Credentials, who: str) -> None:
    if theirs.get("auth") is not creds.auth:
        mine = "has a shared secret" if creds.auth else "runs without a secret (insecure)"
        raise AuthenticationError(f"this node {mine} and {who} does not agree")
    if creds.auth and theirs.get("enc") is not creds.sealed:
        mine = "encrypts its links" if creds.sealed else "runs with encryption=False"
        raise AuthenticationError(f"this node {mine} and {who} does not: both ends must agree")


async def dial_handshake(
    link: Link, creds: Credentials, rank: int, expect_rank: int, extra: dict[str, Any] | None
) -> dict[str, Any]:
    """Client side of the handshake; returns the welcome. AuthenticationError if refused
    (its `retry` says whether trying again later may pass) or if the peer cannot prove it
    knows the secret."""
    where = f"{link.label}" + (
        f" at {link.peer_address[0]}:{link.peer_address[1]}" if link.peer_address else ""
    )
    hello = {
        "h": "hello",
        "v": VERSION,
        "cluster": creds.cluster_id,
        "rank": rank,
        "nonce": os.urandom(NONCE_BYTES),
        **_modes(creds),
        **(extra or {}),
    }
    raw_hello = pack_header(hello)
    link.send_handshake(raw_hello)
    reply, raw_reply = await link.next_handshake_message()
    if reply.get("h") == "reject":
        raise AuthenticationError(f"refused by {where}: {str(reply.get('reason'))[:200]}")
    if (
        reply.get("h") != "hello"
        or reply.get("v") != VERSION
        or not _is_int(reply.get("rank"))
        or not _is_nonce(reply.get("nonce"))
    ):
        raise AuthenticationError(f"{where} answered with a malformed hello")
    _check_modes(reply, creds, where)
    if expect_rank >= 0 and reply["rank"] != expect_rank:
        raise AuthenticationError(
            f"expected rank {expect_rank} at {where}, found rank {reply['rank']}"
        )
    if creds.auth:
        transcript = Transcript()
        transcript.add(raw_hello)
        transcript.add(raw_reply)
        digest = transcript.digest()
        stretched = creds.stretched()
        server_proof, _ = await link.next_handshake_message()
        want = proof(stretched, b"server", digest)
        if server_proof.get("h") != "proof" or not proofs_match(want, server_proof.get("mac")):
            raise AuthenticationError(
                f"{where} (rank {reply['rank']}) does not know the shared secret",
                rank=reply["rank"],
            )
        link.send_handshake(pack_header({"h": "proof", "mac": proof(stretched, b"client", digest)}))
        if creds.sealed:
            to_server, to_client = session_keys(stretched, digest)
            link.start_sealing(send_key=to_server, recv_key=to_client)
    final, _ = await link.next_handshake_message()
    if final.get("h") != "welcome":
        raise AuthenticationError(
            f"refused by rank {reply['rank']}: {str(final.get('reason'))[:200]}",
            rank=reply["rank"],
            retry=final.get("retry") is True,
        )
    link.mark_authenticated(reply["rank"])
    return final


async def accept_handshake(
    link: Link,
    creds: Credentials,
    own_rank: Callable[[dict[str, Any]], Awaitable[int]],
    admit: Callable[[dict[str, Any]], dict[str, Any]],
) -> dict[str, Any]:
    """Server side: read hello, prove ourselves, verify the client, then `admit` decides.

    `own_rank(hello)` gives the rank to answer with; it may wait until this node knows it.
    `admit(hello)` returns the welcome's extra fields, or raises AuthenticationError /
    ProtocolError to turn an authenticated peer away (duplicate or unexpected ranks, an
    epoch this node has not reached yet). Nothing an unauthenticated peer sends reaches
    `admit`: a failed handshake touches no shared state.
    """
    hello, raw_hello = await link.next_handshake_message()
    try:
        if (
            hello.get("h") != "hello"
            or hello.get("v") != VERSION
            or not _is_int(hello.get("rank"))
            or not _is_nonce(hello.get("nonce"))
            or not isinstance(hello.get("cluster"), str)
        ):
            raise AuthenticationError("a malformed hello")
        if hello["cluster"] != creds.cluster_id:
            raise AuthenticationError("a hello for another cluster")
        _check_modes(hello, creds, "the client")
    except AuthenticationError as exc:
        _send_reject(link, str(exc))
        raise
    rank = await own_rank(hello)
    reply = {"h": "hello", "v": VERSION, "rank": rank, "nonce": os.urandom(NONCE_BYTES)}
    raw_reply = pack_header({**reply, **_modes(creds)})
    link.send_handshake(raw_reply)
    claimed = hello["rank"]
    if creds.auth:
        transcript = Transcript()
        transcript.add(raw_hello)
        transcript.add(raw_reply)
        digest = transcript.digest()
        stretched = creds.stretched()
        link.send_handshake(pack_header({"h": "proof", "mac": proof(stretched, b"server", digest)}))
        client_proof, _ = await link.next_handshake_message()
        want = proof(stretched, b"client", digest)
        if client_proof.get("h") != "proof" or not proofs_match(want, client_proof.get("mac")):
            _send_reject(link, REFUSED)
            raise AuthenticationError(
                f"a client claiming rank {claimed} does not know the shared secret"
            )
        if creds.sealed:
            to_server, to_client = session_keys(stretched, digest)
            link.start_sealing(send_key=to_client, recv_key=to_server)
    try:
        extra = admit(hello)
    except (AuthenticationError, ProtocolError) as exc:
        # The peer has authenticated: it may learn why (sealed, when encrypting).
        link.send_nowait(
            {"h": "reject", "reason": str(exc)[:200], "retry": getattr(exc, "retry", False)}
        )
        raise
    link.mark_authenticated(claimed)
    await link.send({"h": "welcome", **extra})
    return hello

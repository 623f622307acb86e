"""Authenticated TCP links between ranks: handshake, tagged frames, posted buffers, backpressure.

The transport knows connections, tags and buffers — never what a slice or a step is.

* Receiving: a caller posts a buffer for `(peer, tag)`; the frame's payload is read by the
  kernel straight into it (`asyncio.BufferedProtocol`). A frame that arrives before its buffer
  is kept in memory when small (bounded per connection); a large one pauses reading on that
  connection until its buffer is posted, so memory never grows with what a peer claims.
* Sending: the prefix+header and the payload are handed to the event loop as two buffers
  (`writelines`), never joined. Write-buffer limits of zero make `pause_writing` fire whenever
  bytes are queued, so `send` returns only once its payload left user space: the caller may
  reuse the buffer at once, and a slow peer slows its sender (backpressure as a future).
* A violation by an unauthenticated peer closes its connection with a logged reason; the
  node keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import hmac
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from p2pdl.config import Limits
from p2pdl.errors import (
    AuthenticationError,
    P2PDLError,
    PeerLostError,
    ProtocolError,
)
from p2pdl.wire import VERSION, Frame, FrameHead, FrameReader, encode_head

log = logging.getLogger("p2pdl.transport")

_MAX_HANDSHAKE_BACKLOG = 8
"""Unread handshake frames a peer may queue before it is cut off (a handshake needs 3)."""

HeaderCheck = Callable[[dict[str, Any], int], None]
"""Validates a frame's header (and payload length) against what the receiver expects."""


class _Posted:
    """A receive waiting for one tag: a destination (or none: allocate) and its future."""

    __slots__ = ("check", "future", "view")

    def __init__(
        self, view: memoryview | None, check: HeaderCheck | None, future: asyncio.Future
    ) -> None:
        self.view = view
        self.check = check
        self.future = future


_RETIRED_KEPT = 256
"""Retired tag ranges a link remembers (late frames of older operations are rare)."""


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
        self.closed = asyncio.get_running_loop().create_future()
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        handshake_header = limits.max_header if dialing else limits.handshake_header
        self._reader = FrameReader(max_header=handshake_header, max_payload=0)
        self._welcome_rank: int | None = None
        self._handshake_frame = False
        self._posted: dict[int, _Posted] = {}
        self._early: dict[int, tuple[dict[str, Any], bytearray]] = {}
        self._early_bytes = 0
        self._handshake_queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._reading_paused = False
        self._retired: dict[int, int] = {}
        """Retired tag ranges, start -> stop, oldest first (at most `_RETIRED_KEPT`)."""
        self._retired_starts: list[int] = []
        """The same starts, sorted: one bisect tells whether a tag is retired."""
        self._guards: list[tuple[int, int, HeaderCheck, Callable[[P2PDLError], None]]] = []
        self._discard_buffer: memoryview | None = None
        self.on_lost: Callable[[Link], None] | None = None
        self.on_unsolicited: Callable[[Link, dict[str, Any], bytearray], bool] | None = None
        """Called for a complete frame no receive was posted for; True if it was consumed."""

    # ----------------------------------------------------------------- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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

    # ----------------------------------------------------------------------- receiving
    def _process(self) -> None:
        reader = self._reader
        try:
            while self.lost is None:
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

    def _route(self, head: FrameHead) -> bool:
        """Give a parsed header its payload destination; False means wait for a post."""
        header = head.header
        if not self.authenticated:
            if head.payload_len:
                raise ProtocolError("payload before authentication")
            if header.get("h") == "welcome" and self._welcome_rank is not None:
                # The server may send data right behind its welcome: switch modes now.
                self.mark_authenticated(self._welcome_rank)
            if self._handshake_queue.qsize() >= _MAX_HANDSHAKE_BACKLOG:
                # Fix: an unauthenticated peer could queue frames without bound until the
                # handshake timeout; no handshake has more than three messages per side.
                raise ProtocolError("too many handshake frames")
            self._handshake_queue.put_nowait(header)
            self._handshake_frame = True
            self._reader.provide(memoryview(b""))
            return True
        tag = header.get("t")
        if not isinstance(tag, int):
            if header.get("bye") is True and not head.payload_len:
                self._reader.provide(memoryview(b""))
                return True
            raise ProtocolError(f"frame without an integer tag: {sorted(header)}")
        posted = self._posted.get(tag)
        if posted is None:
            if self._is_retired(tag):
                self._reader.discard()
                return True
            if self._guards and not self._guard_passes(tag, header, head.payload_len):
                self._reader.discard()
                return True
            if tag in self._early:
                raise ProtocolError(f"two frames for tag {tag}")
            size = head.payload_len
            if size <= self.limits.eager_payload and (
                self._early_bytes + size <= self.limits.eager_budget
            ):
                buffer = bytearray(size)
                self._early_bytes += size
                self._reader.provide(memoryview(buffer))
                return True
            return False
        if posted.check is not None:
            try:
                posted.check(header, head.payload_len)
            except P2PDLError as exc:
                del self._posted[tag]
                if not posted.future.done():
                    posted.future.set_exception(exc)
                self._reader.discard()
                return True
        if posted.view is None:
            posted.view = memoryview(bytearray(head.payload_len))
        elif posted.view.nbytes != head.payload_len:
            del self._posted[tag]
            if not posted.future.done():
                posted.future.set_exception(
                    ProtocolError(
                        f"sent {head.payload_len} bytes for tag {tag}, "
                        f"the posted buffer holds {posted.view.nbytes}",
                        rank=self.rank,
                    )
                )
            self._reader.discard()
            return True
        self._reader.provide(posted.view)
        return True

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
        buffer = frame.payload.obj
        posted = self._posted.pop(tag, None)
        if posted is not None and posted.view is not None and buffer is posted.view.obj:
            if not posted.future.done():
                posted.future.set_result((frame.header, posted.view))
            return
        if not isinstance(buffer, bytearray):
            return  # its receive was posted, then cancelled: nobody wants this frame now
        # The payload went to an early buffer: no receive was posted when its header came.
        self._early_bytes -= len(buffer)
        if posted is not None:
            # The receive was posted while this payload was still arriving: copy it over.
            self._fill(posted.future, tag, frame.header, buffer, posted.view, posted.check)
            return
        if self.on_unsolicited is not None and self.on_unsolicited(self, frame.header, buffer):
            return
        self._early_bytes += len(buffer)
        self._early[tag] = (frame.header, buffer)

    def _fill(
        self,
        future: asyncio.Future[tuple[dict[str, Any], memoryview]],
        tag: int,
        header: dict[str, Any],
        buffer: bytearray,
        view: memoryview | None,
        check: HeaderCheck | None,
    ) -> None:
        """Complete a receive from a frame that was kept in memory (it came early)."""
        try:
            if check is not None:
                check(header, len(buffer))
            if view is None:
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
        self, tag: int, view: memoryview | None = None, check: HeaderCheck | None = None
    ) -> asyncio.Future[tuple[dict[str, Any], memoryview]]:
        """Expect one frame with `tag`; its payload lands in `view` (or a new buffer).

        The future resolves to `(header, payload_view)`; it fails with the link's error if
        the connection is lost, or with the error `check` raised for a mismatched header.
        """
        future: asyncio.Future[tuple[dict[str, Any], memoryview]] = self._loop.create_future()
        if view is not None and view.format != "B":
            view = view.cast("B")
        early = self._early.pop(tag, None)
        if early is not None:
            # Frames that arrived complete stay deliverable after the peer left: it sent
            # them before it went, and the receiver may still need them.
            header, buffer = early
            self._early_bytes -= len(buffer)
            self._fill(future, tag, header, buffer, view, check)
            return future
        if self.lost is not None:
            future.set_exception(self.lost)
            return future
        if tag in self._posted:
            raise RuntimeError(f"tag {tag} is already posted on the link to {self.label}")
        self._posted[tag] = _Posted(view, check, future)
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
        if pending is not None and self._reading_paused:
            tag = pending.header.get("t", -1)
            if lo <= tag < hi and not self._guard_passes(tag, pending.header, pending.payload_len):
                self._reader.discard()
                self._resume_reading()

    def _is_retired(self, tag: int) -> bool:
        # Every finished operation retires its range, so this runs for every frame that
        # arrives before its receive is posted: a bisect, not a scan over 256 ranges.
        starts = self._retired_starts
        index = bisect.bisect_right(starts, tag) - 1
        return index >= 0 and tag < self._retired[starts[index]]

    def retire(self, lo: int, hi: int) -> None:
        """Drop frames with tags in [lo, hi) from now on: they belong to an abandoned operation.

        Ranges must not overlap (each is one operation's tags); the newest 256 are kept.

        Posted receives in the range are cancelled and early frames freed; a large frame that
        was waiting for its buffer is skipped so the connection flows again.
        """
        if lo not in self._retired:
            bisect.insort(self._retired_starts, lo)
        self._retired[lo] = max(hi, self._retired.get(lo, hi))
        if len(self._retired) > _RETIRED_KEPT:
            oldest = next(iter(self._retired))
            del self._retired[oldest]
            self._retired_starts.remove(oldest)
        self._guards = [g for g in self._guards if not (lo <= g[0] and g[1] <= hi)]
        for tag in [t for t in self._posted if lo <= t < hi]:
            self.cancel_post(tag)
        for tag in [t for t in self._early if lo <= t < hi]:
            self._early_bytes -= len(self._early.pop(tag)[1])
        pending = self._reader.pending_head
        if pending is not None and lo <= pending.header.get("t", -1) < hi and self._reading_paused:
            self._resume_reading()

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

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            pending = self._reader.pending_head
            if pending is not None and not self._route(pending):
                self._pause_reading()
                return
            self._process()
            if not self._reading_paused and self.lost is None:
                self._transport.resume_reading()

    # ------------------------------------------------------------------------- sending
    async def send(self, header: dict[str, Any], payload: memoryview | None = None) -> None:
        """Queue one frame; return once it has left user space (or fail if the link is lost)."""
        if self.lost is not None:
            raise self.lost
        transport = self._transport
        assert transport is not None
        if payload is None or payload.nbytes == 0:
            transport.write(encode_head(header, 0))
        else:
            transport.writelines((encode_head(header, payload.nbytes), payload))
        if self._write_paused:
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter
            if self.lost is not None:
                raise self.lost

    def send_nowait(self, header: dict[str, Any]) -> None:
        """Queue a payload-less control frame without waiting (used for error reports)."""
        if self.lost is None and self._transport is not None:
            self._transport.write(encode_head(header, 0))

    def local_host(self) -> str | None:
        """This end's address on the connection."""
        if self._transport is None:
            return None
        sockname = self._transport.get_extra_info("sockname")
        return str(sockname[0]) if sockname else None

    # ------------------------------------------------------------------------ handshake
    async def next_handshake_message(self) -> dict[str, Any]:
        getter = asyncio.ensure_future(self._handshake_queue.get())
        done, _ = await asyncio.wait({getter, self.closed}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        raise self.lost or PeerLostError([], "connection closed during handshake")

    def mark_authenticated(self, rank: int) -> None:
        self.rank = rank
        self.label = f"rank {rank}"
        self.authenticated = True
        self._reader.set_limits(
            max_header=self.limits.max_header, max_payload=self.limits.max_payload
        )

    # ------------------------------------------------------------------------- failure
    def _fail(self, error: P2PDLError, *, keep_open: bool = False) -> None:
        if self.lost is not None:
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
        if self._transport is not None and not keep_open:
            self._transport.abort() if isinstance(error, ProtocolError) else self._transport.close()
        if self.on_lost is not None:
            self.on_lost(self)

    def close(self) -> None:
        """Close the connection now; pending receives fail with PeerLostError."""
        self.closed_here = True
        self._fail(PeerLostError([self.rank] if self.rank is not None else [], "closed locally"))

    async def shutdown(self, timeout: float) -> None:
        """Close politely: frames already queued (error reports above all) reach the peer.

        Pending receives fail at once. Queued frames go out, then FIN; whatever still arrives
        is read and dropped until the peer closes its side too, or `timeout` passes. Closing a
        socket with unread data makes the kernel send a reset, and a reset makes the peer's
        kernel drop what it had not read yet: the abort frame that named the rank that really
        failed would be lost, and the peer would blame this rank instead.
        """
        self.closed_here = True
        transport = self._transport
        if self.lost is None and transport is not None and not transport.is_closing():
            if self.authenticated:
                # Goodbye first: the peer learns that everything this node owed it came
                # before, and names a departure (not a crash) if it still waits for more.
                transport.write(encode_head({"bye": True}, 0))
            self._fail(
                PeerLostError([self.rank] if self.rank is not None else [], "closed locally"),
                keep_open=True,
            )
            if transport.can_write_eof():
                with contextlib.suppress(OSError, RuntimeError):
                    transport.write_eof()
            if self._reading_paused:
                self._reading_paused = False
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
    """What both ends must agree on: protocol, cluster, epoch and the shared secret."""

    cluster_id: str
    secret: bytes | None
    epoch: int = 0


def _mac(secret: bytes, role: bytes, *parts: bytes) -> bytes:
    message = b"\x00".join((b"p2pdl-v%d" % VERSION, role, *parts))
    return hmac.new(secret, message, hashlib.sha256).digest()


def _mac_matches(want: bytes, got: Any) -> bool:
    """Constant-time MAC check that treats a non-bytes claim as a mismatch.

    Fix: `hmac.compare_digest(want, 5)` raises TypeError, which escaped the handshake (not a
    P2PDLError): the listener task died and the hostile connection stayed open for good.
    """
    return isinstance(got, bytes) and hmac.compare_digest(want, got)


def _check_hello(hello: dict[str, Any], creds: Credentials) -> None:
    if hello.get("h") != "hello":
        raise AuthenticationError(f"expected a hello, got {hello.get('h')!r}")
    if hello.get("v") != VERSION:
        raise AuthenticationError(f"protocol version {hello.get('v')!r}, expected {VERSION}")
    if hello.get("cluster") != creds.cluster_id:
        raise AuthenticationError(
            f"cluster id {hello.get('cluster')!r} is not {creds.cluster_id!r}"
        )
    if hello.get("epoch") != creds.epoch:
        raise AuthenticationError(f"membership epoch {hello.get('epoch')!r}, not {creds.epoch}")
    if not isinstance(hello.get("rank"), int) or not isinstance(hello.get("nonce"), bytes):
        raise AuthenticationError("hello without rank or nonce")
    if (creds.secret is None) != (not hello.get("auth", False)):
        raise AuthenticationError("one side has a shared secret and the other has none")


def _reject(link: Link, reason: str, *, retry: bool = False) -> None:
    link.send_nowait({"h": "reject", "reason": reason[:200], "retry": retry})


async def dial_handshake(
    link: Link, creds: Credentials, rank: int, expect_rank: int, extra: dict[str, Any] | None
) -> dict[str, Any]:
    """Client side: hello → verify the server's proof → send ours → wait for welcome."""
    nonce = os.urandom(16)
    hello = {
        "h": "hello",
        "v": VERSION,
        "cluster": creds.cluster_id,
        "epoch": creds.epoch,
        "rank": rank,
        "nonce": nonce,
        "auth": creds.secret is not None,
        **(extra or {}),
    }
    if creds.secret is None and expect_rank >= 0:
        # Without a secret the server answers hello and welcome back to back; both may land
        # in one read, so the link must already know which rank the welcome will come from.
        link._welcome_rank = expect_rank
    await link.send(hello)
    reply = await link.next_handshake_message()
    if reply.get("h") == "reject":
        raise AuthenticationError(f"rejected by {link.label}: {reply.get('reason')}")
    try:
        _check_hello(reply, creds)
        if expect_rank >= 0 and reply["rank"] != expect_rank:
            raise AuthenticationError(f"expected rank {expect_rank}, reached rank {reply['rank']}")
        if creds.secret is not None:
            ranks = b"%d:%d" % (rank, reply["rank"])
            want = _mac(creds.secret, b"server", nonce, reply["nonce"], ranks)
            if not _mac_matches(want, reply.get("mac")):
                raise AuthenticationError(
                    f"rank {reply['rank']} does not know the shared secret", rank=reply["rank"]
                )
            proof = _mac(creds.secret, b"client", reply["nonce"], nonce, ranks)
            link._welcome_rank = reply["rank"]
            await link.send({"h": "proof", "mac": proof})
        else:
            link._welcome_rank = reply["rank"]
    except AuthenticationError as exc:
        _reject(link, str(exc))
        raise
    final = await link.next_handshake_message()
    if final.get("h") != "welcome":
        raise AuthenticationError(
            f"rejected by rank {reply['rank']}: {final.get('reason')}",
            rank=reply["rank"],
            retry=final.get("retry") is True,
        )
    return final


async def accept_handshake(
    link: Link,
    creds: Credentials,
    own_rank: Callable[[dict[str, Any]], Awaitable[int]],
    admit: Callable[[dict[str, Any]], dict[str, Any]],
) -> dict[str, Any]:
    """Server side: read hello, prove ourselves, verify the client, then `admit` decides.

    `own_rank(hello)` gives the rank to answer with; it may wait until this node knows it
    (a node that joined through a leader learns its rank after it started listening).

    `admit(hello)` returns the welcome's extra fields, or raises AuthenticationError /
    ProtocolError to turn the peer away (duplicate or unexpected ranks, for instance).
    """
    hello = await link.next_handshake_message()
    try:
        _check_hello(hello, creds)
    except AuthenticationError as exc:
        _reject(link, str(exc))
        raise
    rank = await own_rank(hello)
    nonce = os.urandom(16)
    reply: dict[str, Any] = {
        "h": "hello",
        "v": VERSION,
        "cluster": creds.cluster_id,
        "epoch": creds.epoch,
        "rank": rank,
        "nonce": nonce,
        "auth": creds.secret is not None,
    }
    if creds.secret is not None:
        ranks = b"%d:%d" % (hello["rank"], rank)
        reply["mac"] = _mac(creds.secret, b"server", hello["nonce"], nonce, ranks)
        await link.send(reply)
        proof = await link.next_handshake_message()
        if proof.get("h") == "reject":
            raise AuthenticationError(
                f"rank {hello['rank']} rejected us: {proof.get('reason')}", rank=hello["rank"]
            )
        want = _mac(creds.secret, b"client", nonce, hello["nonce"], ranks)
        if proof.get("h") != "proof" or not _mac_matches(want, proof.get("mac")):
            error = AuthenticationError(
                f"rank {hello['rank']} does not know the shared secret", rank=hello["rank"]
            )
            _reject(link, str(error))
            raise error
    else:
        await link.send(reply)
    try:
        extra = admit(hello)
    except (AuthenticationError, ProtocolError) as exc:
        _reject(link, str(exc), retry=getattr(exc, "retry", False))
        raise
    link.mark_authenticated(hello["rank"])
    await link.send({"h": "welcome", **extra})
    return hello

"""Sealed memfd segments, and passing their file descriptors between ranks of one host.

A segment is a memfd whose pages are reserved up front and whose size is sealed
(`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`): it has no name in any file system, vanishes
with its last descriptor or mapping, and no process can shrink it under a reader (which would
kill the reader with SIGBUS). Each arena runs one `FdServer`, a Unix-domain socket in the
Linux abstract namespace with a random name, served by a daemon thread. An owner tells its
peers an `Offer` over their authenticated link (the server's name, the segment's id and size,
and a fresh random token); a peer connects, sends the id and token, and gets the descriptor
back with `SCM_RIGHTS` only if it runs under this process's uid (`SO_PEERCRED`) and the
token matches. The receiver `check`s the descriptor before mapping it. Abstract sockets
belong to a network namespace: ranks in different ones cannot reach each other's server.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hmac
import logging
import os
import secrets
import socket
import stat
import struct
import threading
from dataclasses import dataclass

from p2pdl.errors import SharedMemoryError

log = logging.getLogger("p2pdl.collectives")

MEMFD_NAME = "p2pdl-segment"
"""What `/proc/<pid>/fd` shows a segment as (`memfd:p2pdl-segment`)."""
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
"""What a peer's segment must carry before it is mapped: its size can never change."""
SERVER_ID_BYTES = 16
TOKEN_BYTES = 32
ADDRESS_PREFIX = b"\0p2pdl-shm-"
_IDENT = struct.Struct("<16sQQ")  # server id, segment id, size in bytes
_REQUEST = struct.Struct("<Q32s")  # segment id, token
_CRED = struct.Struct("3i")  # pid, uid, gid
OFFER_BYTES = _IDENT.size + TOKEN_BYTES
_GRANTED = b"\x01"
_REFUSED = b"\x00"
ACCEPT_POLL_S = 1.0
"""How often the server thread looks up from `accept` (`close` also wakes it at once)."""
ANSWER_TIMEOUT_S = 5.0
"""The longest the server waits on one client's request before dropping it."""


def address_of(server_id: bytes) -> bytes:
    """The abstract-namespace address of the server `server_id` (never a file name)."""
    return ADDRESS_PREFIX + server_id.hex().encode()


@dataclass(frozen=True)
class Offer:
    """What an owner tells its peers about one segment (64 bytes on the link)."""

    server: bytes
    segment: int
    size: int
    token: bytes

    @property
    def ident(self) -> bytes:
        """Which segment this is, whatever token it is offered with this time."""
        return _IDENT.pack(self.server, self.segment, self.size)

    @property
    def address(self) -> bytes:
        return address_of(self.server)

    def pack(self) -> bytes:
        return self.ident + self.token

    @classmethod
    def parse(cls, data: bytes) -> Offer:
        """An offer from a peer's bytes; ValueError unless it is well formed."""
        if len(data) != OFFER_BYTES:
            raise ValueError(f"a segment offer is {OFFER_BYTES} bytes, got {len(data)}")
        server, segment, size = _IDENT.unpack_from(data)
        if size <= 0:
            raise ValueError(f"a segment offer of {size} bytes")
        return cls(server, segment, size, data[_IDENT.size :])


def ident_of(data: bytes) -> bytes:
    """The segment identity in an offer's bytes (no validation: compare it only)."""
    return data[: _IDENT.size]


def sealed_memfd(size: int) -> int:
    """A new memfd of `size` bytes, its pages reserved and its size sealed.

    Raises SharedMemoryError when the system cannot make or hold one (nothing left open).
    """
    create = getattr(os, "memfd_create", None)
    if create is None:
        raise SharedMemoryError("this system has no memfd_create")
    try:
        fd = create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as exc:
        raise SharedMemoryError(f"cannot create a memfd: {exc.strerror}") from None
    try:
        # Reserve the pages now: a sparse segment in a full memory cgroup fails on first touch.
        os.posix_fallocate(fd, 0, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except OSError as exc:
        os.close(fd)
        raise SharedMemoryError(
            f"cannot reserve {size} bytes of shared memory: {exc.strerror}"
        ) from None
    return fd


def check(fd: int, size: int) -> None:
    """ValueError unless `fd` is a sealed, fully reserved memfd of exactly `size` bytes."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("its descriptor is not a regular file")
    if info.st_size != size:
        raise ValueError(f"it is {info.st_size} bytes, offered as {size}")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise ValueError("it cannot be sealed (not a memfd)") from None
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise ValueError(f"it is not sealed against shrinking and growing (seals {seals:#x})")
    if info.st_blocks * 512 < size:
        raise ValueError("its pages are not reserved")


def _uid_of(sock: socket.socket) -> int:
    _pid, uid, _gid = _CRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    )
    return uid


def _socket() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


class FdServer:
    """Hands this process's offered segments' descriptors to same-uid holders of the token.

    One daemon thread, one client at a time: each answer is a few system calls. A client of
    another uid is turned away before anything is read from it.
    """

    def __init__(self) -> None:
        self.id = secrets.token_bytes(SERVER_ID_BYTES)
        self.address = address_of(self.id)
        self._uid = os.geteuid()
        self._offers: dict[int, tuple[tuple[int, ...], bytes]] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        sock = _socket()
        try:
            sock.bind(self.address)
            sock.listen(64)
            sock.settimeout(ACCEPT_POLL_S)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="p2pdl-shm-fds", daemon=True)
        self._thread.start()

    def offer(self, segment: int, fd: int, size: int, extra: tuple[int, ...] = ()) -> Offer:
        """Serve `fd` as `segment` under a fresh token (the caller keeps `fd` open until
        it calls `withdraw`); `extra` descriptors go with it (a control block's doorbell)."""
        token = secrets.token_bytes(TOKEN_BYTES)
        with self._lock:
            self._offers[segment] = ((fd, *extra), token)
        return Offer(self.id, segment, size, token)

    def withdraw(self, segment: int) -> None:
        """Stop serving `segment`; once this returns the server no longer touches its fd."""
        with self._lock:
            self._offers.pop(segment, None)

    def close(self) -> None:
        """Stop serving; the thread closes the socket as it leaves (at once: it is woken)."""
        if self._closed.is_set():
            return
        self._closed.set()
        with self._lock:
            self._offers.clear()
        with _socket() as wake, contextlib.suppress(OSError):
            wake.setblocking(False)
            wake.connect(self.address)

    def _serve(self) -> None:
        sock = self._sock
        try:
            while not self._closed.is_set():
                try:
                    conn, _ = sock.accept()
                except TimeoutError:
                    continue
                except OSError as exc:
                    log.warning("shared-memory fd server: accept failed: %s", exc)
                    self._closed.wait(ACCEPT_POLL_S)
                    continue
                with conn:
                    if self._closed.is_set():
                        break
                    try:
                        self._answer(conn)
                    except OSError as exc:
                        log.debug("shared-memory fd server: a client failed: %s", exc)
        except Exception:  # never let a bug end the thread silently
            log.exception("shared-memory fd server stopped")
        finally:
            sock.close()

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(ANSWER_TIMEOUT_S)
        uid = _uid_of(conn)
        if uid != self._uid:
            log.info("shared-memory fd server: refused a client of uid %d", uid)
            _refuse(conn, f"uid {uid} is not the owner's uid")
            return
        request = conn.recv(_REQUEST.size + 1)
        if len(request) != _REQUEST.size:
            _refuse(conn, "malformed request")
            return
        segment, token = _REQUEST.unpack(request)
        with self._lock:
            entry = self._offers.get(segment)
            granted = entry is not None and hmac.compare_digest(entry[1], token)
            fds = [os.dup(fd) for fd in entry[0]] if entry is not None and granted else []
        if not fds:
            log.info(
                "shared-memory fd server: refused segment %d (withdrawn or wrong token)", segment
            )
            _refuse(conn, "no such segment, or a wrong token")
            return
        try:
            socket.send_fds(conn, [_GRANTED], fds)
        finally:
            for fd in fds:
                os.close(fd)


def _refuse(conn: socket.socket, reason: str) -> None:
    with contextlib.suppress(OSError):
        conn.send(_REFUSED + reason.encode())


async def fetch(offer: Offer, deadline: float) -> int:
    """The descriptor `offer` names, from its owner's server, by `deadline` (loop time);
    see `fetch_all`."""
    return (await fetch_all(offer, deadline, 1))[0]


async def fetch_all(offer: Offer, deadline: float, count: int) -> list[int]:
    """The `count` descriptors `offer` names, from its owner's server, by `deadline`.

    Never blocks the loop: connect, send and receive wait on the loop. Raises OSError (not
    reachable: another network namespace, a dead owner; TimeoutError) or ValueError
    (refused, or the server is not this uid's, or sent another number of descriptors).
    The caller owns the returned fds.
    """
    loop = asyncio.get_running_loop()
    sock = _socket()
    sock.setblocking(False)
    try:
        async with asyncio.timeout_at(deadline):
            try:
                await loop.sock_connect(sock, offer.address)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot reach its fd server ({exc.strerror})") from None
            uid = _uid_of(sock)
            if uid != os.geteuid():  # never show the token to another uid's process
                raise ValueError(f"its fd server runs as uid {uid}, not as this uid")
            await loop.sock_sendall(sock, _REQUEST.pack(offer.segment, offer.token))
            message, fds, flags = await _receive(loop, sock)
    finally:
        sock.close()
    if flags & socket.MSG_CTRUNC or message[:1] != _GRANTED or len(fds) != count:
        for fd in fds:
            os.close(fd)
        if message[:1] == _REFUSED:
            reason = message[1:200].decode("utf-8", "replace")
            raise ValueError(f"its fd server refused: {reason}")
        raise ValueError(f"its fd server sent {len(fds)} descriptors, not {count}")
    return fds


async def _receive(
    loop: asyncio.AbstractEventLoop, sock: socket.socket
) -> tuple[bytes, list[int], int]:
    """One message and its descriptors, received when `sock` is readable (closed if the
    caller is cancelled after they arrived)."""
    arrived: asyncio.Future[tuple[bytes, list[int], int]] = loop.create_future()

    def readable() -> None:
        if arrived.done():
            return
        try:
            message, fds, flags, _ = socket.recv_fds(sock, 256, 4, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            arrived.set_exception(exc)
            return
        arrived.set_result((message, fds, flags))

    loop.add_reader(sock.fileno(), readable)
    try:
        return await arrived
    except BaseException:
        if arrived.done() and not arrived.cancelled() and arrived.exception() is None:
            for fd in arrived.result()[1]:
                os.close(fd)
        raise
    finally:
        loop.remove_reader(sock.fileno())

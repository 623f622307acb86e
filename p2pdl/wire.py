"""Frames on the wire: a fixed binary prefix, a msgpack header of plain types, a raw payload.

    prefix  = magic "P2" | version u8 | flags u8 | header length u32 | payload length u64
    header  = msgpack map (str keys; ints, floats, str, bytes, lists, maps; never pickle)
    payload = raw bytes, received straight into the buffer posted for the frame's tag

A sealed frame (flag `SEALED`, every frame after an encrypted handshake) carries the header
and the payload as AEAD records (each followed by its tag); the lengths in the prefix are
the records' lengths, and the prefix itself is their associated data. The reader opens a
sealed header with the `open_header` it is given before it parses it (the transport knows
the keys; this module knows only bytes).

`FrameReader` is a sans-I/O parser built for `asyncio.BufferedProtocol`: it hands out the
memory the next bytes should land in, so that a payload is written by the kernel directly
into its final buffer. Limits are checked from the prefix, before anything is allocated.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from p2pdl.errors import ProtocolError

MAGIC = b"P2"
VERSION = 2
SEALED = 0x01
"""Prefix flag: the header and payload are AEAD records."""
PREFIX = struct.Struct("<2sBBIQ")
PREFIX_SIZE = PREFIX.size
MAX_HEADER = 64 * 1024

_SCRATCH = 64 * 1024
HANDSHAKE_SCRATCH = 2 * 1024
"""Receive scratch of a connection that has not authenticated: grown only after it has."""

_packer_default = msgpack.Packer(use_bin_type=True, autoreset=True)


def pack_header(header: dict[str, Any]) -> bytes:
    """Pack a header map; refuse anything msgpack would need an extension type for."""
    try:
        return _packer_default.pack(header)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"frame header holds a value msgpack cannot carry: {exc}") from None


def encode_head(header: dict[str, Any], payload_len: int = 0) -> bytes:
    """Prefix and packed header of one frame; the payload is written after it, uncopied."""
    packed = pack_header(header)
    if len(packed) > MAX_HEADER:
        raise ValueError(f"frame header of {len(packed)} bytes exceeds {MAX_HEADER}")
    return PREFIX.pack(MAGIC, VERSION, 0, len(packed), payload_len) + packed


def sealed_prefix(header_len: int, payload_len: int) -> bytes:
    """The prefix of a sealed frame whose records have these lengths (tags included)."""
    return PREFIX.pack(MAGIC, VERSION, SEALED, header_len, payload_len)


def encode_frame(header: dict[str, Any], payload: bytes | memoryview = b"") -> bytes:
    """A whole frame as one bytes object (tests and tiny control messages only)."""
    return encode_head(header, len(payload)) + bytes(payload)


@dataclass(frozen=True, slots=True)
class FrameHead:
    """A parsed header whose payload has not been read yet (`payload_len` bytes on the wire:
    for a sealed frame the record, tag included)."""

    header: dict[str, Any]
    payload_len: int
    raw: bytes = b""
    """The header's bytes as they arrived (plain frames: the handshake transcript)."""
    prefix: bytes = b""
    """The frame's prefix (a sealed payload's associated data)."""
    seq: int = -1
    """The frame's number in its direction (sealed frames)."""


@dataclass(frozen=True, slots=True)
class Frame:
    """A complete frame; `payload` is the destination view that was provided for it."""

    header: dict[str, Any]
    payload: memoryview


MAX_MESSAGE = 1024 * 1024
"""Default cap on one control message (a msgpack map carried as a frame's payload)."""


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def unpack_message(data: bytes | bytearray | memoryview, *, max_bytes: int = MAX_MESSAGE) -> Any:
    """Decode one msgpack value of plain types with explicit limits (no extension types).

    The limits bound what a hostile sender can make the decoder allocate: no string, byte
    string, array or map can be longer than the message itself.
    """
    size = len(data) if not isinstance(data, memoryview) else data.nbytes
    if size > max_bytes:
        raise ProtocolError(f"message of {size} bytes exceeds the limit {max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=size,
            max_bin_len=size,
            max_array_len=size,
            max_map_len=size,
            max_ext_len=0,
            ext_hook=_no_ext,
        )
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"undecodable message: {type(exc).__name__}: {exc}") from None


def _unpack_header(raw: memoryview) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"undecodable frame header: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"frame header is a {type(header).__name__}, not a map")
    return header


class FrameReader:
    """Incremental frame parser: `get_buffer` → (bytes written) → `advance` → `poll`.

    `poll` returns a `FrameHead` once a header is complete; the owner then calls `provide`
    with a writable view of exactly `payload_len` bytes (the posted buffer, or a fresh one)
    and keeps polling until the `Frame` comes out. Until `provide` is called, `get_buffer`
    must not be called: the owner pauses reading, which is how unposted tags push back.
    """

    __slots__ = (
        "_dest",
        "_dest_filled",
        "_head",
        "_header_len",
        "_main",
        "_max_header",
        "_max_payload",
        "_open_header",
        "_pending",
        "_prefix",
        "_scratch",
        "_scratch_end",
        "_scratch_pos",
        "_scratch_view",
        "_state",
        "_trailer",
    )

    _PREFIX, _HEADER, _WAIT_DEST, _PAYLOAD, _DISCARD = range(5)

    def __init__(
        self, *, max_header: int = MAX_HEADER, max_payload: int = 1 << 62, scratch: int = _SCRATCH
    ) -> None:
        self._max_header = max_header
        self._max_payload = max_payload
        self._open_header: Any = None
        self._prefix = b""
        self._scratch = bytearray(max(scratch, PREFIX_SIZE))
        self._scratch_view = memoryview(self._scratch)
        self._scratch_pos = 0
        self._scratch_end = 0
        self._state = self._PREFIX
        self._header_len = 0
        self._pending = 0
        self._head: FrameHead | None = None
        self._dest: memoryview | None = None
        self._dest_filled = 0
        self._main: memoryview | None = None
        self._trailer: memoryview | None = None

    def set_limits(self, *, max_header: int, max_payload: int) -> None:
        """Tighten or relax limits (after authentication a peer may send larger frames)."""
        self._max_header = max_header
        self._max_payload = max_payload
        if len(self._scratch) < _SCRATCH:
            self._grow(_SCRATCH)

    def expect_sealed(self, open_header: Any) -> None:
        """From the next frame on, every frame must be sealed; `open_header(seq, prefix,
        record)` opens a header record (raising ProtocolError if it does not open)."""
        self._open_header = open_header

    @property
    def waiting_for_destination(self) -> bool:
        return self._state == self._WAIT_DEST

    @property
    def pending_head(self) -> FrameHead | None:
        """The header whose payload has no destination yet, if any."""
        return self._head if self._state == self._WAIT_DEST else None

    def get_buffer(self) -> memoryview:
        """Where the next received bytes must be written (never empty)."""
        if self._state == self._PAYLOAD and self._dest is not None:
            return self._dest[self._dest_filled :]
        if self._state == self._WAIT_DEST:
            raise RuntimeError("get_buffer called while a payload destination is pending")
        if self._state == self._DISCARD and self._scratch_pos == self._scratch_end:
            self._scratch_pos = self._scratch_end = 0
            return self._scratch_view[: min(len(self._scratch), self._pending)]
        if self._scratch_pos == self._scratch_end:
            self._scratch_pos = self._scratch_end = 0
        elif self._scratch_end == len(self._scratch):
            # Move the unparsed tail to the front; it is at most one prefix + header long.
            tail = self._scratch_end - self._scratch_pos
            self._scratch[:tail] = self._scratch[self._scratch_pos : self._scratch_end]
            self._scratch_pos, self._scratch_end = 0, tail
        need = len(self._scratch) - self._scratch_end
        if self._state == self._HEADER:
            want = self._header_len - (self._scratch_end - self._scratch_pos)
            if want > need:  # a header larger than scratch room: grow once, bounded by limits
                self._grow(self._header_len + PREFIX_SIZE)
        return self._scratch_view[self._scratch_end :]

    def _grow(self, size: int) -> None:
        data = self._scratch[self._scratch_pos : self._scratch_end]
        self._scratch = bytearray(max(size, len(self._scratch)))
        self._scratch[: len(data)] = data
        self._scratch_view = memoryview(self._scratch)
        self._scratch_pos, self._scratch_end = 0, len(data)

    def advance(self, nbytes: int) -> None:
        """Record that `nbytes` were written into the view returned by `get_buffer`."""
        if self._state == self._PAYLOAD:
            self._dest_filled += nbytes
            self._next_part()
        else:
            self._scratch_end += nbytes

    def discard(self) -> None:
        """Drop the pending payload without allocating for it (a refused or failed frame)."""
        if self._state != self._WAIT_DEST or self._head is None:
            raise RuntimeError("discard called with no pending payload")
        take = min(self._scratch_end - self._scratch_pos, self._head.payload_len)
        self._scratch_pos += take
        self._pending = self._head.payload_len - take
        self._head = None
        self._state = self._DISCARD

    @property
    def receiving_head(self) -> FrameHead | None:
        """The header whose payload is being written into its destination, if any."""
        return self._head if self._state == self._PAYLOAD else None

    def abandon(self) -> None:
        """Stop writing the current payload into its destination; skip the rest of it.

        For a receive that was cancelled while its payload was arriving: the caller's
        buffer is not touched again and no Frame comes out for it.
        """
        if self._state != self._PAYLOAD or self._dest is None:
            raise RuntimeError("abandon called with no payload in progress")
        self._pending = self._dest.nbytes - self._dest_filled
        if self._trailer is not None:
            self._pending += self._trailer.nbytes
        self._dest = self._main = self._trailer = None
        self._head = None
        self._state = self._DISCARD if self._pending else self._PREFIX

    def provide(self, destination: memoryview, trailer: memoryview | None = None) -> None:
        """Give the pending payload its destination; buffered payload bytes are copied in.

        With a `trailer`, the payload's last `trailer.nbytes` bytes land there instead (a
        sealed record's tag, so that the ciphertext lands in the final buffer itself).
        """
        head = self._head
        if self._state != self._WAIT_DEST or head is None:
            raise RuntimeError("provide called with no pending payload")
        extra = trailer.nbytes if trailer is not None else 0
        if destination.nbytes + extra != head.payload_len:
            raise ValueError(
                f"destination holds {destination.nbytes + extra} bytes, "
                f"payload is {head.payload_len}"
            )
        dest = destination.cast("B") if destination.format != "B" else destination
        self._main = dest
        self._trailer = trailer
        self._dest = dest
        self._dest_filled = 0
        self._state = self._PAYLOAD
        while True:
            take = min(self._scratch_end - self._scratch_pos, self._dest.nbytes - self._dest_filled)
            if take:
                start = self._dest_filled
                self._dest[start : start + take] = self._scratch_view[
                    self._scratch_pos : self._scratch_pos + take
                ]
                self._scratch_pos += take
                self._dest_filled += take
            if not self._next_part():
                return

    def _next_part(self) -> bool:
        """When the main destination is full, go on into the trailer; True if it did."""
        if (
            self._trailer is not None
            and self._dest is not None
            and self._dest_filled >= self._dest.nbytes
        ):
            self._dest, self._trailer, self._dest_filled = self._trailer, None, 0
            return True
        return False

    def poll(self) -> FrameHead | Frame | None:
        """Parse what has arrived; return the next event or None when more bytes are needed."""
        while True:
            state = self._state
            if state == self._PAYLOAD:
                dest = self._dest
                assert dest is not None and self._head is not None and self._main is not None
                if self._dest_filled < dest.nbytes or self._trailer is not None:
                    return None
                frame = Frame(self._head.header, self._main)
                self._dest = self._main = None
                self._head = None
                self._state = self._PREFIX
                return frame
            if state == self._WAIT_DEST:
                return None
            available = self._scratch_end - self._scratch_pos
            if state == self._DISCARD:
                take = min(available, self._pending)
                self._scratch_pos += take
                self._pending -= take
                if self._pending:
                    return None
                self._state = self._PREFIX
                continue
            if state == self._PREFIX:
                if available < PREFIX_SIZE:
                    return None
                magic, version, flags, header_len, payload_len = PREFIX.unpack_from(
                    self._scratch, self._scratch_pos
                )
                if magic != MAGIC:
                    raise ProtocolError(f"bad magic {bytes(magic)!r}")
                if version != VERSION:
                    raise ProtocolError(f"unsupported protocol version {version}")
                sealed = bool(flags & SEALED)
                if sealed != (self._open_header is not None) or flags & ~SEALED:
                    raise ProtocolError(
                        "a plain frame where sealed ones are due"
                        if self._open_header is not None
                        else f"unexpected frame flags {flags:#x}"
                    )
                self._prefix = bytes(
                    self._scratch[self._scratch_pos : self._scratch_pos + PREFIX_SIZE]
                )
                if header_len == 0 or header_len > self._max_header:
                    raise ProtocolError(f"header length {header_len} outside 1..{self._max_header}")
                if payload_len > self._max_payload:
                    raise ProtocolError(
                        f"payload length {payload_len} exceeds the limit {self._max_payload}"
                    )
                self._scratch_pos += PREFIX_SIZE
                self._header_len = header_len
                self._pending = payload_len
                self._state = self._HEADER
                continue
            # state == _HEADER
            if available < self._header_len:
                return None
            start = self._scratch_pos
            record = self._scratch_view[start : start + self._header_len]
            if self._open_header is not None:
                seq = self._open_header.number()
                raw = self._open_header.open_header(seq, self._prefix, record)
                header = _unpack_header(memoryview(raw))
                self._head = FrameHead(header, self._pending, b"", self._prefix, seq)
            else:
                raw = bytes(record)
                header = _unpack_header(record)
                self._head = FrameHead(header, self._pending, raw, self._prefix)
            self._scratch_pos += self._header_len
            self._state = self._WAIT_DEST
            return self._head

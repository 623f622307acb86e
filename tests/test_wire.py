"""Frames: round trips whole, byte by byte and in random pieces; limits before allocation."""

from __future__ import annotations

import random
import struct
import tracemalloc
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pdl.errors import ProtocolError
from p2pdl.wire import (
    MAGIC,
    MAX_HEADER,
    PREFIX,
    PREFIX_SIZE,
    VERSION,
    Frame,
    FrameHead,
    FrameReader,
    encode_frame,
    encode_head,
)

# ---------------------------------------------------------------- strategies and drivers
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.binary(max_size=64)
    | st.text(max_size=32)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
headers = st.dictionaries(st.text(max_size=12), _values, max_size=6)
payload_sizes = st.one_of(
    st.integers(0, 64), st.integers(0, 70_000), st.sampled_from([0, 1, 65535, 65536, 300_000])
)


def payload_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def feed(reader: FrameReader, data: bytes, pieces: list[int]) -> list[tuple[dict, bytes]]:
    """Drive `reader` like a BufferedProtocol: write into get_buffer in pieces, then poll.

    `pieces` is cycled for the sizes of successive writes (each capped by the buffer the
    reader hands out). A FrameHead gets a fresh destination; returns the frames out.
    """
    frames: list[tuple[dict, bytes]] = []
    pos = 0
    index = 0

    def drain() -> None:
        while True:
            event = reader.poll()
            if event is None:
                return
            if isinstance(event, FrameHead):
                reader.provide(memoryview(bytearray(event.payload_len)))
            else:
                assert isinstance(event, Frame)
                frames.append((event.header, bytes(event.payload)))

    drain()
    while pos < len(data):
        buffer = reader.get_buffer()
        assert len(buffer) > 0, "get_buffer must never hand out an empty view"
        n = min(len(buffer), pieces[index % len(pieces)], len(data) - pos)
        index += 1
        buffer[:n] = data[pos : pos + n]
        reader.advance(n)
        pos += n
        drain()
    return frames


def normalise(value: Any) -> Any:
    """What a msgpack round trip gives back (tuples become lists)."""
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False)


# ------------------------------------------------------------------------ round trips
@settings(max_examples=60, deadline=None)
@given(header=headers, size=payload_sizes, seed=st.integers(0, 2**32))
def test_round_trip_whole(header: dict, size: int, seed: int) -> None:
    payload = payload_of(size, seed)
    frames = feed(FrameReader(), encode_frame(header, payload), [1 << 30])
    assert frames == [(normalise(header), payload)]


@settings(max_examples=25, deadline=None)
@given(header=headers, size=st.integers(0, 3000), seed=st.integers(0, 2**32))
def test_round_trip_one_byte_at_a_time(header: dict, size: int, seed: int) -> None:
    payload = payload_of(size, seed)
    frames = feed(FrameReader(), encode_frame(header, payload), [1])
    assert frames == [(normalise(header), payload)]


def test_round_trip_large_payload_one_byte_at_a_time() -> None:
    payload = payload_of(200_000, 7)
    header = {"t": 5, "d": "x" * 300, "big": 2**64 - 1}
    frames = feed(FrameReader(), encode_frame(header, payload), [1])
    assert frames == [(header, payload)]


@settings(max_examples=40, deadline=None)
@given(
    frames_in=st.lists(st.tuples(headers, payload_sizes), min_size=1, max_size=5),
    pieces=st.lists(st.integers(1, 100_000), min_size=1, max_size=8),
    seed=st.integers(0, 2**32),
)
def test_back_to_back_frames_in_random_pieces(
    frames_in: list[tuple[dict, int]], pieces: list[int], seed: int
) -> None:
    expected = [(normalise(h), payload_of(size, seed + i)) for i, (h, size) in enumerate(frames_in)]
    stream = b"".join(encode_frame(h, p) for h, p in expected)
    assert feed(FrameReader(), stream, pieces) == expected


@settings(max_examples=20, deadline=None)
@given(frames_in=st.lists(st.tuples(headers, st.integers(0, 300)), min_size=2, max_size=6))
def test_back_to_back_frames_one_byte_at_a_time(frames_in: list[tuple[dict, int]]) -> None:
    expected = [(normalise(h), payload_of(size, i)) for i, (h, size) in enumerate(frames_in)]
    stream = b"".join(encode_frame(h, p) for h, p in expected)
    assert feed(FrameReader(), stream, [1]) == expected


def test_largest_header_round_trips() -> None:
    # A header just under MAX_HEADER: the reader's scratch must hold it whole.
    header = {"blob": b"x" * (MAX_HEADER - 32)}
    packed_len = len(msgpack.packb(header, use_bin_type=True))
    assert packed_len <= MAX_HEADER
    stream = encode_frame(header, b"abc") * 2
    assert feed(FrameReader(), stream, [1000, 7, 65536]) == [(header, b"abc")] * 2


def test_head_and_payload_are_separate_buffers() -> None:
    payload = memoryview(b"payload!")
    head = encode_head({"t": 1}, payload.nbytes)
    assert head + bytes(payload) == encode_frame({"t": 1}, payload)
    magic, version, _flags, header_len, payload_len = PREFIX.unpack_from(head)
    assert (magic, version, payload_len) == (MAGIC, VERSION, 8)
    assert header_len == len(head) - PREFIX_SIZE


def test_provide_into_typed_destination_and_wrong_size() -> None:
    reader = FrameReader()
    stream = encode_frame({"t": 9}, bytes(range(16)))
    buffer = reader.get_buffer()
    buffer[: len(stream)] = stream
    reader.advance(len(stream))
    head = reader.poll()
    assert isinstance(head, FrameHead) and head.payload_len == 16
    with pytest.raises(ValueError):
        reader.provide(memoryview(bytearray(15)))
    with pytest.raises(RuntimeError):
        reader.get_buffer()  # no destination yet: the owner must pause reading
    import numpy as np

    target = np.zeros(4, dtype=np.float32)
    reader.provide(memoryview(target))
    frame = reader.poll()
    assert isinstance(frame, Frame)
    assert target.tobytes() == bytes(range(16))


def test_unencodable_header_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        encode_head({"x": object()})
    with pytest.raises(ValueError):
        encode_head({"x": b"y" * (MAX_HEADER + 1)})


# ------------------------------------------------------------------------------ limits
def prefix(
    *, magic: bytes = MAGIC, version: int = VERSION, header_len: int = 4, payload_len: int = 0
) -> bytes:
    return PREFIX.pack(magic, version, 0, header_len, payload_len)


def push(reader: FrameReader, data: bytes) -> FrameHead | Frame | None:
    buffer = reader.get_buffer()
    buffer[: len(data)] = data
    reader.advance(len(data))
    return reader.poll()


@pytest.mark.parametrize(
    ("data", "limits", "match"),
    [
        (prefix(magic=b"XX"), {}, "magic"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", {}, "magic"),
        (prefix(version=VERSION + 1), {}, "version"),
        (prefix(header_len=0), {}, "header length"),
        (prefix(header_len=2**32 - 1), {}, "header length"),
        (prefix(header_len=2000), {"max_header": 1024, "max_payload": 0}, "header length"),
        (prefix(payload_len=4 << 30), {"max_header": 1024, "max_payload": 0}, "payload"),
        (prefix(payload_len=4 << 30), {"max_header": 1024, "max_payload": 1 << 20}, "payload"),
        (prefix(payload_len=2**64 - 1), {}, "payload"),
    ],
)
def test_prefix_limits_are_checked_before_allocation(
    data: bytes, limits: dict[str, int], match: str
) -> None:
    reader = FrameReader(**limits)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match=match):
            push(reader, data)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"rejecting a prefix allocated {peak} bytes"


def test_limits_checked_from_the_prefix_alone() -> None:
    # No header bytes have arrived yet: the claim alone is refused.
    reader = FrameReader(max_header=1024, max_payload=1 << 20)
    with pytest.raises(ProtocolError):
        push(reader, prefix(header_len=16, payload_len=4 << 30)[:PREFIX_SIZE])


@pytest.mark.parametrize(
    ("header_bytes", "match"),
    [
        (msgpack.packb([1, 2, 3]), "not a map"),
        (msgpack.packb("text"), "not a map"),
        (msgpack.packb(7), "not a map"),
        (b"\xc1\xc1\xc1\xc1", "undecodable"),  # 0xc1 is never used by msgpack
        (msgpack.packb({1: 2}), "undecodable"),  # non-str keys are refused
        (msgpack.packb({"a": 1}) + b"\x00", "undecodable"),  # trailing bytes
        (b"\x85\xa1a", "undecodable"),  # truncated map
        (msgpack.packb(msgpack.ExtType(1, b"x")), "undecodable|not a map"),
    ],
)
def test_bad_headers_are_protocol_errors(header_bytes: bytes, match: str) -> None:
    reader = FrameReader()
    data = prefix(header_len=len(header_bytes)) + header_bytes
    with pytest.raises(ProtocolError, match=match):
        push(reader, data)


def test_raised_limits_after_authentication() -> None:
    reader = FrameReader(max_header=64, max_payload=0)
    with pytest.raises(ProtocolError):
        push(reader, encode_frame({"t": 1}, b"x"))
    reader = FrameReader(max_header=64, max_payload=0)
    reader.set_limits(max_header=MAX_HEADER, max_payload=10)
    head = push(reader, encode_head({"t": 1}, 3))
    assert isinstance(head, FrameHead) and head.payload_len == 3


# ------------------------------------------------------------------------------ discard
@pytest.mark.parametrize("pieces", [[1], [5, 1000], [1 << 30]])
def test_discard_skips_a_payload_without_allocating(pieces: list[int]) -> None:
    big = 2 << 20
    skipped = encode_head({"t": 1}, big) + bytes(big)
    kept = encode_frame({"t": 2}, b"kept")
    reader = FrameReader()
    stream = skipped + kept
    out: list[tuple[dict, bytes]] = []
    pos = index = 0
    peak = 0
    tracemalloc.start()
    try:
        while pos < len(stream):
            buffer = reader.get_buffer()
            assert len(buffer) > 0
            n = min(len(buffer), pieces[index % len(pieces)], len(stream) - pos)
            index += 1
            buffer[:n] = stream[pos : pos + n]
            reader.advance(n)
            pos += n
            while (event := reader.poll()) is not None:
                if isinstance(event, FrameHead):
                    if event.header["t"] == 1:
                        reader.discard()
                    else:
                        reader.provide(memoryview(bytearray(event.payload_len)))
                else:
                    out.append((event.header, bytes(event.payload)))
            if pieces == [1] and pos > 50_000:
                # One byte at a time through 2 MiB is slow: skip ahead in big writes.
                pieces = [1 << 16]
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out == [({"t": 2}, b"kept")]
    assert peak < 1 << 20, f"discarding allocated {peak} bytes"


def test_discard_and_provide_need_a_pending_head() -> None:
    reader = FrameReader()
    with pytest.raises(RuntimeError):
        reader.discard()
    with pytest.raises(RuntimeError):
        reader.provide(memoryview(bytearray(0)))
    assert reader.pending_head is None and not reader.waiting_for_destination
    head = push(reader, encode_head({"t": 3}, 10))
    assert isinstance(head, FrameHead)
    assert reader.waiting_for_destination and reader.pending_head == head


def test_prefix_layout_is_fixed() -> None:
    # The documented layout: magic "P2" | version u8 | flags u8 | header u32 | payload u64.
    assert PREFIX_SIZE == 16
    assert struct.pack("<2sBBIQ", b"P2", 2, 0, 5, 6) == prefix(header_len=5, payload_len=6)


def test_abandoned_payload_is_skipped_and_the_next_frame_parses() -> None:
    reader = FrameReader()
    first = encode_frame({"t": 1}, b"A" * 300_000)
    second = encode_frame({"t": 2}, b"B" * 10)
    data = first + second
    cut = len(first) - 100_000
    target = bytearray(300_000)
    offset = 0

    def feed(upto: int) -> list:
        nonlocal offset
        events = []
        while offset < upto:
            view = reader.get_buffer()
            n = min(view.nbytes, upto - offset, 4096)
            view[:n] = data[offset : offset + n]
            offset += n
            reader.advance(n)
            while (event := reader.poll()) is not None:
                if isinstance(event, FrameHead):
                    if event.header["t"] == 1:
                        reader.provide(memoryview(target))
                    else:
                        reader.provide(memoryview(bytearray(event.payload_len)))
                else:
                    events.append(event)
        return events

    assert feed(cut) == []
    assert reader.receiving_head is not None
    written = bytes(target)
    reader.abandon()
    events = feed(len(data))
    assert [e.header["t"] for e in events] == [2]
    assert bytes(events[0].payload) == b"B" * 10
    assert bytes(target) == written  # nothing more landed in the abandoned buffer

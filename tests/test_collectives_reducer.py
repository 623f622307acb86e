"""The pure slice reducer under random interleavings (no sockets): every chunk is released
exactly once, at its last contribution; reducing at release in rank order gives the same
bits whatever the arrival order."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pdl import kernels
from p2pdl.collectives.reducer import SliceReducer
from p2pdl.errors import ProtocolError


@st.composite
def interleavings(draw: st.DrawFn) -> tuple[int, list[int], list[tuple[int, int]]]:
    chunks = draw(st.integers(0, 12))
    world = draw(st.integers(1, 6))
    owner = draw(st.integers(0, world - 1))
    peers = [p for p in range(world) if p != owner]
    events = [(p, c) for p in peers for c in range(chunks)]
    return chunks, peers, draw(st.permutations(events))


@settings(max_examples=300, deadline=None)
@given(interleavings())
def test_each_chunk_is_released_once_at_its_last_contribution(case) -> None:
    chunks, peers, events = case
    reducer = SliceReducer(chunks, peers)
    released = list(reducer.ready_at_start())
    seen: dict[int, set[int]] = {c: set() for c in range(chunks)}
    for peer, chunk in events:
        assert chunk not in released  # nothing is released before all of its parts
        seen[chunk].add(peer)
        if reducer.arrived(peer, chunk):
            assert seen[chunk] == set(peers)
            released.append(chunk)
        else:
            assert seen[chunk] != set(peers)
    assert sorted(released) == list(range(chunks))
    assert reducer.complete and reducer.released == chunks


@settings(max_examples=100, deadline=None)
@given(interleavings(), st.integers(0, 2**31))
def test_reducing_on_release_gives_the_same_bits_in_any_order(case, seed: int) -> None:
    chunks, peers, events = case
    width = 7
    rng = np.random.default_rng(seed)
    world = len(peers) + 1
    owner = next(r for r in range(world) if r not in peers)
    data = {r: rng.standard_normal(chunks * width).astype(np.float32) for r in range(world)}
    expected = data[0].copy()
    for r in range(1, world):
        expected += data[r]  # rank order, one pass per rank: what every rank must compute
    result = data[owner].copy()
    reducer = SliceReducer(chunks, peers)

    def reduce(chunk: int) -> None:
        piece = slice(chunk * width, (chunk + 1) * width)
        sources = [result[piece] if r == owner else data[r][piece] for r in range(world)]
        kernels.sum_into(result[piece], sources)

    for chunk in reducer.ready_at_start():
        reduce(chunk)
    for peer, chunk in events:
        if reducer.arrived(peer, chunk):
            reduce(chunk)
    assert result.tobytes() == expected.tobytes()


def test_bad_contributions_are_protocol_errors() -> None:
    reducer = SliceReducer(2, [1, 2])
    assert not reducer.arrived(1, 0)
    with pytest.raises(ProtocolError, match="twice"):
        reducer.arrived(1, 0)
    with pytest.raises(ProtocolError, match="does not contribute"):
        reducer.arrived(3, 0)
    with pytest.raises(ProtocolError, match="outside"):
        reducer.arrived(2, 5)
    assert reducer.arrived(2, 0) and not reducer.complete

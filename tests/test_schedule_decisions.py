"""The leader's pure decisions at boundaries: who is in the next epoch, where everyone rolls
back to, and who rebuilds which range of the sharded optimizer state (property-based)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from p2pdl.collectives.plan import plan_slices
from p2pdl.errors import ProtocolError
from p2pdl.schedule.decisions import (
    Holding,
    Piece,
    choose_rollback,
    cover,
    holdings_from_wire,
    plan_members,
)
from p2pdl.schedule.errors import JobError


def ring_holdings(size: int, world: int, step: int) -> dict[int, tuple[Holding, ...]]:
    """What the runtime keeps: every rank its own slice, plus its predecessor's replica."""
    slices = plan_slices(size, world, 1).slices
    out = {}
    for rank in range(world):
        own = Piece(*slices[rank], "own")
        replica = Piece(*slices[(rank - 1) % world], "replica")
        out[rank] = (Holding(step, (own, replica)),)
    return out


def assert_partition(size: int, sources: dict[int, tuple[Piece, ...]], offers: dict) -> None:
    pieces = sorted((p.start, p.stop, node, p.source) for node, ps in sources.items() for p in ps)
    position = 0
    for start, stop, node, source in pieces:
        assert start == position and stop > start  # contiguous, no overlap, nothing empty
        assert any(
            o.source == source and o.start <= start and stop <= o.stop for o in offers[node]
        ), (node, start, stop, source)
        position = stop
    assert position == size


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 5000), st.integers(1, 9), st.data())
def test_losing_any_one_node_loses_no_state(size: int, world: int, data: st.DataObject) -> None:
    held = ring_holdings(size, world, 40)
    lost = data.draw(st.integers(0, world - 1)) if world > 1 else None
    survivors = {n: h for n, h in held.items() if n != lost}
    rollback = choose_rollback(survivors, size, has_state=True)
    assert rollback.step == 40
    offers = {n: h[0].pieces for n, h in survivors.items()}
    assert_partition(size, dict(rollback.sources), offers)


@settings(max_examples=200, deadline=None)
@given(st.integers(8, 5000), st.integers(3, 9), st.data())
def test_losing_two_neighbours_names_the_lost_range(
    size: int, world: int, data: st.DataObject
) -> None:
    held = ring_holdings(size, world, 12)
    first = data.draw(st.integers(0, world - 1))
    lost = {first, (first + 1) % world}
    slices = plan_slices(size, world, 1).slices
    gone = slices[first]  # held only by `first` (own) and `first + 1` (replica)
    assume(gone[1] > gone[0])
    survivors = {n: h for n, h in held.items() if n not in lost}
    with pytest.raises(JobError, match=rf"\[{gone[0]}, "):
        choose_rollback(survivors, size, has_state=True)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.integers(0, 6),
        st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300)), max_size=4),
        min_size=1,
    )
)
def test_cover_is_an_exact_partition_or_names_a_gap(raw: dict[int, list[tuple[int, int]]]) -> None:
    size = 300
    offers = {
        node: tuple(Piece(min(a, b), max(a, b), "own") for a, b in ranges)
        for node, ranges in raw.items()
    }
    points = [False] * size
    for pieces in offers.values():
        for p in pieces:
            for i in range(p.start, p.stop):
                points[i] = True
    if all(points):
        assert_partition(size, cover(size, offers), offers)
    else:
        gap = points.index(False)
        with pytest.raises(JobError, match=rf"\[{gap}, "):
            cover(size, offers)


def test_rollback_takes_the_latest_common_boundary_that_can_be_rebuilt() -> None:
    size = 100
    whole = (Piece(0, size, "own"),)
    holdings = {
        0: (Holding(4, whole), Holding(8, (Piece(0, 50, "own"),))),
        1: (Holding(4, whole), Holding(8, (Piece(0, 50, "own"),)), Holding(12, whole)),
    }
    # 12 is not held by node 0; at 8 nobody holds [50, 100); so 4.
    assert choose_rollback(holdings, size, has_state=True).step == 4
    # Without optimizer state the weights alone decide: 8.
    assert choose_rollback(holdings, size, has_state=False).step == 8
    with pytest.raises(JobError, match="no common boundary"):
        choose_rollback({0: (Holding(4, whole),), 1: (Holding(8, whole),)}, size, has_state=True)


@given(
    st.lists(st.integers(1, 40), unique=True, max_size=8),
    st.lists(st.integers(41, 80), unique=True, max_size=8),
    st.integers(1, 12),
    st.integers(1, 12),
)
def test_plan_members_keeps_order_and_bounds(
    survivors: list[int], joiners: list[int], max_nodes: int, min_nodes: int
) -> None:
    expected = [0, *survivors]
    expected += joiners[: max(0, max_nodes - len(expected))]
    if len(expected) < min_nodes:
        with pytest.raises(JobError, match="min_nodes"):
            plan_members(0, survivors, joiners, max_nodes=max_nodes, min_nodes=min_nodes)
        return
    members = plan_members(0, survivors, joiners, max_nodes=max_nodes, min_nodes=min_nodes)
    assert list(members) == expected  # the leader is rank 0; survivors keep their order
    assert len(set(members)) == len(members)


@pytest.mark.parametrize(
    "bad",
    [
        "nope",
        [[1]],
        [[-1, []]],
        [[1, [[0, 5, "mine"]]]],
        [[1, [[6, 5, "own"]]]],
        [[1, [[0, 10**9, "own"]]]],
        [[True, []]],
        [[1, []]] * 17,
    ],
)
def test_malformed_holdings_are_protocol_errors(bad: Any) -> None:
    with pytest.raises(ProtocolError, match="malformed holdings from node 3"):
        holdings_from_wire(bad, size=100, sender="node 3")


def test_holdings_round_trip() -> None:
    held = (Holding(8, (Piece(0, 5, "own"), Piece(5, 9, "replica"))), Holding(12, ()))
    assert holdings_from_wire([h.to_wire() for h in held], size=9, sender="x") == held

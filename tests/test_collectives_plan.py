"""Property tests of the pure collective plans: slices, chunks, ring order, binomial trees."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pdl.collectives.hierarchical import host_groups
from p2pdl.collectives.plan import (
    MIN_CHUNK_ELEMS,
    MIN_PIPELINE_CHUNKS,
    binomial_children,
    binomial_parent,
    chunk_ranges,
    owner_slices,
    plan_slices,
    ring_allgather_order,
    ring_neighbours,
    ring_reduce_scatter_order,
)

sizes = st.integers(min_value=0, max_value=5_000_000)
worlds = st.integers(min_value=1, max_value=64)
chunks = st.integers(min_value=1, max_value=1 << 20)


@settings(max_examples=300, deadline=None)
@given(n=sizes, world=worlds, chunk=chunks)
def test_slices_and_chunks_tile_the_buffer_once(n: int, world: int, chunk: int) -> None:
    plan = plan_slices(n, world, chunk)
    assert len(plan.slices) == world == len(plan.chunks)
    assert plan.slices[0][0] == 0 and plan.slices[-1][1] == n
    for (_, b), (c, _) in itertools.pairwise(plan.slices):
        assert b == c
    for (a, b), pieces in zip(plan.slices, plan.chunks, strict=True):
        assert a <= b
        if a == b:
            assert pieces == ()
            continue
        assert pieces[0][0] == a and pieces[-1][1] == b
        assert all(x < y for x, y in pieces)
        assert all(p[1] == q[0] for p, q in itertools.pairwise(pieces))
        assert all(y - x <= chunk for x, y in pieces)
    lengths = [b - a for a, b in plan.slices]
    assert max(lengths) - min(lengths) <= 16 * 4  # balanced (alignment moves at most a line)


@settings(max_examples=200, deadline=None)
@given(n=sizes, world=worlds, chunk=chunks)
def test_owner_slices_are_the_planned_slices(n: int, world: int, chunk: int) -> None:
    # The sharded optimizers and the job's replicas find their range with owner_slices (it
    # plans no chunks: planning 1-element chunks of a 1M-element buffer took 0.45 s per call).
    assert owner_slices(n, world) == plan_slices(n, world, chunk).slices


@settings(max_examples=200, deadline=None)
@given(n=st.integers(min_value=1, max_value=5_000_000), world=worlds)
def test_big_slices_get_several_chunks(n: int, world: int) -> None:
    plan = plan_slices(n, world, 1 << 30)
    for (a, b), pieces in zip(plan.slices, plan.chunks, strict=True):
        if b - a >= MIN_PIPELINE_CHUNKS * MIN_CHUNK_ELEMS:
            assert len(pieces) >= MIN_PIPELINE_CHUNKS - 1


@given(start=st.integers(0, 1000), length=st.integers(0, 10_000), chunk=st.integers(1, 5000))
def test_chunk_ranges(start: int, length: int, chunk: int) -> None:
    pieces = chunk_ranges(start, start + length, chunk)
    assert sum(b - a for a, b in pieces) == length
    assert all(0 < b - a <= chunk for a, b in pieces)


@given(world=st.integers(1, 40))
def test_ring_orders_reduce_every_slice_once_and_gather_to_everyone(world: int) -> None:
    # Simulate which contributions each rank's copy of each slice holds.
    held = [[{r} for _ in range(world)] for r in range(world)]  # held[rank][slice]
    for step in range(world - 1):
        sent = []
        for rank in range(world):
            send, _recv = ring_reduce_scatter_order(rank, world)[step]
            sent.append((ring_neighbours(rank, world)[1], send, set(held[rank][send])))
        for right, index, contribution in sent:
            left = ring_neighbours(right, world)[0]
            assert ring_reduce_scatter_order(right, world)[step][1] == index, (left, right)
            held[right][index] |= contribution
    for rank in range(world):
        owned = (rank + 1) % world
        assert held[rank][owned] == set(range(world))
    complete = [{(r + 1) % world} for r in range(world)]  # slices each rank has final
    for step in range(world - 1):
        moves = []
        for rank in range(world):
            send, _recv = ring_allgather_order(rank, world)[step]
            assert send in complete[rank]
            moves.append((ring_neighbours(rank, world)[1], send))
        for right, index in moves:
            assert ring_allgather_order(right, world)[step][1] == index
            complete[right].add(index)
    assert all(c == set(range(world)) for c in complete)


@given(world=st.integers(1, 100), root=st.integers(0, 99))
def test_binomial_tree_spans_every_rank_once(world: int, root: int) -> None:
    root %= world
    seen = {root}
    frontier = [root]
    while frontier:
        node = frontier.pop()
        for child in binomial_children(node, world, root):
            assert binomial_parent(child, world, root) == node
            assert child not in seen
            seen.add(child)
            frontier.append(child)
    assert seen == set(range(world))
    assert binomial_parent(root, world, root) is None


@given(hosts=st.lists(st.sampled_from("abcd"), min_size=1, max_size=12))
def test_host_groups_partition_ranks_in_order(hosts: list[str]) -> None:
    groups = host_groups(hosts)
    assert sorted(r for g in groups for r in g) == list(range(len(hosts)))
    assert all(len({hosts[r] for r in g}) == 1 for g in groups)
    assert [g[0] for g in groups] == sorted(g[0] for g in groups)
    assert all(g == sorted(g) for g in groups)

"""The pure group planner, data-epoch permutations and the auto group-size policy."""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pdl.errors import ConfigError, ProtocolError
from p2pdl.membership import Membership, PeerAddress
from p2pdl.schedule.group_size import Decision, GroupSizeController
from p2pdl.schedule.job import Job, LRSchedule
from p2pdl.schedule.plan import (
    IterationGroup,
    RankSamples,
    StepPlan,
    epoch_permutation,
    plan_groups,
    sample_indices,
)


def membership(world_size: int, epoch: int = 0, port_base: int = 9000) -> Membership:
    peers = tuple(
        PeerAddress(rank=r, host="10.0.0.1", port=port_base + r) for r in range(world_size)
    )
    return Membership(epoch=epoch, peers=peers)


@st.composite
def small_jobs(draw: st.DrawFn) -> Job:
    """Jobs small enough to plan completely (at most a few hundred steps)."""
    dataset_size = draw(st.integers(1, 120))
    global_batch = draw(st.integers(1, dataset_size))
    max_nodes = draw(st.integers(1, min(global_batch, 12)))
    return Job(
        task="m:f",
        dataset_size=dataset_size,
        global_batch=global_batch,
        epochs=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2**64 - 1)),
        lr=LRSchedule(
            base_lr=0.1, kind=draw(st.sampled_from(["constant", "cosine"])), warmup_steps=2
        ),
        min_nodes=1,
        max_nodes=max_nodes,
        drop_last=draw(st.booleans()),
    )


def plan_all(
    job: Job, world_sizes: list[int], group_size: int, start: int = 0
) -> list[IterationGroup]:
    """Plan the job from `start` to the end, cycling through world sizes per group."""
    groups = []
    step, gid = start, 0
    while step < job.total_steps:
        n = world_sizes[gid % len(world_sizes)]
        group = plan_groups(job, membership(n, epoch=gid), step, group_size, group_id=gid)
        groups.append(group)
        step, gid = group.end_step, gid + 1
    return groups


def positions(rs: RankSamples) -> range:
    return range(rs.offset, rs.offset + rs.count)


def check_step_split(job: Job, plan: StepPlan) -> None:
    """The ranks' slices are disjoint, balanced and tile exactly the step's global batch."""
    i = plan.step % job.steps_per_epoch
    epoch = plan.step // job.steps_per_epoch
    expected = range(i * job.global_batch, min((i + 1) * job.global_batch, job.dataset_size))
    got = [p for rs in plan.per_rank for p in positions(rs)]
    assert got == list(expected)  # disjoint, in rank order, nothing missing or extra
    assert all(rs.epoch == epoch for rs in plan.per_rank)
    counts = [rs.count for rs in plan.per_rank]
    assert max(counts) - min(counts) <= 1
    assert counts == sorted(counts, reverse=True)
    assert plan.batch == len(expected) == job.batch_at(plan.step)


# ---------------------------------------------------------------- planner properties


@settings(max_examples=120, deadline=None)
@given(small_jobs(), st.data())
def test_each_sample_exactly_once_per_data_epoch(job: Job, data: st.DataObject) -> None:
    n = data.draw(st.integers(job.min_nodes, job.max_nodes), label="world_size")
    g = data.draw(st.integers(1, 40), label="group_size")
    per_epoch: dict[int, list[int]] = {}
    steps_seen = []
    for group in plan_all(job, [n], g):
        assert group.world_size == n
        assert 1 <= len(group.steps) <= g
        for plan in group.steps:
            steps_seen.append(plan.step)
            assert len(plan.per_rank) == n
            for rs in plan.per_rank:
                per_epoch.setdefault(rs.epoch, []).extend(sample_indices(job, rs).tolist())
    assert steps_seen == list(range(job.total_steps))
    used = job.steps_per_epoch * job.global_batch if job.drop_last else job.dataset_size
    assert sorted(per_epoch) == list(range(job.epochs))
    for indices in per_epoch.values():
        assert len(indices) == used
        assert len(set(indices)) == used  # no sample twice
        assert set(indices) <= set(range(job.dataset_size))


@settings(max_examples=120, deadline=None)
@given(small_jobs(), st.data())
def test_ranks_disjoint_and_balanced_within_each_step(job: Job, data: st.DataObject) -> None:
    n = data.draw(st.integers(job.min_nodes, job.max_nodes))
    start = data.draw(st.integers(0, job.total_steps - 1))
    group = plan_groups(job, membership(n), start, data.draw(st.integers(1, 50)))
    for plan in group.steps:
        check_step_split(job, plan)
        assert plan.lr == job.lr_at(plan.step)
        index_sets = [set(sample_indices(job, rs).tolist()) for rs in plan.per_rank]
        assert sum(map(len, index_sets)) == len(set().union(*index_sets))


@settings(max_examples=60, deadline=None)
@given(small_jobs(), st.data())
def test_planning_is_deterministic(job: Job, data: st.DataObject) -> None:
    n = data.draw(st.integers(job.min_nodes, job.max_nodes))
    start = data.draw(st.integers(0, job.total_steps - 1))
    g = data.draw(st.integers(1, 30))
    first = plan_groups(job, membership(n, epoch=3), start, g, group_id=5)
    again = plan_groups(job, membership(n, epoch=3, port_base=7000), start, g, group_id=5)
    assert first == again
    assert first.epoch == 3 and first.group_id == 5 and first.start_step == start
    clone = Job.from_wire(job.to_wire())
    for plan in first.steps:
        for rs in plan.per_rank:
            assert np.array_equal(sample_indices(job, rs), sample_indices(clone, rs))


@settings(max_examples=80, deadline=None)
@given(small_jobs(), st.data())
def test_replanning_from_any_step_gives_the_same_remaining_plan(
    job: Job, data: st.DataObject
) -> None:
    n = data.draw(st.integers(job.min_nodes, job.max_nodes))
    g1 = data.draw(st.integers(1, 40), label="g1")
    g2 = data.draw(st.integers(1, 40), label="g2")
    s = data.draw(st.integers(0, job.total_steps - 1), label="from_step")
    whole = {p.step: p for grp in plan_all(job, [n], g1) for p in grp.steps}
    rest = {p.step: p for grp in plan_all(job, [n], g2, start=s) for p in grp.steps}
    assert sorted(rest) == list(range(s, job.total_steps))
    assert all(rest[step] == whole[step] for step in rest)


@settings(max_examples=100, deadline=None)
@given(small_jobs(), st.data())
def test_membership_changes_and_aborted_groups_keep_exactly_once(
    job: Job, data: st.DataObject
) -> None:
    """Groups planned for changing world sizes, some aborted and replanned from their start."""
    committed: dict[int, StepPlan] = {}
    step, gid, member_epoch = 0, 0, 0
    while step < job.total_steps:
        n = data.draw(st.integers(job.min_nodes, job.max_nodes), label="world_size")
        g = data.draw(st.integers(1, 20), label="group_size")
        group = plan_groups(job, membership(n, epoch=member_epoch), step, g, group_id=gid)
        gid += 1
        if data.draw(st.booleans(), label="fails"):
            member_epoch += 1  # aborted: nothing commits, replan the same steps next round
            continue
        for plan in group.steps:
            assert plan.step not in committed
            committed[plan.step] = plan
        step = group.end_step
    assert sorted(committed) == list(range(job.total_steps))
    per_epoch: Counter[tuple[int, int]] = Counter()
    for plan in committed.values():
        check_step_split(job, plan)
        for rs in plan.per_rank:
            per_epoch.update((rs.epoch, int(i)) for i in sample_indices(job, rs))
    assert all(c == 1 for c in per_epoch.values())
    used = job.steps_per_epoch * job.global_batch if job.drop_last else job.dataset_size
    assert len(per_epoch) == used * job.epochs


def test_split_spot_values_across_an_epoch_boundary() -> None:
    job = Job(
        task="m:f", dataset_size=100, global_batch=10, epochs=2, lr=LRSchedule(0.1), max_nodes=4
    )
    group = plan_groups(job, membership(4), 9, 2)
    first, second = group.steps
    assert first.per_rank == (
        RankSamples(0, 90, 3),
        RankSamples(0, 93, 3),
        RankSamples(0, 96, 2),
        RankSamples(0, 98, 2),
    )
    assert second.per_rank == (
        RankSamples(1, 0, 3),
        RankSamples(1, 3, 3),
        RankSamples(1, 6, 2),
        RankSamples(1, 8, 2),
    )
    assert group.for_rank(2) == (RankSamples(0, 96, 2), RankSamples(1, 6, 2))


def test_partial_last_batch_and_truncated_last_group() -> None:
    job = Job(
        task="m:f",
        dataset_size=23,
        global_batch=10,
        lr=LRSchedule(0.1),
        max_nodes=4,
        drop_last=False,
    )
    assert job.total_steps == 3
    group = plan_groups(job, membership(4), 1, 100)
    assert [p.step for p in group.steps] == [1, 2]
    assert group.steps[-1].per_rank == (
        RankSamples(0, 20, 1),
        RankSamples(0, 21, 1),
        RankSamples(0, 22, 1),
        RankSamples(0, 23, 0),
    )
    assert group.steps[-1].batch == 3
    assert sample_indices(job, group.steps[-1].per_rank[3]).size == 0


@pytest.mark.parametrize(
    ("start", "size", "world", "match"),
    [
        (-1, 5, 2, "start_step"),
        (10, 5, 2, "start_step"),
        (0, 0, 2, "group_size"),
        (0, True, 2, "group_size"),
        (0, 5, 5, "between 1 and 4"),
        (0, 5, 0, "between 1 and 4"),
    ],
)
def test_plan_groups_rejects_bad_arguments(start: int, size: int, world: int, match: str) -> None:
    job = Job(task="m:f", dataset_size=100, global_batch=10, lr=LRSchedule(0.1), max_nodes=4)
    with pytest.raises(ConfigError, match=match):
        plan_groups(job, membership(world), start, size)


def test_plan_groups_respects_min_nodes() -> None:
    job = Job(
        task="m:f", dataset_size=100, global_batch=10, lr=LRSchedule(0.1), min_nodes=3, max_nodes=4
    )
    with pytest.raises(ConfigError, match="3 and 4"):
        plan_groups(job, membership(2), 0, 5)


# ---------------------------------------------------------------- wire


@settings(max_examples=60, deadline=None)
@given(small_jobs(), st.data())
def test_group_wire_round_trip_through_msgpack(job: Job, data: st.DataObject) -> None:
    n = data.draw(st.integers(job.min_nodes, job.max_nodes))
    start = data.draw(st.integers(0, job.total_steps - 1))
    group = plan_groups(job, membership(n, epoch=2), start, data.draw(st.integers(1, 30)), 7)
    wire = msgpack.unpackb(msgpack.packb(group.to_wire()), raw=False)
    assert IterationGroup.from_wire(wire) == group


def _good_group_wire() -> dict[str, Any]:
    job = Job(task="m:f", dataset_size=100, global_batch=10, lr=LRSchedule(0.1), max_nodes=4)
    return plan_groups(job, membership(2), 3, 3, group_id=1).to_wire()


def _mutations() -> list[tuple[str, Any]]:
    def setter(key: str, value: Any) -> Any:
        return lambda w: w.__setitem__(key, value)

    def step_item(index: int, value: Any) -> Any:
        return lambda w: w["steps"][0].__setitem__(index, value)

    return [
        ("extra field", setter("job", 1)),
        ("missing field", lambda w: w.pop("epoch")),
        ("negative group_id", setter("group_id", -1)),
        ("bool epoch", setter("epoch", True)),
        ("world zero", setter("world_size", 0)),
        ("world mismatch", setter("world_size", 3)),
        ("steps empty", setter("steps", [])),
        ("steps not list", setter("steps", {"a": 1})),
        ("step gap", step_item(0, 4)),
        ("lr nan", step_item(1, float("nan"))),
        ("lr negative", step_item(1, -0.5)),
        ("lr str", step_item(1, "0.1")),
        ("samples short", step_item(2, [0, 0, 5])),
        ("samples negative", step_item(2, [0, -1, 5, 0, 4, 5])),
        ("samples float", step_item(2, [0, 0.5, 5, 0, 4, 5])),
        ("step shape", lambda w: w["steps"].__setitem__(0, [3, 0.1])),
    ]


@pytest.mark.parametrize(("case", "mutate"), _mutations(), ids=[m[0] for m in _mutations()])
def test_malformed_group_wire_is_a_protocol_error(case: str, mutate: Any) -> None:
    wire = _good_group_wire()
    IterationGroup.from_wire(wire)
    mutate(wire)
    with pytest.raises(ProtocolError, match="rank 0: malformed iteration group"):
        IterationGroup.from_wire(wire, rank=0)


def test_group_wire_not_a_map() -> None:
    with pytest.raises(ProtocolError, match="expected a map"):
        IterationGroup.from_wire([1, 2])


# ---------------------------------------------------------------- permutations


def test_epoch_permutation_is_a_deterministic_permutation() -> None:
    perm = epoch_permutation(42, 3, 1000)
    assert perm.dtype == np.int64
    assert sorted(perm.tolist()) == list(range(1000))
    assert np.array_equal(perm, epoch_permutation(42, 3, 1000))
    assert not np.array_equal(perm, epoch_permutation(42, 4, 1000))
    assert not np.array_equal(perm, epoch_permutation(43, 3, 1000))
    assert epoch_permutation(0, 0, 0).size == 0


def test_epoch_permutation_is_pinned() -> None:
    """Every node must derive the same batches: pin the stream so a change is noticed."""
    assert epoch_permutation(0, 0, 10).tolist() == [3, 2, 1, 8, 6, 0, 7, 4, 5, 9]
    assert epoch_permutation(0, 1, 10).tolist() == [7, 4, 5, 1, 9, 8, 6, 2, 0, 3]


@pytest.mark.parametrize(("seed", "epoch", "n"), [(-1, 0, 5), (0, -1, 5), (0, 0, -1), (0.5, 0, 5)])
def test_epoch_permutation_rejects_bad_arguments(seed: Any, epoch: Any, n: Any) -> None:
    with pytest.raises(ConfigError):
        epoch_permutation(seed, epoch, n)


def test_sample_indices_resolve_and_are_read_only() -> None:
    job = Job(
        task="m:f",
        dataset_size=50,
        global_batch=10,
        epochs=2,
        seed=9,
        lr=LRSchedule(0.1),
        max_nodes=2,
    )
    got = sample_indices(job, RankSamples(1, 10, 5))
    assert got.tolist() == epoch_permutation(9, 1, 50)[10:15].tolist()
    with pytest.raises(ValueError):
        got[0] = 0
    for bad in (RankSamples(2, 0, 1), RankSamples(0, 48, 3), RankSamples(0, -1, 1)):
        with pytest.raises(ConfigError):
            sample_indices(job, bad)


# ---------------------------------------------------------------- group size controller


def test_grows_when_overhead_is_high() -> None:
    ctl = GroupSizeController(target_overhead=0.0625)
    # 0.75 s of coordination for 10 steps of 0.25 s: 30 % overhead; 48 steps would meet 6.25 %.
    decision = ctl.next_size(10, coordination_seconds=0.75, step_seconds=0.25, steps=10)
    assert decision == Decision(20, decision.reason)
    assert "growing group size 10 -> 20" in decision.reason
    # growth stops at the size that meets the target
    assert ctl.next_size(40, 0.75, 0.25, 40).size == 48
    assert ctl.next_size(48, 0.75, 0.25, 48).size == 48


def test_stays_when_overhead_is_low() -> None:
    ctl = GroupSizeController()
    decision = ctl.next_size(10, coordination_seconds=0.01, step_seconds=0.1, steps=10)
    assert decision.size == 10
    assert "keeping" in decision.reason
    assert ctl.next_size(10, 0.0, 0.0, 0).size == 10  # nothing measured


def test_shrinks_after_failure_and_respects_min() -> None:
    ctl = GroupSizeController(min_size=3)
    assert ctl.after_failure(40).size == 20
    assert ctl.after_failure(5).size == 3
    decision = ctl.after_failure(3)
    assert decision.size == 3 and "minimum" in decision.reason
    assert ctl.first() == Decision(10, ctl.first().reason)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 50),
    st.integers(0, 500),
    st.integers(1, 5000),
    st.floats(0, 100),
    st.floats(0, 10),
    st.integers(0, 5000),
)
def test_decisions_stay_within_bounds(
    lo: int, extra: int, current: int, coordination: float, step: float, steps: int
) -> None:
    ctl = GroupSizeController(min_size=lo, max_size=lo + extra, initial=lo)
    clamped = min(max(current, lo), lo + extra)
    decision = ctl.next_size(current, coordination, step, steps)
    assert lo <= decision.size <= lo + extra
    assert decision.size >= clamped  # never shrinks on a measurement
    if steps and step and coordination / steps / step > ctl.target_overhead:
        assert decision.size > clamped or clamped == lo + extra
    else:
        assert decision.size == clamped
    failed = ctl.after_failure(current)
    assert lo <= failed.size <= clamped
    assert decision.reason and failed.reason


@settings(max_examples=100, deadline=None)
@given(st.floats(0.01, 10.0), st.floats(0.001, 1.0))
def test_growth_converges_to_meet_target(coordination: float, step: float) -> None:
    """With a fixed boundary cost, repeated decisions reach the target (or max) and settle."""
    ctl = GroupSizeController()
    size = ctl.initial
    for _ in range(30):
        size = ctl.next_size(size, coordination, step, size).size
    overhead = coordination / size / step
    assert size == ctl.max_size or overhead <= ctl.target_overhead * (1 + 1e-9)
    assert ctl.next_size(size, coordination, step, size).size == size


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_overhead": 0.0},
        {"min_size": 0},
        {"max_size": 5, "initial": 10},
        {"min_size": 20, "initial": 10},
        {"growth": 1.0},
        {"shrink": 1.0},
        {"shrink": 0.0},
        {"target_overhead": float("nan")},
    ],
)
def test_controller_config_is_validated(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        GroupSizeController(**kwargs)


@pytest.mark.parametrize(
    "args", [(0, 1.0, 1.0, 1), (10, -1.0, 1.0, 1), (10, 1.0, float("inf"), 1), (10, 1.0, 1.0, -1)]
)
def test_controller_rejects_bad_measurements(args: tuple[Any, ...]) -> None:
    with pytest.raises(ConfigError):
        GroupSizeController().next_size(*args)

"""Failures at group boundaries, with real node processes: a worker killed mid-group, a node
joining later, the leader dying, a task digest mismatch and a malformed job spec."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.sched_helpers import Procs, write_task

pytestmark = pytest.mark.slow

JOB = "sched_task:task"


@pytest.fixture
def procs(tmp_path: Path):
    p = Procs(tmp_path, write_task(tmp_path / "task"))
    try:
        yield p
    finally:
        p.close()


def _check_done(done: dict, world_size: int) -> None:
    acc = done["accounting"]
    assert acc["exact"], acc
    assert acc["index_sums_checked"]
    for row in acc["epochs"]:
        assert row["samples"] == row["expected"] == 512
        assert row["index_sum"] == row["expected_index_sum"]
    assert done["samples"] == 512 * 3
    assert done["steps"] == 32 * 3
    assert done["world_size"] == world_size
    assert done["weights_identical"], done["weights_by_rank"]


# small: the direct exchange; large: shared memory (every node on this host; sliced elsewhere)
@pytest.mark.parametrize("features", ["31", "199999"], ids=["small", "large"])
def test_worker_killed_mid_group(procs: Procs, features: str) -> None:
    """Rank-2's process SIGKILLs itself inside step 9 (group 2 of 4-step groups): the
    survivors roll back to the last common boundary and finish; every sample of every epoch
    is counted exactly once and the survivors' weights are bit-identical."""
    env = {"SCHED_TEST_FEATURES": features}
    leader = procs.lead(JOB, 4, "--min-nodes", "2", env=env)
    workers = [procs.join(f"w{i}", leader, env) for i in (1, 2)]
    victim = procs.join("victim", leader, {**env, "SCHED_TEST_DIE_AT_STEP": "9"})
    try:
        assert leader.wait() == 0, procs.logs()
        for w in workers:
            assert w.wait() == 0, procs.logs()
        assert victim.wait() != 0
        assert victim.event("dying") is not None, procs.logs()
        done = leader.event("done")
        assert done is not None
        _check_done(done, world_size=3)
        assert done["failures"] == 1
        recovery = done["recoveries"][0]
        assert recovery["rollback_to"] in (8, 4)  # the boundary before step 9 (or one earlier)
        assert recovery["world_size"] == 3
        hashes = {w.event("done")["weights_sha256"] for w in workers}
        assert hashes == {done["weights_sha256"]}
    except AssertionError:
        print(procs.logs())
        raise


def test_too_few_survivors_stop_with_a_clear_error(procs: Procs) -> None:
    leader = procs.lead(JOB, 2, "--min-nodes", "2")
    victim = procs.join("victim", leader, {"SCHED_TEST_DIE_AT_STEP": "5"})
    assert leader.wait() == 1, procs.logs()
    assert victim.wait() != 0
    err = leader.err.read_text()
    assert "only 1 node(s) remain, the job needs at least 2" in err, err
    assert leader.event("done") is None


def test_a_task_step_that_raises_stops_the_job_on_every_node(procs: Procs) -> None:
    """The task's own code raising is not a lost peer: re-running the step would raise again,
    so the job stops at once on every node, naming the rank and the error (it used to leave
    that worker silent while the others timed out and recovered into the same error)."""
    leader = procs.lead(JOB, 2)
    worker = procs.join("bad", leader, {"SCHED_TEST_RAISE_AT_STEP": "5"})
    assert leader.wait() == 1, procs.logs()
    assert worker.wait() == 1, procs.logs()
    for node in (leader, worker):
        err = node.err.read_text()
        assert "task raised ValueError: bad batch at step 5" in err, procs.logs()
    assert leader.event("done") is None


def test_node_joins_at_a_boundary(procs: Procs, tmp_path: Path) -> None:
    """Two nodes train; rank 0 holds step 6 until the leader has a third node set up and
    waiting (its `joining` event); it joins at the next boundary, receives weights and
    optimizer state, and ends bit-identical."""
    gate = tmp_path / "joiner-set-up"
    leader = procs.lead(
        JOB, 2, env={"SCHED_TEST_GATE_FILE": str(gate), "SCHED_TEST_GATE_STEP": "6"}
    )
    w1 = procs.join("w1", leader)
    w1.wait_event("ready")
    joiner = procs.join("joiner", leader)
    try:
        joining = leader.wait_event("joining")
        assert joining["after_step"] <= 6
        gate.touch()
        assert leader.wait() == 0
        assert w1.wait() == 0
        assert joiner.wait() == 0
        done = leader.event("done")
        assert done is not None
        _check_done(done, world_size=3)
        assert done["membership_epochs"] == 2
        assert joiner.event("ready")["rank"] == 2
        assert joiner.event("done")["weights_sha256"] == done["weights_sha256"]
        assert w1.event("done")["weights_sha256"] == done["weights_sha256"]
        assert joiner.event("done")["steps_run"] < done["steps"]
    except AssertionError:
        print(procs.logs())
        raise


def test_leader_death_stops_workers(procs: Procs) -> None:
    leader = procs.lead(JOB, 2, env={"SCHED_TEST_DIE_AT_STEP": "20"})
    worker = procs.join("w1", leader)
    assert worker.wait() == 1, procs.logs()
    assert leader.wait() != 0
    err = worker.err.read_text()
    assert "lost the leader" in err or "leader" in err, err


def test_task_digest_mismatch_is_rejected_before_any_step(procs: Procs, tmp_path: Path) -> None:
    other = write_task(tmp_path / "other", comment="\n# a different revision of the task\n")
    marks = tmp_path / "steps"
    env = {"SCHED_TEST_STEP_MARK": str(marks)}
    leader = procs.lead(JOB, 2, env=env)
    worker = procs.join("w1", leader, env, task_dir=other)
    assert leader.wait() == 1, procs.logs()
    assert worker.wait() == 1, procs.logs()
    assert "task digest mismatch" in leader.err.read_text()
    assert "task digest mismatch" in worker.err.read_text()
    assert not marks.exists(), "a step ran"
    assert leader.event("done") is None


def test_malformed_job_spec_is_rejected(procs: Procs, tmp_path: Path) -> None:
    bad = write_task(tmp_path / "bad", spec_patch='"global_batch": 0,')
    marks = tmp_path / "steps"
    leader = procs.start(
        "leader",
        ["--lead", "--job", JOB, "--nodes", "1"],
        {"SCHED_TEST_STEP_MARK": str(marks)},
        task_dir=bad,
    )
    assert leader.wait() == 2
    err = leader.err.read_text()
    assert "malformed job spec" in err and "global_batch" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not marks.exists()
    assert leader.event("ready") is None

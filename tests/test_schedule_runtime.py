"""The scheduling runtime: control-message validation (pure), then real processes: group
scheduled and BSP training, and a leader crash resumed from its checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import pytest

from p2pdl.collectives.sharded import OptimizerConfig
from p2pdl.config import NodeConfig
from p2pdl.errors import ConfigError, ProtocolError
from p2pdl.schedule.protocol import check
from p2pdl.schedule.runtime import JobOptions
from p2pdl.wire import unpack_message
from tests.sched_helpers import Procs, write_task

JOB = "sched_task:task"


# ----------------------------------------------------------------------------- pure
def test_control_messages_round_trip_and_are_validated() -> None:
    message = {
        "k": "report",
        "epoch": 1,
        "group": 2,
        "steps": 4,
        "t_compute": 0.1,
        "t_reduce": 0.2,
        "t_wait": 0.0,
        "t_boundary": 0.0,
    }

    def decode(data: bytes, sender: int | None = None) -> dict:
        return check(unpack_message(data), sender=sender)

    assert decode(msgpack.packb(message)) == message
    with pytest.raises(ProtocolError, match="without field 'group'"):
        decode(msgpack.packb({**{k: v for k, v in message.items() if k != "group"}}))
    with pytest.raises(ProtocolError, match="unknown control message kind"):
        decode(msgpack.packb({"k": "exec", "code": "rm -rf /"}))
    with pytest.raises(ProtocolError, match="epoch has type str"):
        decode(msgpack.packb({**message, "epoch": "1"}))
    with pytest.raises(ProtocolError, match="must not be a bool"):
        decode(msgpack.packb({**message, "steps": True}))
    with pytest.raises(ProtocolError, match="undecodable"):
        decode(b"\xc1garbage", sender=3)
    with pytest.raises(ProtocolError, match="ext"):  # no extension types, ever
        decode(msgpack.packb({"k": "ping", "x": msgpack.ExtType(1, b"code")}))
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        unpack_message(msgpack.packb({"k": "ping", "pad": "x" * 64}), max_bytes=32)


def test_optimizer_config_is_validated() -> None:
    assert OptimizerConfig.from_mapping({"kind": "sgd", "momentum": 0.9}).state_names == (
        "momentum_buffer",
    )
    assert OptimizerConfig.from_mapping({"kind": "adamw", "amsgrad": True}).state_names == (
        "exp_avg",
        "exp_avg_sq",
        "max_exp_avg_sq",
    )
    with pytest.raises(ConfigError, match="nesterov"):
        OptimizerConfig.from_mapping({"kind": "sgd", "nesterov": True})
    with pytest.raises(ConfigError, match="unknown field"):
        OptimizerConfig.from_mapping({"kind": "sgd", "learning_rate": 0.1})
    with pytest.raises(ConfigError, match="momentum"):  # the stricter rule of the two old ones
        OptimizerConfig.from_mapping({"kind": "sgd", "momentum": 1.5})


def test_job_node_options_are_validated() -> None:
    secret = {"secret": b"s" * 16}
    leader = NodeConfig(world_size=2, **secret)
    joiner = NodeConfig(leader=("127.0.0.1", 5000), **secret)
    with pytest.raises(ConfigError, match="needs a job"):
        JobOptions().check_role(leader)
    with pytest.raises(ConfigError, match=r"leads .* or joins"):
        JobOptions(job="a:b").check_role(NodeConfig(rank=0, peers=[("127.0.0.1", 1)], **secret))
    with pytest.raises(ConfigError, match="the leader's settings"):
        JobOptions(job="a:b", bsp=True).check_role(joiner)
    with pytest.raises(ConfigError, match="--resume needs --checkpoint-dir"):
        JobOptions(job="a:b", resume=True)
    with pytest.raises(ConfigError, match="without a shared secret"):
        NodeConfig(world_size=2)


# ------------------------------------------------------------------------ processes
@pytest.fixture
def procs(tmp_path: Path):
    p = Procs(tmp_path, write_task(tmp_path / "task"))
    try:
        yield p
    finally:
        p.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "opt"),
    [
        ((), '{"kind": "sgd", "momentum": 0.9, "nesterov": true}'),
        (("--bsp",), '{"kind": "adamw", "weight_decay": 0.01}'),
        (("--group-size", "auto"), '{"kind": "adam", "amsgrad": true}'),
    ],
    ids=["groups", "bsp", "auto"],
)
def test_training_runs_to_the_end(procs: Procs, extra: tuple[str, ...], opt: str) -> None:
    env = {"SCHED_TEST_OPT": opt, "SCHED_TEST_FEATURES": "199999"}  # 800 KB: the sliced path
    if '"adam' in opt:
        env["SCHED_TEST_LR"] = "0.0005"  # Adam's steps do not shrink with the gradient
    leader = procs.lead(JOB, 3, *extra, env=env)
    workers = [procs.join(f"w{i}", leader, env) for i in (1, 2)]
    try:
        assert leader.wait() == 0
        assert all(w.wait() == 0 for w in workers)
        done = leader.event("done")
        assert done["accounting"]["exact"], done["accounting"]
        assert done["samples"] == 3 * 512 and done["steps"] == 96
        assert done["weights_identical"]
        assert done["loss_by_epoch"][-1] < done["loss_by_epoch"][0]
        if extra == ("--bsp",):
            assert done["groups"] == 96
            assert done["leader_messages_per_iteration"] == pytest.approx(2.0)
        for w in workers:
            assert w.event("done")["weights_sha256"] == done["weights_sha256"]
    except AssertionError:
        print(procs.logs())
        raise


@pytest.mark.slow
def test_leader_crash_resumes_from_checkpoint(procs: Procs, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    args = ("--checkpoint-dir", str(ckpt), "--checkpoint-every", "1")
    leader = procs.lead(JOB, 2, *args, env={"SCHED_TEST_DIE_AT_STEP": "42"})
    worker = procs.join("w1", leader)
    assert leader.wait() != 0
    assert worker.wait() == 1
    assert "leader" in worker.err.read_text()
    assert (ckpt / "checkpoint.npz").is_file()
    procs.nodes.clear()
    leader = procs.start("leader2", ["--lead", "--job", JOB, "--nodes", "2", *args, "--resume"])
    worker = procs.join("w2", leader)
    try:
        assert leader.wait() == 0
        assert worker.wait() == 0
        done = leader.event("done")
        assert 0 < done["steps_this_run"] < 96
        assert done["steps"] == 96
        assert done["accounting"]["exact"], done["accounting"]
        assert done["weights_identical"]
    except AssertionError:
        print(procs.logs())
        raise


@pytest.mark.slow
def test_stall_inspector_names_the_rank_everyone_waits_for(procs: Procs, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    stall = ("--stall-timeout", "1")
    leader = procs.lead(JOB, 3, *stall)
    free = procs.join("w1", leader)
    held = procs.join(
        "w2", leader, env={"SCHED_TEST_GATE_FILE": str(gate), "SCHED_TEST_GATE_STEP": "5"}
    )
    try:
        held_rank = held.wait_event("ready")["rank"]
        leader.wait_event("stall")
        # Each stalled rank reports on its own; once both free ranks have, the inspector
        # names exactly the held one.
        deadline = time.monotonic() + 60
        reports: list[dict] = []
        while time.monotonic() < deadline:
            reports = [e for e in leader.events() if e.get("event") == "stall"]
            if any(r["waiting_for"] == [held_rank] for r in reports):
                break
            time.sleep(0.05)  # polling the leader's output for a condition, under a deadline
        assert any(r["waiting_for"] == [held_rank] and r["step"] == 5 for r in reports), reports
        gate.touch()
        assert [node.wait() for node in (leader, free, held)] == [0, 0, 0]
        assert leader.event("done")["accounting"]["exact"]
    except AssertionError:
        print(procs.logs())
        raise
    finally:
        gate.touch()

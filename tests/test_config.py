"""The one node configuration type: modes, defaults, the environment, and bad settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2pdl.config import NodeConfig, Timeouts
from p2pdl.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
S = {"secret": b"0123456789abcdef"}


def test_modes_and_what_rank_means() -> None:
    static = NodeConfig(rank=1, peers=[("127.0.0.1", 7001), ("127.0.0.1", 7002)], **S)
    assert static.mode == "static" and static.world_size == 2
    assert (static.listen_host, static.listen_port) == ("127.0.0.1", 7002)
    lead = NodeConfig(world_size=4, **S)
    assert lead.mode == "lead" and lead.rank == 0 and lead.listen_port == 0
    torchrun_leader = NodeConfig(rank=0, world_size=4, leader=("127.0.0.1", 29500), **S)
    assert torchrun_leader.mode == "lead" and torchrun_leader.listen_port == 29500
    joiner = NodeConfig(rank=3, leader="127.0.0.1:29500", **S)
    assert joiner.mode == "join" and joiner.rank == 3 and joiner.leader == ("127.0.0.1", 29500)
    assigned = NodeConfig(leader=("127.0.0.1", 29500), **S)
    assert assigned.mode == "join" and assigned.rank is None


def test_from_env_reads_p2pdl_and_torchrun_variables_and_overrides_win() -> None:
    env = {"RANK": "2", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29400"}
    config = NodeConfig.from_env(env, **S)
    assert (config.mode, config.rank, config.world_size) == ("join", 2, 3)
    assert config.leader == ("127.0.0.1", 29400)
    assert NodeConfig.from_env({**env, "RANK": "0"}, **S).mode == "lead"
    # connect(rank=1) with the rest from the environment: the argument wins.
    assert NodeConfig.from_env({"P2PDL_LEADER": "127.0.0.1:1"}, rank=1, **S).rank == 1
    single = NodeConfig.from_env({}, **S)
    assert single.mode == "lead" and single.world_size == 1
    secret = NodeConfig.from_env({"P2PDL_SECRET": "s" * 16})
    assert secret.secret == b"s" * 16 and "ssss" not in repr(secret)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({}, "no peers and no leader"),
        ({"peers": [("127.0.0.1", 1)], "leader": ("127.0.0.1", 2), "rank": 0}, "not both"),
        ({"peers": [("127.0.0.1", 1)], "rank": 1}, "outside 0..0"),
        ({"peers": [("127.0.0.1", 1)]}, "outside"),
        ({"world_size": 0}, "positive"),
        ({"world_size": 3, "rank": 2}, "needs the leader's address"),
        ({"leader": ("127.0.0.1", 1), "rank": 0}, "needs the world size"),
        ({"leader": ("127.0.0.1", 1), "rank": 5, "world_size": 3}, "outside 0..2"),
        ({"leader": "nonsense"}, "host:port"),
        ({"world_size": 2, "port": 70000}, "outside 0..65535"),
        ({"world_size": 2, "rank": True}, "integer"),
        ({"world_size": 2, "secret": b"short"}, "at least"),
        ({"world_size": 2, "secret": None}, "127.0.0.1 without a shared secret"),
        ({"leader": ("198.18.0.1", 29500), "rank": 1, "secret": None}, "without a shared"),
        ({"world_size": 2, "cluster_id": ""}, "cluster_id"),
        ({"world_size": 2, "chunk_bytes": 8}, "chunk_bytes"),
    ],
)
def test_bad_settings_are_config_errors(settings: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        NodeConfig(**{**S, **settings})


def test_unknown_settings_and_copies() -> None:
    with pytest.raises(ConfigError, match="unknown node setting"):
        NodeConfig.build(world_size=2, colour="blue", **S)
    base = NodeConfig(world_size=2, timeouts=Timeouts(operation=5.0), **S)
    copy = NodeConfig.build(base, port=1234)
    assert copy.port == 1234 and copy.timeouts.operation == 5.0 and base.port is None
    with pytest.raises(ConfigError, match="outside"):
        base.with_(port=-1)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["node", "--lead", "--nodes", "2", "--group-size", "4"], "only apply to a training job"),
        (["node", "--leader", "127.0.0.1:1", "--bsp"], "only apply to a training job"),
        (["node", "--leader", "127.0.0.1:1", "--rank", "0"], "rank 0 is the leader"),
        (["node", "--lead", "--nodes", "2", "--job", "a:b", "--spec", "epochs"], "FIELD=VALUE"),
        (["node", "--peers", "127.0.0.1:1"], "--peers needs --rank"),
    ],
)
def test_cli_refuses_settings_that_would_be_ignored(argv: list[str], match: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "p2pdl", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(ROOT),
        env={**os.environ, "P2PDL_SECRET": "x" * 32},
    )
    assert done.returncode == 2, done.stderr
    assert match in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr

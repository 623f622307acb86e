"""Collectives between node processes on namespace hosts: distinct addresses, real shaped links.

Needs root and network namespaces (with tbf); skips with the harness's reason otherwise.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pdl.testing import netns
from p2pdl.testing.cluster import pid_alive
from p2pdl.testing.netns import LinkSpec
from p2pdl.testing.netns_cluster import NetnsNodeCluster, layout_ranks
from p2pdl.testing.plugin import managed_clusters

_OK, _REASON = netns.available(rate=True)
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not _OK, reason=_REASON or "")]

ROOT = Path(__file__).resolve().parents[1]
LINK = LinkSpec(rate="1gbit")
OP_TIMEOUT = 15.0


def _netns_names() -> set[str]:
    out = subprocess.run(
        ["ip", "-j", "netns", "list"], check=True, capture_output=True, text=True
    ).stdout.strip()
    return {entry["name"] for entry in json.loads(out)} if out else set()


@pytest.fixture
def netns_cluster(request: pytest.FixtureRequest) -> Iterator[Callable[..., NetnsNodeCluster]]:
    """A factory: `netns_cluster(layout, run=..., run_args=..., link=...)` → started cluster.

    At teardown every cluster is closed (its logs are printed when the test failed), and the
    test fails if a node process or one of the run's namespaces is left behind.
    """
    with managed_clusters(
        request, NetnsNodeCluster, link=LINK, op_timeout=OP_TIMEOUT, timeout=40.0
    ) as (make, clusters):
        yield make
    names = {name for cluster in clusters for name in cluster.netns.namespaces}
    assert not names & _netns_names(), f"namespaces left behind: {names & _netns_names()}"


def _check_identities(cluster: NetnsNodeCluster, results: dict[int, Any]) -> None:
    hosts = [cluster.address_of(r) for r in range(cluster.n)]
    for rank, value in results.items():
        ident = value["identity"]
        assert ident["rank"] == rank
        assert ident["host"] == hosts[rank]
        assert ident["peer_hosts"] == hosts
        assert ident["local_ranks"] == [r for r in range(cluster.n) if hosts[r] == hosts[rank]]
        assert ident["remote_ranks"] == [r for r in range(cluster.n) if hosts[r] != hosts[rank]]


def test_collectives_across_three_hosts(netns_cluster) -> None:
    cluster = netns_cluster(3, run="tests.workers_netns:collectives")
    assert len(set(cluster.netns.addresses)) == 3
    assert all(ipaddress.ip_address(a) in cluster.netns.network for a in cluster.netns.addresses)
    results = cluster.results()
    assert sorted(results) == [0, 1, 2]
    _check_identities(cluster, results)
    for rank, value in results.items():
        failed = {name: c for name, c in value["checks"].items() if not c["equal"]}
        assert not failed, f"rank {rank}: {failed}"
        assert {"auto", "direct", "sliced", "ring", "driver", "tree"} <= set(value["checks"])
        # Every rank is remote to every other: three hosts, one node each.
        assert value["identity"]["local_ranks"] == [rank]
    # The leader was reached at host 0's address, never loopback.
    assert cluster.leader_address is not None
    assert cluster.leader_address.split(":")[0] == cluster.address_of(0)


def test_two_hosts_two_nodes_each(netns_cluster) -> None:
    cluster = netns_cluster([2, 2], run="tests.workers_netns:collectives", run_args={"root": 3})
    assert layout_ranks([2, 2]) == [0, 0, 1, 1]
    results = cluster.results()
    _check_identities(cluster, results)
    for rank, value in results.items():
        failed = {name: c for name, c in value["checks"].items() if not c["equal"]}
        assert not failed, f"rank {rank}: {failed}"
    local = {rank: value["identity"]["local_ranks"] for rank, value in results.items()}
    assert local == {0: [0, 1], 1: [0, 1], 2: [2, 3], 3: [2, 3]}
    assert results[0]["identity"]["host"] != results[2]["identity"]["host"]
    assert results[0]["identity"]["port"] != results[1]["identity"]["port"]


@pytest.mark.parametrize("victim", [2, 0])
def test_sigkilled_host_node_is_named_by_the_others(netns_cluster, victim: int) -> None:
    cluster = netns_cluster(3, run="tests.workers_netns:wait_for_loss", run_args={"victim": victim})
    for rank in range(cluster.n):
        cluster.wait_event(rank, "armed")
    cluster.kill(victim, signal.SIGKILL)
    codes = cluster.wait()
    assert codes[victim] == -signal.SIGKILL
    for node in cluster.nodes:
        if node.rank == victim:
            continue
        assert codes[node.rank] == 0, cluster.logs()
        value = [e for e in node.events if e["event"] == "result"][-1]["value"]
        assert value["error"] == "PeerLostError", value
        assert value["ranks"] == [victim]
        assert f"rank {victim}" in value["message"]
        assert value["seconds"] < OP_TIMEOUT  # detected from the link, not by the deadline
        assert value["identity"]["host"] == cluster.address_of(node.rank)


def test_close_removes_namespaces_and_processes_even_after_a_failure() -> None:
    cluster = NetnsNodeCluster(
        2, link=LINK, run="tests.workers:exit_with", timeout=40.0, cwd=str(ROOT)
    )
    with pytest.raises(RuntimeError, match="boom"), cluster:
        names = set(cluster.netns.namespaces)
        assert names <= _netns_names()
        pids = cluster.pids()
        assert all(pid_alive(pid) for pid in pids)
        raise RuntimeError("boom")
    assert not names & _netns_names()
    assert not any(pid_alive(pid) for pid in pids)


def test_scaling_bound_raw_and_header_adjusted() -> None:
    from p2pdl.bench import scaling

    raw, adjusted = scaling.bounds(16 << 20, 8, 10**9)
    assert raw == pytest.approx(2 * (16 << 20) * 7 / (8 * 125e6))
    assert adjusted == pytest.approx(raw * 1514 / 1448)
    assert scaling.bounds(16 << 20, 2, 10**9)[0] < raw  # (N−1)/N grows with N


def test_scaling_delay_needs_netem() -> None:
    has_netem, _ = netns.available(delay=True)
    if has_netem:
        pytest.skip("this kernel has netem: the delay experiment can run")
    done = subprocess.run(
        [sys.executable, "-m", "p2pdl", "bench", "scaling", "--hosts", "2", "--delay", "1ms"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "netem" in lines[0] and "not available" in lines[0], lines

"""p2pdl.spark on a Spark standalone cluster whose Master and Workers run on namespace hosts.

The Master and the driver share host 0; each of two Workers runs on its own host, so its
executor has its own address and reaches the others only over its host's 100 Mbit/s link
(p2pdl.testing.spark_standalone). Needs root and network namespaces, Java and pyspark; skips
with the reason otherwise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pdl.testing import netns
from p2pdl.testing.cluster import pid_alive
from p2pdl.testing.netns import LinkSpec, NamespaceCluster

pytest.importorskip("pyspark", reason="pyspark is not installed (the [spark] extra)")
if shutil.which("java") is None:
    pytest.skip("Spark needs Java: no `java` on PATH", allow_module_level=True)
_OK, _REASON = netns.available(rate=True)
pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(not _OK, reason=_REASON or ""),
]

from p2pdl.testing.spark_standalone import SparkClusterError, StandaloneSpark  # noqa: E402
from tests.spark_tasks import STEPS_PER_EPOCH  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NODES = 2


@pytest.fixture(scope="module")
def standalone() -> Iterator[StandaloneSpark]:
    with (
        NamespaceCluster(NODES + 1, link=LinkSpec(rate="100mbit")) as hosts,
        StandaloneSpark(hosts, worker_memory="2g") as cluster,
    ):
        daemons = cluster.pids()
        yield cluster
    assert not [pid for pid in daemons if pid_alive(pid)], "Spark daemons left behind"
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [name for name in hosts.namespaces if name in listed], "namespaces left behind"


@pytest.fixture(scope="module")
def result(standalone: StandaloneSpark) -> dict[str, Any]:
    """One driver run on the cluster: `run` of a job, then `fit` on a DataFrame."""
    done = standalone.run_driver(
        ["-m", "tests.spark_standalone_driver", str(NODES)],
        timeout=240,
        env={"PYTHONPATH": str(ROOT)},
    )
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        pytest.fail(
            f"driver exited with {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
            f"\n{standalone.logs()}"
        )
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_each_executor_runs_on_its_own_worker_host(
    standalone: StandaloneSpark, result: dict[str, Any]
) -> None:
    assert result["slots"] == NODES
    workers = {host.address for host in standalone.worker_hosts}
    assert set(result["addresses"]) == workers
    assert standalone.master_host.address not in result["addresses"]


def test_run_trains_across_the_hosts(result: dict[str, Any]) -> None:
    summary = result["run"]["summary"]
    assert summary["world_size"] == NODES
    assert summary["steps"] == 2 * STEPS_PER_EPOCH
    assert summary["weights_identical"] is True
    assert result["run"]["accuracy"] == pytest.approx(result["run"]["metrics"]["accuracy"])
    assert result["run"]["accuracy"] > 0.8


def test_fit_trains_on_the_executors_partitions(result: dict[str, Any]) -> None:
    summary = result["fit"]["summary"]
    assert summary["world_size"] == NODES
    assert summary["steps"] == 3 * STEPS_PER_EPOCH
    assert summary["weights_identical"] is True
    assert result["fit"]["accuracy"] > 0.85


def test_a_worker_that_cannot_start_is_named_with_its_log() -> None:
    with NamespaceCluster(2) as hosts:
        cluster = StandaloneSpark(hosts, worker_memory="lots", start_timeout=60)
        with pytest.raises(
            SparkClusterError, match=r"(?s)worker 1 exited with 1 before .*Usage: Worker"
        ):
            cluster.start()
        assert cluster.pids() == []  # what had started was stopped

"""pytest plugin (registered through the `pytest11` entry point): p2pdl's fixtures.

`local_cluster(n, run="module:func", ...)` starts real node processes, shows every rank's
log when the test fails, and proves at teardown that no process was left behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from p2pdl.testing.cluster import LocalCluster, pid_alive


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"p2pdl_report_{report.when}", report)
    return report


@pytest.fixture
def local_cluster(request: pytest.FixtureRequest) -> Iterator[Callable[..., LocalCluster]]:
    """A factory: `local_cluster(n, run=..., run_args=..., timeout=...)` → started cluster."""
    clusters: list[LocalCluster] = []

    def make(n: int, **kwargs: Any) -> LocalCluster:
        kwargs.setdefault("cwd", str(request.config.rootpath))
        cluster = LocalCluster(n, **kwargs)
        clusters.append(cluster)
        return cluster.start()

    yield make
    failed = getattr(request.node, "p2pdl_report_call", None)
    for cluster in clusters:
        cluster.close()
        if failed is not None and failed.failed:
            print(cluster.logs())
    leftovers = [pid for cluster in clusters for pid in cluster.pids() if pid_alive(pid)]
    assert not leftovers, f"node processes left behind: {leftovers}"

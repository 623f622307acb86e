"""pytest plugin (registered through the `pytest11` entry point): p2pdl's fixtures.

`local_cluster(n, run="module:func", ...)` starts real node processes, shows every rank's
log when the test fails, and proves at teardown that no process was left behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from p2pdl.testing.cluster import LocalCluster, pid_alive

C = TypeVar("C", bound=LocalCluster)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"p2pdl_report_{report.when}", report)
    return report


@contextlib.contextmanager
def managed_clusters(
    request: pytest.FixtureRequest, cluster_type: type[C], **defaults: Any
) -> Iterator[tuple[Callable[..., C], list[C]]]:
    """A cluster factory for fixtures: clusters made through it are closed at the end, their
    logs printed if the test failed, and no node process may be left behind."""
    clusters: list[C] = []

    def make(*args: Any, **kwargs: Any) -> C:
        for key, value in defaults.items():
            kwargs.setdefault(key, value)
        kwargs.setdefault("cwd", str(request.config.rootpath))
        cluster = cluster_type(*args, **kwargs)
        clusters.append(cluster)
        cluster.start()
        return cluster

    try:
        yield make, clusters
    finally:
        report = getattr(request.node, "p2pdl_report_call", None)
        for cluster in clusters:
            cluster.close()
            if report is not None and report.failed:
                print(cluster.logs())
    leftovers = [pid for cluster in clusters for pid in cluster.pids() if pid_alive(pid)]
    assert not leftovers, f"node processes left behind: {leftovers}"


@pytest.fixture
def local_cluster(request: pytest.FixtureRequest) -> Iterator[Callable[..., LocalCluster]]:
    """A factory: `local_cluster(n, run=..., run_args=..., timeout=...)` → started cluster."""
    with managed_clusters(request, LocalCluster) as (make, _clusters):
        yield make

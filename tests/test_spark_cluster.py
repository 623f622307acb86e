"""p2pdl.spark on `local-cluster[2,1,1024]`: two executor JVMs, one barrier task on each.

The same job and DataFrame training as test_spark.py (local mode, where the bad inputs, the
secret and a crashed worker are tested too: each start of executors here costs ~20 s).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("pyspark", reason="pyspark is not installed (the [spark] extra)")
if shutil.which("java") is None:
    pytest.skip("Spark needs Java: no `java` on PATH", allow_module_level=True)


import p2pdl.spark
from tests.spark_tasks import STEPS_PER_EPOCH, Sessions, digits_accuracy, digits_rows

pytestmark = pytest.mark.slow

MASTER = "local-cluster[2,1,1024]"


@pytest.fixture
def spark(sessions: Sessions) -> Any:
    return sessions.get(MASTER)


def _executor_pids(spark: Any) -> list[int]:
    def pid(_rows: Any) -> Iterator[int]:
        import os

        yield os.getppid()  # the Python worker's parent: the daemon of that executor

    rdd = spark.sparkContext.parallelize(range(2), 2)
    return rdd.barrier().mapPartitions(pid).collect()


def test_run_on_two_executors(spark: Any) -> None:
    result = p2pdl.spark.run(spark, "tests.spark_tasks:digits", num_nodes=2)
    assert p2pdl.spark.cluster_slots(spark) == 2
    assert len(set(_executor_pids(spark))) == 2  # one task in each executor
    summary = result.summary
    assert summary["world_size"] == 2
    assert summary["steps"] == 2 * STEPS_PER_EPOCH
    assert summary["weights_identical"] is True
    assert digits_accuracy(result.state_dict) == pytest.approx(result.metrics["accuracy"])
    assert result.metrics["accuracy"] > 0.8


def test_fit_on_two_executors(spark: Any) -> None:
    df = spark.createDataFrame(digits_rows(), "features array<float>, label long")
    result = p2pdl.spark.fit(df, "tests.spark_tasks:frame", num_nodes=2)
    assert result.summary["steps"] == 3 * STEPS_PER_EPOCH
    assert result.summary["weights_identical"] is True
    assert digits_accuracy(result.state_dict) > 0.85

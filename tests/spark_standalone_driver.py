"""The driver of tests/test_spark_standalone.py: run inside the master's namespace host by
`StandaloneSpark.run_driver`, it trains on the standalone cluster's executors and prints one
JSON line (what the executors' addresses were, and what `run` and `fit` returned)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import p2pdl.spark
from tests.spark_tasks import Sessions, digits_accuracy, digits_rows


def executor_addresses(spark: Any, n: int) -> list[str]:
    """The host address of each of `n` barrier tasks' executors (what p2pdl.spark binds to)."""

    def addresses(_rows: Any) -> Iterator[list[str]]:
        from pyspark import BarrierTaskContext

        yield [info.address.rsplit(":", 1)[0] for info in BarrierTaskContext.get().getTaskInfos()]

    rdd = spark.sparkContext.parallelize(range(n), n)
    return rdd.barrier().mapPartitions(addresses).collect()[0]


def main() -> int:
    nodes = int(sys.argv[1])
    sessions = Sessions()
    try:
        spark = sessions.get(
            os.environ["P2PDL_SPARK_MASTER"],
            **{
                "spark.driver.host": os.environ["P2PDL_SPARK_DRIVER_HOST"],
                "spark.driver.bindAddress": os.environ["P2PDL_SPARK_DRIVER_HOST"],
                "spark.executor.cores": "1",
                "spark.executor.memory": "1g",
            },
        )
        addresses = executor_addresses(spark, nodes)  # waits for the executors' slots
        slots = p2pdl.spark.cluster_slots(spark)
        ran = p2pdl.spark.run(spark, "tests.spark_tasks:digits", num_nodes=nodes)
        df = spark.createDataFrame(digits_rows(), "features array<float>, label long")
        fitted = p2pdl.spark.fit(df, "tests.spark_tasks:frame", num_nodes=nodes, repartition=True)
    finally:
        sessions.close()
    out = {
        "slots": slots,
        "addresses": addresses,
        "run": {
            "summary": ran.summary,
            "accuracy": digits_accuracy(ran.state_dict),
            "metrics": ran.metrics,
        },
        "fit": {"summary": fitted.summary, "accuracy": digits_accuracy(fitted.state_dict)},
    }
    print("RESULT " + json.dumps(out, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

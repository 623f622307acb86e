"""p2pdl on Spark: a whole training job inside one barrier stage (needs the `[spark]` extra).

    result = p2pdl.spark.run(spark, "examples.train_digits:task", num_nodes=2)
    result = p2pdl.spark.fit(df, "examples.train_spark:task", features="features", label="label")
    model.load_state_dict(result.state_dict)

Each barrier task runs one p2pdl node on its executor; the nodes find each other through
`BarrierTaskContext`, AllReduce peer to peer over encrypted links and run the job's iteration
groups with no Spark job and no driver round trip per iteration. See docs/spark.md.
"""

from __future__ import annotations

from p2pdl.spark.data import Columns, PartitionData, PartitionTask
from p2pdl.spark.driver import SparkResult, cluster_slots, fit, run

__all__ = [
    "Columns",
    "PartitionData",
    "PartitionTask",
    "SparkResult",
    "cluster_slots",
    "fit",
    "run",
]

"""The driver side: check the cluster, launch one barrier stage, turn its answer into a result.

`run(spark, job, num_nodes)` hosts a job that loads its own data (the one that
`python -m p2pdl node --lead --job` runs); `fit(df, task)` trains a task on a DataFrame, each
barrier task on its own partition. A fresh secret is drawn here for every call and reaches the
tasks only inside the stage's closure (see docs/spark.md for what an observer can still see).
"""

from __future__ import annotations

import io
import logging
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from p2pdl.config import Timeouts
from p2pdl.errors import ConfigError
from p2pdl.schedule.errors import JobError
from p2pdl.spark.data import Columns
from p2pdl.spark.stage import StageSpec, barrier_task

log = logging.getLogger("p2pdl.spark")

__all__ = ["SparkResult", "cluster_slots", "fit", "run"]

SECRET_BYTES = 32
_REFERENCE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass(frozen=True, slots=True)
class SparkResult:
    """What the driver gets back from partition 0 (the leader).

    `summary` is the leader's job summary (steps, loss by epoch, iterations per second,
    group sizes, recoveries, whether every rank ended with the same weights, ...);
    `weights` the trained flat float32 weights; `state_dict` the torch model's trained
    state (`model.load_state_dict(result.state_dict)`), None for a task without a torch
    model; `metrics` what the task's `evaluate()` returned on the leader.
    """

    summary: dict[str, Any]
    weights: np.ndarray
    state_dict: dict[str, Any] | None
    metrics: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    """The Spark job's wall time on the driver, retries included."""


def cluster_slots(spark: Any) -> int:
    """Tasks the cluster can run at once now (executors' cores over spark.task.cpus)."""
    jsc = spark.sparkContext._jsc.sc()
    profile = jsc.resourceProfileManager().defaultResourceProfile()
    return int(jsc.maxNumConcurrentTasks(profile))


def _check_cluster(spark: Any, num_nodes: int, slots_timeout: float) -> None:
    """Refuse what a barrier stage cannot do before submitting it: Spark itself would wait
    (and retry) for missing slots for minutes, and refuses dynamic allocation late."""
    conf = spark.sparkContext.getConf()
    if conf.get("spark.dynamicAllocation.enabled", "false").lower() == "true":
        raise ConfigError(
            "p2pdl.spark needs spark.dynamicAllocation.enabled=false: a barrier stage runs "
            "all its tasks at once on a fixed set of executors"
        )
    master = spark.sparkContext.master
    # Executors of a fresh cluster register over a few seconds; local mode has its one
    # executor from the start.
    fixed = master.startswith("local[") or master == "local"
    deadline = time.monotonic() + (0.0 if fixed else slots_timeout)
    while True:
        slots = cluster_slots(spark)
        if slots >= num_nodes or time.monotonic() >= deadline:
            break
        time.sleep(0.25)  # polling Spark's executor count, under the deadline above
    if slots < num_nodes:
        waited = "" if fixed else f", after waiting {slots_timeout:.3g}s for executors"
        raise ConfigError(
            f"num_nodes={num_nodes} needs {num_nodes} task slots at once, but {master} has "
            f"{slots} (executor cores / spark.task.cpus{waited}); a barrier stage cannot "
            "start with fewer"
        )


def _check_args(job: str, num_nodes: object) -> int:
    if not isinstance(job, str) or not _REFERENCE.match(job):
        raise ConfigError(
            f"job must be a task reference 'package.module:attr' importable on every "
            f"executor, got {job!r}"
        )
    if not isinstance(num_nodes, int) or isinstance(num_nodes, bool) or num_nodes < 1:
        raise ConfigError(f"num_nodes must be a positive integer, got {num_nodes!r}")
    return num_nodes


def _new_secret() -> bytes:
    """A fresh secret for one call (the tests replace it with one they can look for)."""
    return secrets.token_bytes(SECRET_BYTES)


def _spec(job: str, num_nodes: int, settings: Mapping[str, Any]) -> StageSpec:
    try:
        return StageSpec(
            job=job,
            num_nodes=num_nodes,
            secret=_new_secret(),
            run_id=secrets.token_hex(8),
            **settings,
        )
    except TypeError as exc:
        raise ConfigError(f"p2pdl.spark: {exc}") from None


_PYTHON_ERROR = re.compile(r"(?m)^((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception)): (.+)$")
_ABORTED = re.compile(r"Job aborted due to stage failure: (.+?)(?: Most recent failure|\n|$)")


class _ChainRefused(JobError):
    """Spark refused the RDD chain in a barrier stage (SPARK-24820): nothing ran."""


def _spark_error(exc: Exception) -> JobError:
    """The failure inside a failed Spark job, as one readable JobError: why Spark gave up
    and the last Python exception raised in a task."""
    text = str(exc)
    if "BarrierJobUnsupportedRDDChainException" in text:
        return _ChainRefused(
            "Spark does not run this RDD chain in a barrier stage (a union, coalesce or "
            "partition pruning in the DataFrame's plan: SPARK-24820); repartition it first"
        )
    if "No module named 'p2pdl'" in text:
        return JobError("p2pdl is not installed on the executors: install it there first")
    python = [
        f"{kind.rpartition('.')[2]}: {message.strip()}"
        for kind, message in _PYTHON_ERROR.findall(text)
        if not kind.startswith(("org.", "java.", "py4j.", "scala.")) and "Py4J" not in kind
    ]
    aborted = _ABORTED.search(text)
    parts = [aborted.group(1).strip()] if aborted else []
    if "Python worker exited unexpectedly" in text:
        parts.append("a Python worker exited unexpectedly (crashed or killed)")
    if python:
        parts.append(f"last Python error: {python[-1]}")
        if python[-1].startswith("ModuleNotFoundError"):
            parts.append(
                "the executors' Python lacks a module p2pdl needs: install p2pdl with its "
                "dependencies there, or point PYSPARK_PYTHON at a Python that has them"
            )
    if not parts:
        parts.append(text.strip().splitlines()[0][:500] if text.strip() else type(exc).__name__)
    return JobError(f"the Spark barrier stage failed: {'; '.join(parts)}")


def _collect(spark: Any, rdd: Any, spec: StageSpec, slots_timeout: float) -> SparkResult:
    _check_cluster(spark, spec.num_nodes, slots_timeout)
    start = time.monotonic()

    def task(rows: Any) -> Any:
        return barrier_task(spec, rows)

    # The shuffle after the barrier stage makes it a map stage, which Spark retries when a
    # task fails (up to spark.stage.maxConsecutiveAttempts); a failed barrier *result* stage
    # is never retried. Only partition 0's answer goes through it.
    stage = rdd.barrier().mapPartitions(task).repartition(1)
    try:
        answers = stage.collect()
    except Exception as exc:
        if type(exc).__name__ not in ("Py4JJavaError", "PythonException", "SparkRuntimeException"):
            raise
        raise _spark_error(exc) from None
    wall = time.monotonic() - start
    if len(answers) != 1:
        raise JobError(f"expected one answer from partition 0, got {len(answers)}")
    answer = answers[0]
    if "errors" in answer:
        lines = "; ".join(f"task {i}: {e}" for i, e in sorted(answer["errors"].items()))
        raise ConfigError(f"p2pdl.spark: the job cannot run: {lines}")
    state = None
    if "state_dict" in answer:
        import torch

        state = torch.load(io.BytesIO(answer["state_dict"]), weights_only=True)
    return SparkResult(
        summary=answer["summary"],
        weights=np.asarray(answer["weights"]),
        state_dict=state,
        metrics=answer["metrics"],
        wall_s=round(wall, 4),
    )


def run(
    spark: Any,
    job: str,
    num_nodes: int,
    *,
    group_size: int | str | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    job_overrides: Mapping[str, Any] | None = None,
    timeouts: Timeouts | None = None,
    torch_threads: int | None = None,
    slots_timeout: float = 30.0,
) -> SparkResult:
    """Run the job `job` ("package.module:attr", importable on every executor) on
    `num_nodes` barrier tasks of `spark`'s cluster; returns the trained state and metrics.

    The tasks train exactly as `python -m p2pdl node --lead --job job` and its workers do
    (group scheduling, the sharded update). `checkpoint_dir` (a path every executor reaches)
    lets a stage that Spark retries after a failure resume from the last checkpoint;
    `resume=True` also resumes from a checkpoint an earlier call left there.
    """
    nodes = _check_args(job, num_nodes)
    settings = {
        "group_size": group_size,
        "checkpoint_dir": checkpoint_dir,
        "checkpoint_every": checkpoint_every,
        "resume": resume,
        "job_overrides": dict(job_overrides or {}),
        "timeouts": timeouts or Timeouts(),
        "torch_threads": torch_threads,
    }
    spec = _spec(job, nodes, settings)
    rdd = spark.sparkContext.parallelize(range(nodes), nodes)
    return _collect(spark, rdd, spec, slots_timeout)


def fit(
    df: Any,
    task: str,
    *,
    num_nodes: int | None = None,
    features: str | Sequence[str] = "features",
    label: str = "label",
    repartition: bool = False,
    epochs: int | None = None,
    global_batch: int | None = None,
    group_size: int | str | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    timeouts: Timeouts | None = None,
    torch_threads: int | None = None,
    slots_timeout: float = 30.0,
) -> SparkResult:
    """Train `task` (a reference to a `TorchTask`, whose `dataset` is replaced) on the rows of
    `df`: `num_nodes` barrier tasks (default: df's partition count), each on its own partition.

    The global batch is split across the tasks as the job plans it; each task draws its
    share from its own rows (p2pdl.spark.data). A DataFrame with another partition count is
    repartitioned to `num_nodes` (a shuffle), and so is one whose plan Spark cannot run in a
    barrier stage (a union, a coalesce); `repartition=True` always does so, which also evens
    out uneven partitions. An empty partition is refused with a clear error.
    """
    partitions = df.rdd.getNumPartitions()
    nodes = _check_args(task, partitions if num_nodes is None else num_nodes)
    columns = Columns(features if isinstance(features, str) else tuple(features), label)
    missing = [c for c in columns.names if c not in df.columns]
    if missing:
        raise ConfigError(f"the DataFrame has no column(s) {missing}; it has {df.columns}")
    overrides: dict[str, Any] = {}
    if epochs is not None:
        overrides["epochs"] = epochs
    if global_batch is not None:
        overrides["global_batch"] = global_batch
    settings = {
        "columns": columns,
        "group_size": group_size,
        "checkpoint_dir": checkpoint_dir,
        "checkpoint_every": checkpoint_every,
        "resume": resume,
        "job_overrides": overrides,
        "timeouts": timeouts or Timeouts(),
        "torch_threads": torch_threads,
    }
    spec = _spec(task, nodes, settings)
    selected = df.select(*columns.names)
    shuffled = repartition or partitions != nodes
    if shuffled:
        selected = selected.repartition(nodes)
    try:
        return _collect(df.sparkSession, selected.rdd, spec, slots_timeout)
    except _ChainRefused as exc:
        if shuffled:
            raise JobError(f"the Spark barrier stage failed: {exc}") from None
    # A union/coalesce in df's plan cannot run inside a barrier stage: a shuffle ends it.
    log.warning(
        "p2pdl.spark.fit: Spark refuses df's RDD chain in a barrier stage (a union or "
        "coalesce in its plan); repartitioning it to %d partitions",
        nodes,
    )
    return _collect(df.sparkSession, selected.repartition(nodes).rdd, spec, slots_timeout)

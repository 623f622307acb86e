"""p2pdl.spark on real Spark in local mode (`local[2]`): one shared session for the module.

A job and a DataFrame trained inside one barrier stage, the bad inputs refused on the driver,
the secret kept out of Spark's conf, environment and event log, and a crashed executor Python
worker: the stage retried and training resumed from the checkpoint. local-cluster (separate
executor JVMs) is in test_spark_cluster.py.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pyspark", reason="pyspark is not installed (the [spark] extra)")
if shutil.which("java") is None:
    pytest.skip("Spark needs Java: no `java` on PATH", allow_module_level=True)

from pyspark.sql import functions as F

import p2pdl.spark
from p2pdl.errors import ConfigError
from p2pdl.launch.procs import stop_processes
from p2pdl.schedule.errors import JobError
from p2pdl.spark import driver
from tests.spark_tasks import REPO, STEPS_PER_EPOCH, Sessions, digits_accuracy, digits_rows

pytestmark = pytest.mark.slow

MASTER = "local[2]"


@pytest.fixture(scope="module")
def conf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The module session's settings: an event log (what Spark's UI shows) to look into."""
    events = tmp_path_factory.mktemp("spark-events")
    return {
        "spark.eventLog.enabled": "true",
        "spark.eventLog.dir": events.as_uri(),
        "spark.eventLog.compress": "false",
    }


@pytest.fixture
def spark(sessions: Sessions, conf: dict[str, str]) -> Any:
    return sessions.get(MASTER, **conf)


def _frame(spark: Any, second: int | None = None) -> Any:
    """The digits rows as a two-partition DataFrame (673 and 674 rows); with `second`, the
    second partition keeps only its first `second` rows. Built in the JVM: no Python worker
    runs before the barrier stage."""
    df = spark.createDataFrame(digits_rows(), "features array<float>, label long")
    assert df.rdd.getNumPartitions() == 2
    if second is None:
        return df
    first = F.spark_partition_id() == 0
    return df.where(first | (F.monotonically_increasing_id() < (1 << 33) + second))


def test_run_trains_a_job_and_returns_its_state(spark: Any) -> None:
    result = p2pdl.spark.run(spark, "tests.spark_tasks:digits", num_nodes=2)
    summary = result.summary
    assert summary["world_size"] == 2
    assert summary["steps"] == 2 * STEPS_PER_EPOCH
    assert summary["weights_identical"] is True
    assert summary["accounting"]["exact"] is True
    assert len(summary["loss_by_epoch"]) == 2
    assert summary["loss_by_epoch"][1] < summary["loss_by_epoch"][0]
    # The flat weights, the state_dict and the leader's own evaluation agree.
    assert result.state_dict is not None
    flat = np.concatenate([t.numpy().ravel() for t in result.state_dict.values()])
    np.testing.assert_array_equal(flat, result.weights)
    accuracy = digits_accuracy(result.state_dict)
    assert accuracy == pytest.approx(result.metrics["accuracy"])
    assert accuracy > 0.8
    assert result.wall_s > 0


def test_run_trains_the_same_model_as_launch_job(spark: Any) -> None:
    """Inside Spark or as `python -m p2pdl launch --job`: the same job, bit for bit."""
    result = p2pdl.spark.run(spark, "tests.spark_tasks:digits", num_nodes=2)
    command = [sys.executable, "-m", "p2pdl", "launch", "-n", "2", "--job"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    launch = subprocess.Popen(
        [*command, "tests.spark_tasks:digits"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = launch.communicate(timeout=120)
    finally:
        stop_processes([launch], grace=5.0)  # the launcher and its nodes, by process group
    assert launch.returncode == 0
    summaries = [
        json.loads(line[line.index("{") :])
        for line in out.splitlines()
        if '"event": "done"' in line and '"steps"' in line
    ]
    assert len(summaries) == 1
    assert summaries[0]["steps"] == result.summary["steps"]
    assert summaries[0]["weights_sha256"] == result.summary["weights_sha256"]


def test_the_bench_baseline_draws_the_rows_fit_draws() -> None:
    """`bench spark` compares like with like: its per-iteration Spark jobs give each partition
    the rows p2pdl.spark.data gives that partition's node at the same step."""
    from types import SimpleNamespace

    from p2pdl.bench.spark import BATCH, SEED, local_rows
    from p2pdl.schedule.job import Job
    from p2pdl.spark.data import PartitionData, PartitionTask

    sizes = (673, 200)
    job = Job.from_mapping(
        {
            "task": "m:t",
            "dataset_size": sum(sizes),
            "global_batch": BATCH,
            "lr": 0.1,
            "seed": SEED,
            "max_nodes": 2,
        }
    )
    for rank, n in enumerate(sizes):
        data = PartitionData(np.zeros((n, 1), np.float32), np.zeros(n, np.int64))
        task = PartitionTask(SimpleNamespace(dataset=None, spec={}), data)
        for step in (0, 1, job.steps_per_epoch - 1, job.steps_per_epoch, 3 * job.steps_per_epoch):
            ctx = SimpleNamespace(job=job, step=step, world_size=2)
            count = BATCH // 2
            mine = local_rows(SEED, step, job.steps_per_epoch, rank, 2, n)
            np.testing.assert_array_equal(mine, task.local_rows(ctx, np.arange(count)))


def test_fit_trains_on_uneven_partitions(spark: Any) -> None:
    df = _frame(spark, second=200)
    result = p2pdl.spark.fit(df, "tests.spark_tasks:frame", features="features", label="label")
    summary = result.summary
    assert summary["world_size"] == 2
    steps = 3 * ((673 + 200) // 64)  # the job's data set: every row of df
    assert summary["steps"] == steps
    assert summary["samples"] == steps * 64
    assert summary["weights_identical"] is True
    assert digits_accuracy(result.state_dict) > 0.85


def test_fit_repartitions_what_a_barrier_stage_cannot_run(spark: Any) -> None:
    rows = digits_rows()
    schema = "features array<float>, label long"
    df = spark.createDataFrame(rows[:700], schema).union(spark.createDataFrame(rows[700:], schema))
    assert df.rdd.getNumPartitions() == 4
    result = p2pdl.spark.fit(df, "tests.spark_tasks:frame", num_nodes=2, epochs=1)
    assert result.summary["steps"] == STEPS_PER_EPOCH
    df = _frame(spark).coalesce(1)
    result = p2pdl.spark.fit(df, "tests.spark_tasks:frame", num_nodes=1, epochs=1)
    assert result.summary["world_size"] == 1


def test_fit_refuses_an_empty_partition(spark: Any) -> None:
    df = _frame(spark, second=0)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"task 1: its partition is empty.*repartition=True"):
        p2pdl.spark.fit(df, "tests.spark_tasks:frame")
    assert time.monotonic() - start < 30


def test_fit_refuses_missing_columns_on_the_driver(spark: Any) -> None:
    df = _frame(spark)
    with pytest.raises(ConfigError, match=r"no column\(s\) \['pixels'\]"):
        p2pdl.spark.fit(df, "tests.spark_tasks:frame", features="pixels")
    with pytest.raises(ConfigError, match="both a feature and the label"):
        p2pdl.spark.fit(df, "tests.spark_tasks:frame", features="label")


def test_more_nodes_than_slots_fails_fast(spark: Any) -> None:
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"num_nodes=3 needs 3 task slots.*local\[2\] has 2"):
        p2pdl.spark.run(spark, "tests.spark_tasks:digits", num_nodes=3)
    assert time.monotonic() - start < 5
    assert p2pdl.spark.cluster_slots(spark) == 2


def test_bad_arguments_are_refused_on_the_driver(spark: Any) -> None:
    with pytest.raises(ConfigError, match="task reference"):
        p2pdl.spark.run(spark, "not a reference", num_nodes=2)
    with pytest.raises(ConfigError, match="num_nodes must be a positive integer"):
        p2pdl.spark.run(spark, "tests.spark_tasks:digits", num_nodes=0)
    with pytest.raises(ConfigError, match=r"p2pdl\.spark: .*unexpected keyword"):
        driver._spec("tests.spark_tasks:digits", 2, {"no_such_setting": 1})


def test_a_job_that_cannot_be_imported_is_a_clear_error(spark: Any) -> None:
    start = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        p2pdl.spark.run(spark, "tests.spark_no_such_module:task", num_nodes=2)
    message = str(caught.value)
    for index in (0, 1):  # every task's own answer, on the first attempt
        assert f"task {index}: ConfigError: cannot import the job's module" in message
    assert "tests.spark_no_such_module" in message
    assert time.monotonic() - start < 30


def test_a_failing_task_setup_is_not_retried(spark: Any) -> None:
    with pytest.raises(ConfigError, match=r"task 0: ConfigError: .*malformed job spec"):
        p2pdl.spark.run(
            spark, "tests.spark_tasks:digits", num_nodes=2, job_overrides={"global_batch": 0}
        )


def _forms(secret: bytes) -> list[bytes]:
    """The ways a 32-byte secret could be written down."""
    return [
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        base64.b64encode(secret),
        base64.urlsafe_b64encode(secret),
        base64.b64encode(secret).rstrip(b"="),
    ]


def _environments(spark: Any) -> list[dict[str, str]]:
    def environ(_rows: Any) -> Iterator[dict[str, str]]:
        import os

        yield dict(os.environ)

    return spark.sparkContext.parallelize(range(2), 2).mapPartitions(environ).collect()


def test_the_secret_stays_out_of_spark_conf_env_and_event_log(
    spark: Any, conf: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = b"p2pdl-test-secret-" + bytes(range(14))
    monkeypatch.setattr(driver, "_new_secret", lambda: secret)
    result = p2pdl.spark.run(
        spark, "tests.spark_tasks:digits", num_nodes=2, job_overrides={"epochs": 1}
    )
    assert result.summary["steps"] == STEPS_PER_EPOCH
    sc = spark.sparkContext
    seen: list[str] = [repr(driver._spec("tests.spark_tasks:digits", 2, {}))]
    seen += [f"{k}={v}" for k, v in sc.getConf().getAll()]
    seen.append(str(sc._jsc.sc().getConf().toDebugString()))
    seen.append(str(sc._jvm.java.lang.System.getProperties().toString()))
    seen.append(str(sc._jvm.java.lang.System.getenv().toString()))
    seen += [f"{k}={v}" for env in _environments(spark) for k, v in env.items()]
    # The event log is what Spark's UI and history server show: environment, properties,
    # job/stage/task descriptions. Wait until the listener bus has written every event.
    assert sc._jsc.sc().listenerBus().waitUntilEmpty(30_000) is None
    folder = Path(conf["spark.eventLog.dir"].removeprefix("file://"))
    events = b"".join(path.read_bytes() for path in folder.rglob("*") if path.is_file())
    assert b"SparkListenerEnvironmentUpdate" in events
    assert b"SparkListenerJobStart" in events
    blob = "\n".join(seen).encode() + events
    for form in _forms(secret):
        assert form not in blob
    assert "secret" not in repr(driver._spec("tests.spark_tasks:digits", 2, {}))


def test_a_crashed_worker_fails_the_stage_and_the_retry_resumes(spark: Any, tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    flag = tmp_path / "died"
    die_at = 2 * STEPS_PER_EPOCH - 2  # a checkpoint every 5 steps: the last one is at 40
    result = p2pdl.spark.run(
        spark,
        "tests.spark_tasks:dying",
        num_nodes=2,
        group_size=5,
        checkpoint_dir=str(checkpoints),
        job_overrides={"params": {"die_at_step": die_at, "die_node": 1, "die_flag": str(flag)}},
    )
    assert flag.is_file(), "node 1's Python worker did not crash"
    summary = result.summary
    assert summary["steps"] == 3 * STEPS_PER_EPOCH
    # The retried stage started from a checkpoint, not from step 0: the one of step 40, or of
    # step 35 when the crash at step 40 came before the leader had written step 40's.
    resumed_at = 3 * STEPS_PER_EPOCH - summary["steps_this_run"]
    assert resumed_at in (35, 40), summary
    assert summary["weights_identical"] is True
    assert (checkpoints / "checkpoint.npz").is_file()
    assert digits_accuracy(result.state_dict) > 0.85


def test_a_crash_with_no_retries_left_is_a_clear_error(sessions: Sessions, tmp_path: Path) -> None:
    spark = sessions.get(MASTER, **{"spark.stage.maxConsecutiveAttempts": "1"})
    with pytest.raises(JobError, match="Python worker exited unexpectedly"):
        p2pdl.spark.run(
            spark,
            "tests.spark_tasks:dying",
            num_nodes=2,
            job_overrides={
                "params": {"die_at_step": 3, "die_node": 1, "die_flag": str(tmp_path / "died")}
            },
        )


def test_a_step_that_raises_fails_the_stage_instead_of_hanging(
    sessions: Sessions, tmp_path: Path
) -> None:
    spark = sessions.get(MASTER, **{"spark.stage.maxConsecutiveAttempts": "1"})
    unwritable = tmp_path / "missing" / "died"  # the task cannot write its flag: it raises
    start = time.monotonic()
    with pytest.raises(JobError, match=r"task's step raised FileNotFoundError"):
        p2pdl.spark.run(
            spark,
            "tests.spark_tasks:dying",
            num_nodes=2,
            job_overrides={
                "params": {"die_at_step": 3, "die_node": 1, "die_flag": str(unwritable)}
            },
        )
    assert time.monotonic() - start < 60


def test_dynamic_allocation_is_refused(sessions: Sessions) -> None:
    spark = sessions.get(MASTER, **{"spark.dynamicAllocation.enabled": "true"})
    with pytest.raises(ConfigError, match=r"spark\.dynamicAllocation\.enabled=false"):
        p2pdl.spark.run(spark, "tests.spark_tasks:digits", num_nodes=2)


def test_an_executor_python_without_p2pdls_dependencies_is_a_clear_error(
    sessions: Sessions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Executors whose Python has nothing installed (a bare virtual environment): Spark
    ships pyspark itself (pyspark.zip on the workers' path), so the task fails on p2pdl's
    own imports; the driver names the missing module and nothing hangs."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    monkeypatch.setenv("PYSPARK_PYTHON", str(bare / "bin" / "python"))
    spark = sessions.get(
        MASTER, **{"spark.python.daemon.module": "pyspark.daemon", "spark.app.name": "bare"}
    )
    start = time.monotonic()
    with pytest.raises(JobError, match=r"No module named '(numpy|msgpack|uvloop|torch)'") as e:
        p2pdl.spark.run(spark, "tests.spark_tasks:digits", num_nodes=2)
    assert "the executors' Python lacks a module p2pdl needs" in str(e.value)
    assert time.monotonic() - start < 120

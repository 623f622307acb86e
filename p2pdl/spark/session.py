"""A Spark session for p2pdl jobs started from this Python: examples, benchmarks, tests.

Executors run this interpreter unless `PYSPARK_PYTHON` names another (PySpark's driver takes
its workers' Python from that variable, default `python3` on each machine's PATH, whatever
`spark.pyspark.python` says), and find the job's module on the
`PYTHONPATH` given to them: the nodes compare the task module's source file, located on
`sys.path` without importing it, so an editable install's import hook is not enough there.
`local-cluster[...]` masters start their executor JVMs from `$SPARK_HOME`, set here to the
installed pyspark package unless it is set already.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["session", "source_root", "stop"]


def source_root() -> str:
    """The folder holding the `p2pdl` package (a checkout's root for an editable install)."""
    import p2pdl

    return str(Path(p2pdl.__file__).resolve().parents[1])


def session(
    master: str,
    app_name: str,
    *,
    pythonpath: str | None = None,
    conf: Mapping[str, str] | None = None,
) -> Any:
    """A Spark session on `master` (UI and progress bars off, logs at ERROR) whose
    executors use this interpreter (or `$PYSPARK_PYTHON`), with `pythonpath` (default:
    `source_root()`) on their path and `conf` on top."""
    import pyspark
    from pyspark.sql import SparkSession

    os.environ.setdefault("SPARK_HOME", os.path.dirname(pyspark.__file__))
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.pyspark.python", sys.executable)
        .config("spark.executorEnv.PYTHONPATH", pythonpath or source_root())
    )
    for name, value in (conf or {}).items():
        builder = builder.config(name, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def stop(spark: Any) -> None:
    """Stop `spark` and remove local-cluster's work folder of its application (the
    executors' logs), and `$SPARK_HOME/work` itself once no other application uses it."""
    home = os.environ.get("SPARK_HOME")
    app = spark.sparkContext.applicationId
    spark.stop()
    if home:
        work = Path(home) / "work"
        shutil.rmtree(work / app, ignore_errors=True)
        with contextlib.suppress(OSError):
            work.rmdir()  # only if no other application's folder is left in it

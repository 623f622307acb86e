"""Tasks and helpers for the Spark tests (tests/test_spark*.py).

The tasks are imported on the executors by reference (`tests.spark_tasks:...`): the tests put
the repository's root on the executors' PYTHONPATH. `Sessions` keeps one Spark session per
test module (Spark's start costs 10-15 s here) and removes what local-cluster leaves under
`$SPARK_HOME/work` for its applications. Run as a module (`spark.python.daemon.module`), this
file is the executors' Python worker daemon with torch, p2pdl and the tasks imported before it
forks its workers: a new worker (every crash test makes some) then starts in milliseconds
instead of importing torch again for seconds on this 2-core machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from examples.train_digits import SEED, X_TRAIN, Y_TRAIN, accuracy, make_model
from p2pdl.spark.session import session, stop
from p2pdl.torch import TorchTask

REPO = Path(__file__).resolve().parent.parent


STEPS_PER_EPOCH = 21
"""Steps of one epoch of the digits tasks: 1347 training rows, global batch 64."""


def digits_accuracy(state_dict: dict[str, Any] | None) -> float:
    """The digits test accuracy of a trained state (the driver's `SparkResult.state_dict`)."""
    assert state_dict is not None
    model = make_model()
    model.load_state_dict(state_dict)
    return accuracy(model)["accuracy"]


def digits_rows() -> list[tuple[list[float], int]]:
    """The digits training set as DataFrame rows (`features array<float>, label long`)."""
    return [(x.tolist(), int(y)) for x, y in zip(X_TRAIN.numpy(), Y_TRAIN.numpy(), strict=True)]


def _task(dataset: Any, epochs: int, cls: type[TorchTask] = TorchTask) -> TorchTask:
    return cls(
        model_fn=make_model,
        loss_fn=torch.nn.functional.cross_entropy,
        dataset=dataset,
        optimizer={"kind": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
        partitions=1,
        seed=SEED,
        eval_fn=accuracy,
        global_batch=64,
        epochs=epochs,
    )


class DyingTask(TorchTask):
    """The digits task whose node `ctx.params["die_node"]` dies (os._exit, the way a crashed
    executor's Python worker does) at step `ctx.params["die_at_step"]`, once: the file
    `ctx.params["die_flag"]` records that it did (Spark's task attempt number starts at 0
    again on a retried stage, so it cannot tell)."""

    def step(self, ctx: Any, samples: Any, lr: float) -> dict[str, Any]:
        params = ctx.params
        if ctx.step == params.get("die_at_step") and ctx.node_id == params.get("die_node"):
            flag = Path(params["die_flag"])
            if not flag.exists():
                flag.write_text(f"{os.getpid()}\n")
                os._exit(17)
        return super().step(ctx, samples, lr)


digits = _task((X_TRAIN, Y_TRAIN), epochs=2)
"""The digits MLP on its own data (each node loads it): for `p2pdl.spark.run`."""

frame = _task(None, epochs=3)
"""The digits MLP with no data set: `p2pdl.spark.fit` gives it the DataFrame's rows."""

dying = _task((X_TRAIN, Y_TRAIN), epochs=3, cls=DyingTask)
"""`digits` whose node `die_node` crashes on the stage's first attempt (see DyingTask)."""


class Sessions:
    """One Spark session at a time, made on demand and stopped by `close()`."""

    def __init__(self) -> None:
        self.spark: Any = None
        self.key: tuple[str, tuple[tuple[str, str], ...]] | None = None

    def get(self, master: str, **conf: str) -> Any:
        """A session on `master` with `conf` (stopping the current one if it differs)."""
        key = (master, tuple(sorted(conf.items())))
        if self.spark is not None and key == self.key:
            return self.spark
        self.close()
        settings = {
            "spark.python.daemon.module": "tests.spark_tasks",
            "spark.sql.shuffle.partitions": "2",
            **conf,
        }
        self.spark = session(master, "p2pdl-tests", pythonpath=str(REPO), conf=settings)
        self.key = key
        return self.spark

    def close(self) -> None:
        """Stop the session and remove local-cluster's work folder of its application."""
        if self.spark is not None:
            stop(self.spark)
            self.spark = None
            self.key = None


if __name__ == "__main__":  # the workers' daemon (see the module docstring)
    from pyspark.daemon import manager

    import p2pdl.schedule.runtime
    import p2pdl.spark.stage  # noqa: F401

    manager()

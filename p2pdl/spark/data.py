"""A barrier task's own DataFrame rows as a task's data set, and the task that trains on them.

Each barrier task holds only the rows of its own partition; nothing is collected to the driver
and no row moves between executors. The job's planner still splits every global batch across
the nodes (`split_batch`), so a node knows *how many* samples it trains on at each step; which
of its rows they are is decided here, from a per-data-epoch permutation of the node's own rows:
rank r's samples of step i of a data epoch are positions [i*s, i*s + count) of that
permutation, s being the largest per-rank share of a global batch (wrapping around a partition
smaller than its share of the epoch). Every position is a pure function of (seed, data epoch,
step, row count), so a restarted stage trains on the same rows again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from p2pdl.errors import ConfigError
from p2pdl.schedule.plan import epoch_permutation
from p2pdl.schedule.task import task_spec

__all__ = ["Columns", "PartitionData", "PartitionTask"]


@dataclass(frozen=True, slots=True)
class Columns:
    """Which DataFrame columns hold the inputs and the target.

    `features` is one array/vector column (a list of floats or a `pyspark.ml` vector per row)
    or several numeric columns; `label` one numeric column (integers become int64 class
    indices, anything else float32).
    """

    features: str | tuple[str, ...] = "features"
    label: str = "label"

    def __post_init__(self) -> None:
        names = (self.features,) if isinstance(self.features, str) else self.features
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"features must name one or more columns, got {self.features!r}")
        if not isinstance(self.label, str) or not self.label:
            raise ConfigError(f"label must name a column, got {self.label!r}")
        if self.label in names:
            raise ConfigError(f"column {self.label!r} is both a feature and the label")

    @property
    def names(self) -> tuple[str, ...]:
        """Every column read, features first."""
        features = (self.features,) if isinstance(self.features, str) else self.features
        return (*features, self.label)


def _feature_vector(value: Any, column: str) -> np.ndarray:
    """One row's feature array: a list/tuple of numbers or a pyspark.ml vector."""
    to_array = getattr(value, "toArray", None)
    array = np.asarray(to_array() if to_array is not None else value, dtype=np.float32)
    if array.ndim != 1:
        raise ConfigError(f"column {column!r} must hold flat arrays or vectors of numbers")
    return array


@dataclass(frozen=True, slots=True)
class PartitionData:
    """The rows of one barrier task's partition(s): inputs [n, d] float32, targets [n]."""

    inputs: np.ndarray
    targets: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.inputs.shape[0])

    @classmethod
    def from_rows(cls, rows: Iterable[Any], columns: Columns) -> PartitionData:
        """Read Spark `Row`s (the partition iterator) into arrays; ConfigError on bad values."""
        features: list[np.ndarray] = []
        labels: list[Any] = []
        width: int | None = None
        for n, row in enumerate(rows):
            try:
                if isinstance(columns.features, str):
                    vector = _feature_vector(row[columns.features], columns.features)
                else:
                    vector = np.asarray([row[c] for c in columns.features], dtype=np.float32)
                label = row[columns.label]
            except (KeyError, ValueError, TypeError) as exc:
                raise ConfigError(f"row {n} of this partition: {exc}") from None
            if width is None:
                width = vector.size
            elif vector.size != width:
                raise ConfigError(
                    f"row {n} of this partition has {vector.size} features, row 0 has {width}"
                )
            if label is None or isinstance(label, (bool, str)):
                raise ConfigError(f"row {n}: label {label!r} is not a number")
            features.append(vector)
            labels.append(label)
        if not features:
            return cls(np.empty((0, 0), np.float32), np.empty(0, np.int64))
        integral = all(isinstance(v, (int, np.integer)) for v in labels)
        targets = np.asarray(labels, dtype=np.int64 if integral else np.float32)
        inputs = np.stack(features)
        if not np.all(np.isfinite(inputs)) or not np.all(np.isfinite(targets)):
            raise ConfigError("this partition holds NaN or infinite values")
        return cls(inputs, targets)

    def tensors(self) -> tuple[Any, Any]:
        """(inputs, targets) as torch tensors sharing the arrays' memory."""
        import torch

        return torch.from_numpy(self.inputs), torch.from_numpy(self.targets)


class PartitionTask:
    """A task (a `TorchTask`, or any task with an indexable `dataset`) trained on one
    partition's rows: the job's samples of each step become rows of this partition (see the
    module docstring). The runtime's `adapt_task` hook wraps the resolved task with it."""

    def __init__(self, inner: Any, data: PartitionData) -> None:
        if not hasattr(inner, "dataset"):
            raise ConfigError(
                f"{type(inner).__name__} has no `dataset` attribute: p2pdl.spark.fit trains "
                "tasks that read their data set from `dataset` (a TorchTask does)"
            )
        inner.dataset = data.tensors()
        self.inner = inner
        self.data = data
        self.spec: Mapping[str, Any] = task_spec(inner, type(inner).__name__)
        self.inline = bool(getattr(inner, "inline", False))
        self._perm: tuple[int, np.ndarray] | None = None

    def setup(self, ctx: Any) -> None:
        self.inner.setup(ctx)

    def local_rows(self, ctx: Any, samples: Sequence[int]) -> np.ndarray:
        """This partition's rows for the job's `samples` of step `ctx.step` (same count)."""
        count = len(samples)
        if count == 0:
            return np.empty(0, np.int64)
        n = self.data.rows
        if n == 0:
            raise ConfigError("this barrier task's partition is empty but was given samples")
        job = ctx.job
        epoch, i = divmod(ctx.step, job.steps_per_epoch)
        share = -(-job.global_batch // max(1, ctx.world_size))
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(job.seed, epoch, n))
        positions = (i * share + np.arange(count, dtype=np.int64)) % n
        return self._perm[1][positions]

    def step(self, ctx: Any, samples: Any, lr: float) -> Mapping[str, Any]:
        return self.inner.step(ctx, self.local_rows(ctx, samples), lr)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()

"""What users implement: a training task, and the context the runtime hands it.

A task is resolved on every node from a `"package.module:attr"` reference — never shipped as
code or pickle. `attr` is either the task object itself or a zero-argument factory (a class
or function) that returns it. A task provides:

``spec``
    A mapping of `Job` fields (everything but ``task``): ``dataset_size``, ``global_batch``,
    ``lr`` (a number or an `LRSchedule` mapping), optionally ``epochs``, ``seed``,
    ``max_nodes``, ``min_nodes``, ``group_size``, ``drop_last``, ``params``. Only the
    leader reads it; workers receive the validated job from the leader.
``setup(ctx)``
    Loads the data and builds the model: it must call ``ctx.init_model(weights, optimizer)``
    exactly once with a flat float32 initial weight vector and an optimizer config (see
    `OptimizerConfig`). Afterwards ``ctx.weights`` is the runtime-owned flat weight buffer
    (the runtime updates it in place after every step; keep views of it, never copies) and
    ``ctx.grads`` the gradient buffer(s), one per local replica (``ctx.grad`` is the first).
``step(ctx, samples, lr) -> {"loss": float, "count": int}``
    One forward/backward pass over the dataset indices ``samples`` (a read-only int64
    array, possibly empty on a partial last batch): it must **overwrite** every gradient
    buffer with the **sum** (not the mean) of the per-sample gradients, and return the
    summed loss and the number of samples. The runtime then runs the two-phase AllReduce,
    divides the summed gradient by the step's global batch, and applies the optimizer
    (``lr`` is informational: the runtime's optimizer uses it).

Optional:

``prepare(ctx, samples) -> object``
    Runs in a background prefetch thread for upcoming steps (the worker already knows
    them); its result is ``ctx.batch`` during the matching ``step``.
``inline``
    True to run ``step`` on the event loop thread (tiny numpy tasks: a thread hop costs more
    than the step); by default steps run in a worker thread so the loop keeps the sockets busy.

A torch task keeps its parameters as views of ``ctx.weights`` and its ``.grad`` tensors as
views of ``ctx.grad`` (``torch.from_numpy``), which is why the runtime owns both buffers.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from p2pdl.collectives.sharded import OptimizerConfig
from p2pdl.errors import ConfigError
from p2pdl.schedule.job import Job

__all__ = [
    "Task",
    "TaskContext",
    "resolve_task",
    "task_digest",
]

log = logging.getLogger("p2pdl.schedule.task")


@runtime_checkable
class Task(Protocol):
    """The interface a training task implements (see the module docstring)."""

    spec: Mapping[str, Any]

    def setup(self, ctx: TaskContext) -> None: ...

    def step(self, ctx: TaskContext, samples: np.ndarray, lr: float) -> Mapping[str, Any]: ...


class TaskContext:
    """What a task sees: the job, its parameters, this node's rank, and the model buffers.

    `rank`, `world_size` and `step` change as the runtime moves on (new membership epochs,
    each step); read them when needed rather than caching them in `setup`.
    """

    def __init__(self, job: Job, *, node_id: int = 0) -> None:
        self.job = job
        self.params: dict[str, Any] = dict(job.params)
        self.node_id = node_id
        self.rank = 0
        self.world_size = 1
        self.step = 0
        """Global step being computed (valid inside `step` and `prepare`)."""
        self.batch: Any = None
        """What `prepare` returned for the current step (None without `prepare`)."""
        self.log = logging.getLogger("p2pdl.task")
        self.weights: np.ndarray = np.empty(0, np.float32)
        self.grads: list[np.ndarray] = []
        self.optimizer: OptimizerConfig | None = None
        self.initial_weights: np.ndarray | None = None
        self._allocate: Any = None

    @property
    def grad(self) -> np.ndarray:
        """The first (often the only) gradient buffer."""
        if not self.grads:
            raise RuntimeError("call ctx.init_model(...) in setup() first")
        return self.grads[0]

    def init_model(
        self,
        weights: np.ndarray,
        optimizer: OptimizerConfig | Mapping[str, Any] | None = None,
        *,
        replicas: int = 1,
    ) -> np.ndarray:
        """Register the model: initial flat weights, optimizer, local replica count.

        Returns `ctx.weights`, the runtime-owned buffer holding a copy of `weights`. The
        initial values only matter on the leader: every node starts from rank 0's weights.
        """
        if self.optimizer is not None:
            raise ConfigError("ctx.init_model may be called only once")
        array = np.asarray(weights)
        if array.ndim != 1 or array.size == 0:
            raise ConfigError(f"initial weights must be a non-empty flat array, got {array.shape}")
        if array.dtype != np.float32:
            raise ConfigError(f"initial weights must be float32, got {array.dtype}")
        if not np.all(np.isfinite(array)):
            raise ConfigError("initial weights contain NaN or infinity")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
            raise ConfigError(f"replicas must be a positive integer, got {replicas!r}")
        config = OptimizerConfig.from_mapping(optimizer if optimizer is not None else {})
        self.optimizer = config
        self.initial_weights = array.copy()
        assert self._allocate is not None, "the runtime installs the allocator"
        self._allocate(self, array, config, replicas)
        return self.weights


def resolve_task(reference: str) -> Any:
    """Import `module:attr` locally and return the task object (calling a factory)."""
    module_name, sep, attr = reference.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"task reference must look like 'package.module:attr', got {reference!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import the task module {module_name!r}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"task module {module_name!r} has no attribute {attr!r}") from None
    if isinstance(obj, type) or (
        callable(obj) and not (hasattr(obj, "setup") and hasattr(obj, "step"))
    ):
        try:
            obj = obj()
        except Exception as exc:
            raise ConfigError(f"task factory {reference!r} failed: {exc!r}") from None
    for name in ("setup", "step"):
        if not callable(getattr(obj, name, None)):
            raise ConfigError(f"task {reference!r} has no {name}() method")
    return obj


def locate_source(module_name: str) -> Path:
    """The source file of `module_name`, found without importing it or its packages (a
    worker checks a task's digest before any of the task's code runs)."""
    parts = module_name.split(".")
    if not all(part.isidentifier() for part in parts):
        raise ConfigError(f"{module_name!r} is not a module name")
    path: list[str] | None = None
    spec = None
    for i, _part in enumerate(parts):
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: i + 1]), path)
        if spec is None:
            raise ConfigError(f"cannot find the task module {module_name!r}")
        if i < len(parts) - 1:
            if spec.submodule_search_locations is None:
                raise ConfigError(f"{'.'.join(parts[: i + 1])!r} is not a package")
            path = list(spec.submodule_search_locations)
    assert spec is not None
    if not spec.origin or not spec.has_location or not spec.origin.endswith(".py"):
        raise ConfigError(f"task module {module_name!r} has no Python source file")
    return Path(spec.origin)


def task_digest(reference: str) -> str:
    """sha256 (hex) of the source of the task's module, read without importing it."""
    module_name = reference.partition(":")[0]
    try:
        return hashlib.sha256(locate_source(module_name).read_bytes()).hexdigest()
    except OSError as exc:
        raise ConfigError(f"cannot read the source of task module {module_name!r}: {exc}") from None


def task_spec(task: Any, reference: str) -> Mapping[str, Any]:
    """The task's job spec mapping (attribute `spec`, or a zero-argument method)."""
    spec = getattr(task, "spec", None)
    if callable(spec):
        spec = spec()
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"task {reference!r} has no job spec: give it a `spec` mapping with at least "
            "dataset_size, global_batch and lr"
        )
    return spec

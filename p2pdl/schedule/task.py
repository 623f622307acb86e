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
import inspect
import logging
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from p2pdl import kernels
from p2pdl.errors import ConfigError
from p2pdl.schedule.job import Job

__all__ = [
    "OptimizerConfig",
    "Task",
    "TaskContext",
    "resolve_task",
    "task_digest",
]

log = logging.getLogger("p2pdl.schedule.task")

OptimizerKind = Literal["sgd", "adam", "adamw"]


@runtime_checkable
class Task(Protocol):
    """The interface a training task implements (see the module docstring)."""

    spec: Mapping[str, Any]

    def setup(self, ctx: TaskContext) -> None: ...

    def step(self, ctx: TaskContext, samples: np.ndarray, lr: float) -> Mapping[str, Any]: ...


def _num(value: object, name: str, lo: float, hi: float, *, hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"optimizer field {name!r}: expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < lo or number > hi or (hi_open and number >= hi):
        raise ConfigError(f"optimizer field {name!r}: {number} is outside [{lo}, {hi}]")
    return number


@dataclass(frozen=True, slots=True, kw_only=True)
class OptimizerConfig:
    """The sharded optimizer: torch.optim.SGD or Adam/AdamW semantics (p2pdl.kernels).

    The learning rate comes from the job's schedule, step by step.
    """

    kind: OptimizerKind = "sgd"
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    amsgrad: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("sgd", "adam", "adamw"):
            raise ConfigError(
                f"optimizer field 'kind': must be sgd, adam or adamw, got {self.kind!r}"
            )
        _num(self.momentum, "momentum", 0.0, 1.0, hi_open=True)
        _num(self.dampening, "dampening", 0.0, 1.0)
        _num(self.weight_decay, "weight_decay", 0.0, math.inf)
        _num(self.eps, "eps", 0.0, math.inf)
        if not isinstance(self.nesterov, bool) or not isinstance(self.amsgrad, bool):
            raise ConfigError("optimizer fields 'nesterov' and 'amsgrad' must be booleans")
        if self.nesterov and (self.kind != "sgd" or self.momentum <= 0 or self.dampening != 0):
            raise ConfigError("nesterov needs kind 'sgd', momentum > 0 and dampening == 0")
        betas = tuple(self.betas)
        if len(betas) != 2:
            raise ConfigError(f"optimizer field 'betas': expected two numbers, got {betas!r}")
        for i, beta in enumerate(betas):
            _num(beta, f"betas[{i}]", 0.0, 1.0, hi_open=True)
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))

    @classmethod
    def from_mapping(cls, data: object) -> OptimizerConfig:
        if isinstance(data, OptimizerConfig):
            return data
        if not isinstance(data, Mapping):
            raise ConfigError(f"optimizer: expected a mapping, got {type(data).__name__}")
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"optimizer: unknown field(s) {unknown}; allowed {sorted(allowed)}")
        values = dict(data)
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)

    def to_wire(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "momentum": self.momentum,
            "dampening": self.dampening,
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
            "betas": list(self.betas),
            "eps": self.eps,
            "amsgrad": self.amsgrad,
        }

    @property
    def state_names(self) -> tuple[str, ...]:
        """The per-element state buffers this optimizer keeps (in a fixed order)."""
        if self.kind == "sgd":
            return ("momentum",) if self.momentum != 0 else ()
        names = ("exp_avg", "exp_avg_sq")
        return (*names, "max_exp_avg_sq") if self.amsgrad else names


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


def optimizer_step(
    config: OptimizerConfig,
    weights: np.ndarray,
    grad: np.ndarray,
    *,
    lr: float,
    steps_done: int,
    momentum: np.ndarray | None = None,
    exp_avg: np.ndarray | None = None,
    exp_avg_sq: np.ndarray | None = None,
    max_exp_avg_sq: np.ndarray | None = None,
) -> None:
    """One torch.optim-equivalent step on a weight slice, with the kernels (in place).

    `steps_done` counts the steps this state has taken before (0 on the first one); the state
    buffers are the slices of the optimizer's per-element state that `config` needs.
    """
    if config.kind == "sgd":
        kernels.sgd_step(
            weights,
            grad,
            momentum,
            lr=lr,
            momentum=config.momentum,
            dampening=config.dampening,
            weight_decay=config.weight_decay,
            nesterov=config.nesterov,
            first_step=steps_done == 0,
        )
        return
    assert exp_avg is not None and exp_avg_sq is not None, "Adam keeps two state buffers"
    kernels.adam_step(
        weights,
        grad,
        exp_avg,
        exp_avg_sq,
        step=steps_done + 1,
        lr=lr,
        beta1=config.betas[0],
        beta2=config.betas[1],
        eps=config.eps,
        weight_decay=config.weight_decay,
        decoupled=config.kind == "adamw",
        amsgrad=config.amsgrad,
        vmax=max_exp_avg_sq,
    )


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


def task_digest(reference: str) -> str:
    """sha256 (hex) of the source of the task's module, as this node would run it."""
    module_name = reference.partition(":")[0]
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError) as exc:
        raise ConfigError(f"cannot read the source of task module {module_name!r}: {exc}") from None
    return hashlib.sha256(source.encode()).hexdigest()


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

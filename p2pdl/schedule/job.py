"""Job specs: what to train, on how much data, with which batch, learning rate and cluster size.

A `Job` is a frozen, validated value that travels from the leader to every worker as plain
msgpack types (`to_wire` / `from_wire`), never as pickle or code: the task is only a
"module:attr" reference that each worker imports itself. Every malformed spec raises
`ConfigError` with a message that names the offending field, so that a bad job fails at
submission and not halfway through training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from p2pdl.errors import ConfigError

__all__ = ["LR_KINDS", "Job", "LRSchedule", "check_plain"]

LRKind = Literal["constant", "step", "cosine"]
LR_KINDS: tuple[str, ...] = ("constant", "step", "cosine")

_INT64_MIN = -(2**63)
_UINT64_MAX = 2**64 - 1
_MAX_PARAM_DEPTH = 32


def _is_int(value: object) -> bool:
    """True for real ints; bool is an int subclass but never a size or a count."""
    return isinstance(value, int) and not isinstance(value, bool)


def _int(
    value: object, name: str, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """`value` as an int within bounds, or a ConfigError naming the field."""
    if not _is_int(value):
        raise ConfigError(f"job field {name!r}: expected an integer, got {type(value).__name__}")
    number = cast(int, value)
    if minimum is not None and number < minimum:
        raise ConfigError(f"job field {name!r}: must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ConfigError(f"job field {name!r}: must be <= {maximum}, got {number}")
    return number


def _float(
    value: object, name: str, *, minimum: float | None = None, positive: bool = False
) -> float:
    """`value` (int or float, not bool) as a finite float, or a ConfigError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"job field {name!r}: expected a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"job field {name!r}: must be finite, got {number}")
    if positive and number <= 0.0:
        raise ConfigError(f"job field {name!r}: must be > 0, got {number}")
    if minimum is not None and number < minimum:
        raise ConfigError(f"job field {name!r}: must be >= {minimum}, got {number}")
    return number


def _mapping(value: object, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"job field {name!r}: expected a mapping, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(f"job field {name!r}: keys must be strings, got {key!r}")
    return cast(Mapping[str, Any], value)


def _check_fields(
    data: Mapping[str, Any], where: str, required: frozenset[str], allowed: frozenset[str]
) -> None:
    """Reject unknown and missing fields, naming all of them at once."""
    unknown = sorted(set(data) - allowed)
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise ConfigError(f"{where}: unknown field(s) {names}; allowed: {sorted(allowed)}")
    missing = sorted(required - set(data))
    if missing:
        names = ", ".join(repr(k) for k in missing)
        raise ConfigError(f"{where}: missing required field(s) {names}")


def check_plain(value: object, name: str = "params", _depth: int = 0) -> Any:
    """Return a copy of `value` made of plain msgpack types, or raise ConfigError naming the path.

    Allowed: str, int (64-bit), float (not NaN), bool, None, lists/tuples (copied as lists)
    and dicts with string keys. Anything else (bytes, sets, objects, NaN) is rejected so that
    a job spec survives a msgpack round trip unchanged and compares equal on every node.
    """
    if _depth > _MAX_PARAM_DEPTH:
        raise ConfigError(f"job field {name!r}: nested deeper than {_MAX_PARAM_DEPTH} levels")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _UINT64_MAX:
            raise ConfigError(f"job field {name!r}: integer {value} does not fit in 64 bits")
        return value
    if isinstance(value, float):
        if math.isnan(value):
            raise ConfigError(f"job field {name!r}: NaN is not allowed")
        return value
    if isinstance(value, (list, tuple)):
        return [check_plain(item, f"{name}[{i}]", _depth + 1) for i, item in enumerate(value)]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"job field {name!r}: dict keys must be strings, got {key!r}")
            out[key] = check_plain(item, f"{name}[{key!r}]", _depth + 1)
        return out
    raise ConfigError(
        f"job field {name!r}: {type(value).__name__} is not a plain msgpack type "
        "(str, int, float, bool, None, list, dict)"
    )


def _check_task_ref(value: object) -> str:
    """Validate "package.module:attr.path" without importing anything."""
    if not isinstance(value, str):
        raise ConfigError(f"job field 'task': expected a string, got {type(value).__name__}")
    module, sep, attr = value.partition(":")
    parts_ok = (
        sep == ":"
        and all(p.isidentifier() for p in module.split("."))
        and all(p.isidentifier() for p in attr.split("."))
    )
    if not parts_ok:
        raise ConfigError(
            f"job field 'task': expected a reference 'package.module:attr', got {value!r}"
        )
    return value


@dataclass(frozen=True, slots=True)
class LRSchedule:
    """Learning rate as a pure function of the global step.

    kinds: "constant" (base_lr), "step" (base_lr * gamma ** (t // step_size)) and "cosine"
    (from base_lr down towards min_lr over the job's remaining steps). Any kind may start with
    `warmup_steps` of linear warmup: step s < warmup_steps gets base_lr * (s + 1) / warmup_steps,
    and t = step - warmup_steps counts the steps after it.
    """

    base_lr: float
    kind: LRKind = "constant"
    warmup_steps: int = 0
    gamma: float = 0.1
    step_size: int = 1
    min_lr: float = 0.0

    _FIELDS = frozenset({"base_lr", "kind", "warmup_steps", "gamma", "step_size", "min_lr"})

    def __post_init__(self) -> None:
        _float(self.base_lr, "lr.base_lr", minimum=0.0)
        if self.kind not in LR_KINDS:
            raise ConfigError(
                f"job field 'lr.kind': must be one of {list(LR_KINDS)}, got {self.kind!r}"
            )
        _int(self.warmup_steps, "lr.warmup_steps", minimum=0)
        _float(self.gamma, "lr.gamma", positive=True)
        _int(self.step_size, "lr.step_size", minimum=1)
        min_lr = _float(self.min_lr, "lr.min_lr", minimum=0.0)
        if min_lr > self.base_lr:
            raise ConfigError(
                f"job field 'lr.min_lr': must be <= base_lr ({self.base_lr}), got {min_lr}"
            )
        # Normalise ints given for float fields so equality survives a wire round trip.
        object.__setattr__(self, "base_lr", float(self.base_lr))
        object.__setattr__(self, "gamma", float(self.gamma))
        object.__setattr__(self, "min_lr", float(self.min_lr))

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate of global step `step` (0-based) in a job of `total_steps` steps."""
        _int(step, "step", minimum=0)
        _int(total_steps, "total_steps", minimum=1)
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        t = step - self.warmup_steps
        if self.kind == "constant":
            return self.base_lr
        if self.kind == "step":
            return self.base_lr * self.gamma ** (t // self.step_size)
        span = max(1, total_steps - self.warmup_steps)
        progress = min(1.0, t / span)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (
            1.0 + math.cos(math.pi * progress)
        )

    def to_wire(self) -> dict[str, Any]:
        """Every field, as plain msgpack types."""
        return {
            "base_lr": self.base_lr,
            "kind": self.kind,
            "warmup_steps": self.warmup_steps,
            "gamma": self.gamma,
            "step_size": self.step_size,
            "min_lr": self.min_lr,
        }

    @classmethod
    def from_wire(cls, data: object) -> LRSchedule:
        """Strict inverse of `to_wire`: every field present, none unknown."""
        return cls._parse(data, strict=True)

    @classmethod
    def from_mapping(cls, data: object) -> LRSchedule:
        """User-facing: a number means a constant rate; a mapping needs only `base_lr`."""
        if not isinstance(data, bool) and isinstance(data, (int, float)):
            return cls(base_lr=_float(data, "lr", minimum=0.0))
        return cls._parse(data, strict=False)

    @classmethod
    def _parse(cls, data: object, *, strict: bool) -> LRSchedule:
        mapping = _mapping(data, "lr")
        required = cls._FIELDS if strict else frozenset({"base_lr"})
        _check_fields(mapping, "job field 'lr'", required, cls._FIELDS)
        kind = mapping.get("kind", "constant")
        if not isinstance(kind, str):
            raise ConfigError(f"job field 'lr.kind': expected a string, got {type(kind).__name__}")
        return cls(
            base_lr=_float(mapping["base_lr"], "lr.base_lr", minimum=0.0),
            kind=cast(LRKind, kind),
            warmup_steps=_int(mapping.get("warmup_steps", 0), "lr.warmup_steps", minimum=0),
            gamma=_float(mapping.get("gamma", 0.1), "lr.gamma", positive=True),
            step_size=_int(mapping.get("step_size", 1), "lr.step_size", minimum=1),
            min_lr=_float(mapping.get("min_lr", 0.0), "lr.min_lr", minimum=0.0),
        )


_JOB_FIELDS = frozenset(
    {
        "task",
        "params",
        "dataset_size",
        "global_batch",
        "epochs",
        "seed",
        "lr",
        "min_nodes",
        "max_nodes",
        "group_size",
        "drop_last",
    }
)
_JOB_REQUIRED_USER = frozenset({"task", "dataset_size", "global_batch", "lr", "max_nodes"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    """A validated training job: data size and batch, data epochs, seed, lr, cluster bounds.

    Steps: with `drop_last` (the default) an epoch has dataset_size // global_batch steps of
    exactly global_batch samples; without it the last, partial batch is a step too.
    `group_size` is the number of steps per iteration group, or "auto" to let the leader's
    `GroupSizeController` choose. `max_nodes` may not exceed `global_batch`, so that every rank
    gets at least one sample of every full batch.
    """

    task: str
    dataset_size: int
    global_batch: int
    lr: LRSchedule
    max_nodes: int
    min_nodes: int = 1
    epochs: int = 1
    seed: int = 0
    group_size: int | Literal["auto"] = "auto"
    drop_last: bool = True
    params: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _check_task_ref(self.task)
        object.__setattr__(self, "params", check_plain(_mapping(self.params, "params")))
        dataset_size = _int(self.dataset_size, "dataset_size", minimum=1, maximum=2**63 - 1)
        global_batch = _int(self.global_batch, "global_batch", minimum=1)
        if global_batch > dataset_size:
            raise ConfigError(
                f"job field 'global_batch': must be <= dataset_size ({dataset_size}), "
                f"got {global_batch}"
            )
        _int(self.epochs, "epochs", minimum=1, maximum=2**32 - 1)
        _int(self.seed, "seed", minimum=0, maximum=_UINT64_MAX)
        if not isinstance(self.lr, LRSchedule):
            raise ConfigError(
                f"job field 'lr': expected an LRSchedule, got {type(self.lr).__name__}"
            )
        min_nodes = _int(self.min_nodes, "min_nodes", minimum=1)
        max_nodes = _int(self.max_nodes, "max_nodes", minimum=1)
        if min_nodes > max_nodes:
            raise ConfigError(
                f"job field 'min_nodes': must be <= max_nodes ({max_nodes}), got {min_nodes}"
            )
        if max_nodes > self.global_batch:
            raise ConfigError(
                f"job field 'max_nodes': must be <= global_batch ({self.global_batch}) so every "
                f"rank gets a sample, got {max_nodes}"
            )
        if self.group_size != "auto":
            if not _is_int(self.group_size):
                raise ConfigError(
                    "job field 'group_size': expected an integer >= 1 or 'auto', "
                    f"got {self.group_size!r}"
                )
            _int(self.group_size, "group_size", minimum=1)
        if not isinstance(self.drop_last, bool):
            raise ConfigError(
                f"job field 'drop_last': expected a bool, got {type(self.drop_last).__name__}"
            )

    @property
    def steps_per_epoch(self) -> int:
        """Steps in one pass over the data (a partial last batch counts unless drop_last)."""
        if self.drop_last:
            return self.dataset_size // self.global_batch
        return -(-self.dataset_size // self.global_batch)

    @property
    def total_steps(self) -> int:
        """Steps of the whole job, over all data epochs."""
        return self.steps_per_epoch * self.epochs

    def lr_at(self, step: int) -> float:
        """Learning rate of global step `step` under this job's schedule."""
        return self.lr.lr_at(step, self.total_steps)

    def batch_at(self, step: int) -> int:
        """Samples in the global batch of `step` (global_batch except a partial last batch)."""
        _int(step, "step", minimum=0, maximum=self.total_steps - 1)
        i = step % self.steps_per_epoch
        return min(self.global_batch, self.dataset_size - i * self.global_batch)

    def to_wire(self) -> dict[str, Any]:
        """Every field as plain msgpack types (the inverse of `from_wire`)."""
        return {
            "task": self.task,
            "params": check_plain(self.params),
            "dataset_size": self.dataset_size,
            "global_batch": self.global_batch,
            "epochs": self.epochs,
            "seed": self.seed,
            "lr": self.lr.to_wire(),
            "min_nodes": self.min_nodes,
            "max_nodes": self.max_nodes,
            "group_size": self.group_size,
            "drop_last": self.drop_last,
        }

    @classmethod
    def from_wire(cls, data: object) -> Job:
        """Strict inverse of `to_wire`: every field present, none unknown, all validated."""
        return cls._parse(data, strict=True)

    @classmethod
    def from_mapping(cls, data: object) -> Job:
        """User-facing spec: optional fields take defaults and `lr` may be a plain number.

        Required: task, dataset_size, global_batch, lr, max_nodes.
        """
        return cls._parse(data, strict=False)

    @classmethod
    def _parse(cls, data: object, *, strict: bool) -> Job:
        mapping = _mapping(data, "job")
        required = _JOB_FIELDS if strict else _JOB_REQUIRED_USER
        _check_fields(mapping, "job spec", required, _JOB_FIELDS)
        lr = (LRSchedule.from_wire if strict else LRSchedule.from_mapping)(mapping["lr"])
        params = mapping.get("params", {})
        if not isinstance(params, dict):
            raise ConfigError(f"job field 'params': expected a dict, got {type(params).__name__}")
        group_size = mapping.get("group_size", "auto")
        if isinstance(group_size, str) and group_size != "auto":
            raise ConfigError(
                f"job field 'group_size': expected an integer >= 1 or 'auto', got {group_size!r}"
            )
        return cls(
            task=mapping["task"],
            params=params,
            dataset_size=mapping["dataset_size"],
            global_batch=mapping["global_batch"],
            epochs=mapping.get("epochs", 1),
            seed=mapping.get("seed", 0),
            lr=lr,
            min_nodes=mapping.get("min_nodes", 1),
            max_nodes=mapping["max_nodes"],
            group_size=group_size,
            drop_last=mapping.get("drop_last", True),
        )

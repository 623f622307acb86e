"""The sharded optimizer update (BigDL's phase 2): one configuration type, one update.

In a sharded step the summed gradient is never complete anywhere: each rank receives the
reduced gradient of the weight range it owns (inside the allreduce, `on_chunk`), runs the
optimizer on exactly that range of the weights, and shares the *new weights* in place of the
reduced gradient, so what every rank gathers is the updated model. The optimizer state is
kept for the owned range only (`ShardedUpdate`); which range a rank owns follows from the
allreduce `auto` picks (`Collectives.owned_range`): a slice for the sliced and shared-memory
algorithms, everything when the buffer is small enough for the one-hop exchange.

`OptimizerConfig` is the one optimizer description (torch.optim's SGD, Adam and AdamW
semantics); the torch integration maps torch optimizers onto it, the job runtime reads it
from a task, and both run `sharded_step`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from p2pdl import kernels
from p2pdl.collectives.lowrank import LowRankSpec, LowRankState, is_lowrank, lowrank_reduce
from p2pdl.collectives.quantized import NAME as INT8_EF
from p2pdl.collectives.quantized import Int8Feedback, sharded_step_int8
from p2pdl.collectives.readiness import GradientReadiness
from p2pdl.errors import ConfigError

__all__ = [
    "OptimizerConfig",
    "ShardedUpdate",
    "gather_state",
    "optimizer_step",
    "sharded_step",
]

OptimizerKind = Literal["sgd", "adam", "adamw"]
KINDS = ("sgd", "adam", "adamw")


def _num(value: object, name: str, lo: float, hi: float, *, hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"optimizer field {name!r}: expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < lo or number > hi or (hi_open and number >= hi):
        bracket = ")" if hi_open else "]"
        raise ConfigError(f"optimizer field {name!r}: {number} is outside [{lo}, {hi}{bracket}")
    return number


@dataclass(frozen=True, slots=True, kw_only=True)
class OptimizerConfig:
    """An optimizer as plain values, with torch.optim's meaning of every field.

    `lr` is the default learning rate (a job's schedule or a `step(lr=...)` overrides it per
    step). State buffers are named as in torch.optim's `state_dict`.
    """

    kind: OptimizerKind = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    amsgrad: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(
                f"optimizer field 'kind': must be sgd, adam or adamw, got {self.kind!r}"
            )
        for name, lo, hi, hi_open in (
            ("lr", 0.0, math.inf, False),
            ("momentum", 0.0, 1.0, True),
            ("dampening", 0.0, 1.0, False),
            ("weight_decay", 0.0, math.inf, False),
            ("eps", 0.0, math.inf, False),
        ):
            object.__setattr__(self, name, _num(getattr(self, name), name, lo, hi, hi_open=hi_open))
        if not isinstance(self.nesterov, bool) or not isinstance(self.amsgrad, bool):
            raise ConfigError("optimizer fields 'nesterov' and 'amsgrad' must be booleans")
        if self.nesterov and (self.kind != "sgd" or self.momentum <= 0 or self.dampening != 0):
            raise ConfigError("nesterov needs kind 'sgd', momentum > 0 and dampening == 0")
        try:
            betas = tuple(self.betas)
        except TypeError:
            raise ConfigError(
                f"optimizer field 'betas': expected two numbers, got {self.betas!r}"
            ) from None
        if len(betas) != 2:
            raise ConfigError(f"optimizer field 'betas': expected two numbers, got {betas!r}")
        object.__setattr__(
            self,
            "betas",
            tuple(_num(b, f"betas[{i}]", 0.0, 1.0, hi_open=True) for i, b in enumerate(betas)),
        )

    @classmethod
    def from_mapping(cls, data: object) -> OptimizerConfig:
        """From an OptimizerConfig or a mapping of its fields; unknown fields are refused."""
        if isinstance(data, OptimizerConfig):
            return data
        if not isinstance(data, Mapping):
            raise ConfigError(f"optimizer: expected a mapping, got {type(data).__name__}")
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(map(str, data)) - allowed)
        if unknown:
            raise ConfigError(f"optimizer: unknown field(s) {unknown}; allowed {sorted(allowed)}")
        values = dict(data)
        if isinstance(values.get("kind"), str):
            values["kind"] = values["kind"].lower()
        if isinstance(values.get("betas"), (list, tuple)):
            values["betas"] = tuple(values["betas"])
        return cls(**values)

    def with_lr(self, lr: float) -> OptimizerConfig:
        return replace(self, lr=lr)

    def to_wire(self) -> dict[str, Any]:
        """Plain msgpack/JSON types (and what `from_mapping` reads back)."""
        return {
            "kind": self.kind,
            "lr": self.lr,
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
        """The per-element state buffers this optimizer keeps, as torch.optim names them."""
        if self.kind == "sgd":
            return ("momentum_buffer",) if self.momentum != 0 else ()
        names = ("exp_avg", "exp_avg_sq")
        return (*names, "max_exp_avg_sq") if self.amsgrad else names


def optimizer_step(
    config: OptimizerConfig,
    weights: np.ndarray,
    grad: np.ndarray,
    *,
    lr: float,
    steps_done: int,
    state: Mapping[str, np.ndarray],
) -> None:
    """One torch.optim-equivalent step on a weight range, with the kernels (in place).

    `steps_done` counts the steps this state has taken before (0 on the first one); `state`
    holds the same range of each of `config.state_names`.
    """
    if config.kind == "sgd":
        kernels.sgd_step(
            weights,
            grad,
            state.get("momentum_buffer"),
            lr=lr,
            momentum=config.momentum,
            dampening=config.dampening,
            weight_decay=config.weight_decay,
            nesterov=config.nesterov,
            first_step=steps_done == 0,
        )
        return
    kernels.adam_step(
        weights,
        grad,
        state["exp_avg"],
        state["exp_avg_sq"],
        step=steps_done + 1,
        lr=lr,
        beta1=config.betas[0],
        beta2=config.betas[1],
        eps=config.eps,
        weight_decay=config.weight_decay,
        decoupled=config.kind == "adamw",
        amsgrad=config.amsgrad,
        vmax=state.get("max_exp_avg_sq"),
    )


class ShardedUpdate:
    """The optimizer state of the weight range this rank owns, and the update of that range.

    `weights` is the full flat weight buffer (the model's memory). The owned range is fixed by
    `own` (or by the first `update`): a rank never keeps state for weights it does not own.
    """

    def __init__(self, config: OptimizerConfig, weights: np.ndarray) -> None:
        self.config = config
        self.weights = weights
        self.size = weights.size
        self.range: tuple[int, int] | None = None
        self.state: dict[str, np.ndarray] = {}
        self.feedback: Int8Feedback | None = None
        """int8-ef's residual and master weights (made by the first compressed step)."""
        self.lowrank: LowRankState | None = None
        """PowerSGD's plan, warm-start factors and residual (made by its first step)."""

    def own(
        self,
        start: int,
        stop: int,
        source: Mapping[str, np.ndarray] | None = None,
        source_start: int = 0,
    ) -> None:
        """Own weights[start:stop]: its state is copied out of `source` (arrays whose first
        element is weight `source_start`, e.g. full-length ones), or starts at zero."""
        if not 0 <= start <= stop <= self.size:
            raise ValueError(f"range {(start, stop)} is outside 0..{self.size}")
        dtype = self.weights.dtype
        state = {}
        for name in self.config.state_names:
            if source is not None and name in source:
                piece = source[name][start - source_start : stop - source_start]
                if piece.size != stop - start:
                    raise ValueError(f"the {name} source does not cover {(start, stop)}")
                state[name] = np.array(piece, dtype=dtype)
            else:
                state[name] = np.zeros(stop - start, dtype)
        self.range = (start, stop)
        self.state = state

    def update(
        self,
        start: int,
        stop: int,
        grad: np.ndarray,
        *,
        lr: float,
        steps_done: int,
        weights: np.ndarray | None = None,
    ) -> None:
        """One optimizer step on weights[start:stop] (the owned range or a piece of it), or on
        `weights`, another copy of that range (int8-ef's exact master weights)."""
        if self.range is None:
            self.own(start, stop)
        assert self.range is not None
        lo, hi = self.range
        if not lo <= start <= stop <= hi:
            raise RuntimeError(
                f"update of {(start, stop)} outside the owned range {self.range}; the "
                "allreduce that owns ranges changed (a different size or algorithm)"
            )
        piece = {name: buf[start - lo : stop - lo] for name, buf in self.state.items()}
        target = self.weights[start:stop] if weights is None else weights
        optimizer_step(self.config, target, grad, lr=lr, steps_done=steps_done, state=piece)


async def sharded_step(
    collectives: Any,
    grads: Sequence[np.ndarray],
    weights: np.ndarray,
    update: ShardedUpdate,
    *,
    lr: float,
    steps_done: int,
    op: str = "mean",
    scale: float | None = None,
    algorithm: str = "auto",
    compression: str | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
    timeout: float | None = None,
    ready: GradientReadiness | None = None,
) -> None:
    """Allreduce `grads` (this node's local replicas: phase 1 sums them) with the optimizer
    inside: each owner updates its range of `weights` as its reduced chunks land and shares
    the new weights, which every rank then holds in `weights`.

    `weights` may be longer than `update.size`: the values past it are carried (the reduced
    value replaces the old one, e.g. accounting sums). `scale` multiplies the reduced
    gradient before the update (a global-batch mean). `compression="int8-ef"` moves 8-bit
    codes with error feedback both ways (`p2pdl.collectives.quantized`);
    `"powersgd:rank=R"` exchanges low-rank factors of each weight matrix's gradient (`shapes`
    says where the matrices are; `p2pdl.collectives.lowrank`) and every rank then updates its
    whole replica with the same bits. `ready` lets the step start before backward has
    finished `grads[0]`: int8-ef sends each chunk once it is written (last layers first);
    the other paths wait for the whole gradient.
    """
    size = update.size
    if weights.size != grads[0].size:
        raise ValueError(f"weights hold {weights.size} elements, the gradient {grads[0].size}")
    if ready is not None and compression != INT8_EF:
        await ready.wait(0, grads[0].size)
        ready = None
    if is_lowrank(compression):
        assert compression is not None
        await _lowrank_step(
            collectives, list(grads), weights, update, compression, shapes, lr=lr,
            steps_done=steps_done, op=op, scale=scale, timeout=timeout,
        )  # fmt: skip
        return
    if compression is not None:
        if compression != INT8_EF:
            raise ValueError(
                f"the sharded step compresses with {INT8_EF!r} or 'powersgd:rank=R', "
                f"not {compression!r}"
            )
        if update.feedback is None:
            update.feedback = Int8Feedback(size)
        await sharded_step_int8(
            collectives, list(grads), weights, update, update.feedback, lr=lr,
            steps_done=steps_done, op=op, scale=scale, timeout=timeout, ready=ready,
        )  # fmt: skip
        return

    def on_chunk(start: int, stop: int, reduced: np.ndarray) -> None:
        hi = min(stop, size)
        if start < hi:
            grad = reduced[: hi - start]
            if scale is not None:
                kernels.scale_(grad, scale)
            update.update(start, hi, grad, lr=lr, steps_done=steps_done)
        if stop > size:
            lo = max(start, size)
            weights[lo:stop] = reduced[lo - start : stop - start]
        reduced[:] = weights[start:stop]

    await collectives.allreduce(
        list(grads) if len(grads) > 1 else grads[0],
        op=op,
        algorithm=algorithm,
        on_chunk=on_chunk,
        local_copies=False,
        timeout=timeout,
    )
    np.copyto(weights, grads[0])


async def _lowrank_step(
    collectives: Any,
    grads: list[np.ndarray],
    weights: np.ndarray,
    update: ShardedUpdate,
    compression: str,
    shapes: Sequence[Sequence[int]] | None,
    *,
    lr: float,
    steps_done: int,
    op: str,
    scale: float | None,
    timeout: float | None,
) -> None:
    """PowerSGD: the approximated gradient is the same everywhere; every rank steps its
    whole replica (state for all of it, as DDP's optimizers keep)."""
    size = update.size
    state = update.lowrank
    if state is None:
        spec = LowRankSpec.parse(compression)
        state = LowRankState(spec, size, tuple(tuple(s) for s in (shapes or [(size,)])))
        update.lowrank = state
    if update.range is None:
        update.own(0, size)
    if update.range != (0, size):
        raise RuntimeError(f"powersgd updates every weight, but this rank owns {update.range}")
    if len(grads) > 1:
        kernels.sum_into(grads[0], grads)
    buf = grads[0]
    await lowrank_reduce(
        collectives, buf, state, mean=op == "mean", tail=weights.size - size, timeout=timeout
    )
    grad = buf[:size]

    def step() -> None:
        if scale is not None:
            kernels.scale_(grad, scale)
        update.update(0, size, grad, lr=lr, steps_done=steps_done)

    await collectives.compute.run(4 * size, step)
    weights[size:] = buf[size:]


async def gather_state(
    collectives: Any, update: ShardedUpdate, *, timeout: float | None = None
) -> dict[str, np.ndarray]:
    """The full optimizer state on every rank (a collective): each owner contributes its
    range to zeroed full-length buffers; owned ranges are disjoint, or all ranks own
    everything, so the sum of zeros and one owner's values is exact."""
    size = update.size
    dtype = update.weights.dtype
    out: dict[str, np.ndarray] = {}
    replicated = collectives.group.world_size == 1 or update.range == (0, size)
    for name in update.config.state_names:
        full = np.zeros(size, dtype)
        if update.range is not None and name in update.state:
            a, b = update.range
            full[a:b] = update.state[name]
        if not replicated:
            await collectives.allreduce(full, op="sum", timeout=timeout)
        out[name] = full
    return out

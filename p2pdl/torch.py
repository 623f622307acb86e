"""PyTorch on p2pdl: flat buffers, a sharded optimizer, a DDP-style wrapper, checkpoints, a task.

Two ways to train a torch model here:

* **Existing loops** change two lines::

      node = p2pdl.connect()                                     # 1
      model = p2pdl.torch.DistributedDataParallel(model, node)   # 2
      ...                                                        # unchanged loop:
      loss.backward()            # .grad holds the average across nodes when this returns
      optimizer.step()

  or use the sharded update (BigDL's phase 2) instead of a local optimizer::

      opt = p2pdl.torch.ShardedOptimizer({"name": "adam", "lr": 1e-3}, model, node)
      loss.backward(); opt.step()      # reduce-scatter, update owned slice, all-gather weights

* **Group-scheduled jobs** use :class:`TorchTask` (a model factory, a loss, an indexable data set,
  an optimizer config); ``python -m p2pdl node --lead --job examples.train_digits:task``.

A model's parameters become views into one contiguous weight buffer and its gradients views into
one gradient buffer (:class:`FlatParameters`), so the collectives read and write the model's
memory directly, with no per-step copies. Only the parameters are synchronised; module buffers
(BatchNorm running statistics) stay local to each replica.
"""

from __future__ import annotations

try:
    import torch
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "p2pdl.torch needs PyTorch, which is not installed; install it with "
        "`pip install 'p2pdl[torch]'` (or `pip install torch`)"
    ) from _exc

import asyncio
import concurrent.futures
import copy
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from p2pdl import kernels
from p2pdl.collectives.api import choose_algorithm
from p2pdl.collectives.plan import plan_slices
from p2pdl.schedule.task import OptimizerConfig as ShardConfig
from p2pdl.schedule.task import optimizer_step

__all__ = [
    "DistributedDataParallel",
    "FlatParameters",
    "OptimizerConfig",
    "ShardedOptimizer",
    "TorchTask",
    "default_partitions",
    "load_checkpoint",
    "save_checkpoint",
    "weights_digest",
]

_SEED_LOCK = threading.Lock()
"""torch's default generator is process-wide: seeding and drawing from it must not interleave."""

_GRACE = 5.0
"""Seconds a blocking call waits beyond the node's operation deadline."""


# --------------------------------------------------------------------------- the node runner
class _Runner:
    """Runs coroutines on the node's event loop, from synchronous code when that is possible.

    `node` is a blocking facade (`p2pdl.connect()`, anything with `.node` and `.submit`) or an
    asyncio `Node`; with a bare `Node`, pass the `loop` it runs on (in another thread) to get
    the blocking methods, or use the `*_async` ones from that loop.
    """

    def __init__(self, node: Any, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if hasattr(node, "submit") and hasattr(node, "node"):
            self.node = node.node
            self._submit: Callable[[Any], concurrent.futures.Future[Any]] | None = node.submit
        else:
            self.node = node
            if loop is not None:
                self._submit = lambda coro: asyncio.run_coroutine_threadsafe(coro, loop)
            else:
                self._submit = None

    @property
    def rank(self) -> int:
        return int(self.node.rank)

    @property
    def world_size(self) -> int:
        return int(self.node.world_size)

    @property
    def collectives(self) -> Any:
        coll = getattr(self.node, "collectives", None)
        if coll is None:
            raise RuntimeError("the node is not started (use it after connect()/start())")
        return coll

    @property
    def can_block(self) -> bool:
        return self._submit is not None

    def submit(self, coro: Any) -> concurrent.futures.Future[Any]:
        if self._submit is None:
            coro.close()
            raise TypeError(
                "this object was given an asyncio Node without its loop: use the *_async "
                "methods from the node's loop, pass loop=, or use p2pdl.connect()"
            )
        return self._submit(coro)

    def timeout(self) -> float:
        return float(self.node.timeouts.operation) + _GRACE

    def call(self, coro: Any) -> Any:
        return self.submit(coro).result(self.timeout())


def _np(tensor: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a contiguous CPU tensor (no copy)."""
    return tensor.detach().reshape(-1).numpy()


def _unique_params(params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _params_of(source: Any) -> list[torch.nn.Parameter]:
    if isinstance(source, torch.nn.Module):
        return _unique_params(source.parameters())
    return _unique_params(source)


# ---------------------------------------------------------------------------- flat buffers
class FlatParameters:
    """A model's parameters as views into one flat weight buffer, gradients into another.

    After construction `p.data` of every trainable parameter is a view into `weights` and
    `p.grad` a view into `grads` (zeroed). Writing the flat buffers writes the model; the
    collectives run on them directly. `weights=` / `grads=` use existing flat buffers (local
    replicas share the weights; the scheduling runtime owns both).

    `optimizer.zero_grad()` of torch sets grads to None by default, which detaches them from
    the buffer: call :meth:`zero_grad` (or :meth:`attach_grads`) instead.
    """

    def __init__(
        self,
        model: Any,
        *,
        weights: torch.Tensor | None = None,
        grads: torch.Tensor | None = None,
    ) -> None:
        params = _params_of(model)
        if not params:
            raise ValueError("the model has no trainable parameters")
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.float64):
            raise TypeError(f"parameters must all be float32 or all float64, got {dtypes}")
        for p in params:
            if p.device.type != "cpu":
                raise TypeError(f"parameters must be on the CPU, got one on {p.device}")
        self.dtype: torch.dtype = params[0].dtype
        self.params = params
        self.shapes = [tuple(p.shape) for p in params]
        self.offsets: list[int] = []
        total = 0
        for p in params:
            self.offsets.append(total)
            total += p.numel()
        self.numel = total
        if weights is None:
            weights = torch.empty(total, dtype=self.dtype)
            for p, off in zip(params, self.offsets, strict=True):
                weights[off : off + p.numel()].copy_(p.detach().reshape(-1))
        elif weights.numel() != total or weights.dtype != self.dtype or weights.dim() != 1:
            raise ValueError(
                f"shared weights must be a flat {self.dtype} tensor of {total} elements, "
                f"got {weights.dtype}{list(weights.shape)}"
            )
        if grads is None:
            grads = torch.zeros(total, dtype=self.dtype)
        elif grads.numel() != total or grads.dtype != self.dtype or grads.dim() != 1:
            raise ValueError(f"the gradient buffer must be a flat {self.dtype}[{total}] tensor")
        else:
            grads.zero_()
        self.weights = weights
        self.grads = grads
        self.weights_np = _np(self.weights)
        self.grads_np = _np(self.grads)
        with torch.no_grad():
            for p, off, shape in zip(params, self.offsets, self.shapes, strict=True):
                n = math.prod(shape)
                p.data = self.weights[off : off + n].view(shape)
                p.grad = self.grads[off : off + n].view(shape)

    def views(self, flat: torch.Tensor) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor]]:
        """(parameter, its piece of `flat`) for every parameter."""
        for p, off, shape in zip(self.params, self.offsets, self.shapes, strict=True):
            yield p, flat[off : off + math.prod(shape)].view(shape)

    def attach_grads(self) -> None:
        """Re-point every `p.grad` into the gradient buffer (copying one that lives elsewhere)."""
        for p, view in self.views(self.grads):
            g = p.grad
            if g is None:
                view.zero_()
            elif g.data_ptr() != view.data_ptr():
                view.copy_(g)
            else:
                continue
            p.grad = view

    def zero_grad(self) -> None:
        self.attach_grads()
        self.grads.zero_()

    def replica(self, model: torch.nn.Module, grads: torch.Tensor | None = None) -> FlatParameters:
        """Point `model` (same structure) at these weights, with a gradient buffer of its own."""
        return FlatParameters(model, weights=self.weights, grads=grads)


def weights_digest(model_or_flat: Any) -> str:
    """SHA-256 of a model's parameters in order (bit-level; for 'identical on every rank')."""
    import hashlib

    h = hashlib.sha256()
    if isinstance(model_or_flat, FlatParameters):
        h.update(model_or_flat.weights_np.tobytes())
    else:
        for p in _params_of(model_or_flat):
            h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------ optimizer config
_OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class OptimizerConfig:
    """An optimizer as plain values: `name` is "sgd", "adam" or "adamw" (torch.optim's meaning)."""

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    amsgrad: bool = False

    def __post_init__(self) -> None:
        if self.name not in _OPTIMIZERS:
            raise ValueError(f"optimizer name must be one of {_OPTIMIZERS}, got {self.name!r}")
        for key in ("lr", "momentum", "dampening", "weight_decay", "eps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"optimizer {key} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"optimizer {key} must be finite and >= 0, got {value}")
        b1, b2 = self.betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov momentum requires momentum > 0 and dampening == 0")
        object.__setattr__(self, "betas", (float(b1), float(b2)))

    @classmethod
    def of(cls, spec: Any) -> OptimizerConfig:
        """From an OptimizerConfig, a dict ({"name": "adam", "lr": ...}) or a torch optimizer."""
        if isinstance(spec, OptimizerConfig):
            return spec
        if isinstance(spec, dict):
            data = dict(spec)
            if "type" in data:
                data["name"] = data.pop("type")
            data["name"] = str(data.get("name", "sgd")).lower()
            if "betas" in data:
                data["betas"] = tuple(data["betas"])
            unknown = set(data) - {f for f in cls.__dataclass_fields__}
            if unknown:
                raise ValueError(f"unknown optimizer setting(s): {sorted(unknown)}")
            return cls(**data)
        if isinstance(spec, torch.optim.Optimizer):
            if len(spec.param_groups) != 1:
                raise ValueError("only optimizers with a single parameter group are supported")
            g = spec.param_groups[0]
            if g.get("maximize"):
                raise ValueError("maximize=True is not supported")
            if isinstance(spec, torch.optim.SGD):
                return cls(
                    "sgd",
                    float(g["lr"]),
                    g["momentum"],
                    g["dampening"],
                    g["weight_decay"],
                    bool(g["nesterov"]),
                )
            if isinstance(spec, torch.optim.Adam):  # AdamW is a subclass in torch >= 2.6
                decoupled = isinstance(spec, torch.optim.AdamW) or g.get("decoupled_weight_decay")
                return cls(
                    "adamw" if decoupled else "adam",
                    float(g["lr"]),
                    weight_decay=g["weight_decay"],
                    betas=tuple(g["betas"]),
                    eps=g["eps"],
                    amsgrad=bool(g["amsgrad"]),
                )
        raise TypeError(f"cannot make an optimizer config from {type(spec).__name__}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["betas"] = list(self.betas)
        return data

    def torch_optimizer(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """The equivalent torch.optim optimizer (for checkpoints and references)."""
        if self.name == "sgd":
            return torch.optim.SGD(
                params,
                lr=self.lr,
                momentum=self.momentum,
                dampening=self.dampening,
                weight_decay=self.weight_decay,
                nesterov=self.nesterov,
            )
        cls = torch.optim.AdamW if self.name == "adamw" else torch.optim.Adam
        return cls(
            params,
            lr=self.lr,
            betas=self.betas,
            eps=self.eps,
            weight_decay=self.weight_decay,
            amsgrad=self.amsgrad,
        )

    def sharded(self) -> ShardConfig:
        """The same optimizer for the sharded step (the learning rate travels per step)."""
        return ShardConfig(
            kind=self.name,  # type: ignore[arg-type]
            momentum=self.momentum,
            dampening=self.dampening,
            nesterov=self.nesterov,
            weight_decay=self.weight_decay,
            betas=self.betas,
            eps=self.eps,
            amsgrad=self.amsgrad,
        )

    def state_names(self) -> tuple[str, ...]:
        """The per-element state buffers, named as in torch.optim's state_dict."""
        if self.name == "sgd":
            return ("momentum_buffer",) if self.momentum != 0 else ()
        names = ("exp_avg", "exp_avg_sq")
        return (*names, "max_exp_avg_sq") if self.amsgrad else names


class _SliceState:
    """The optimizer state of the weight slice this rank owns, and the update kernel call."""

    def __init__(self, config: OptimizerConfig, weights: np.ndarray) -> None:
        self.config = config
        self.shard = config.sharded()
        self.weights = weights
        self.range: tuple[int, int] | None = None
        self.buffers: dict[str, np.ndarray] = {}
        self.loaded: dict[str, np.ndarray] | None = None
        """Full-length state from a checkpoint, cut to the owned slice on first use."""

    def own(self, start: int, stop: int) -> None:
        """This rank owns weights[start:stop]: keep optimizer state for exactly that range."""
        if self.range == (start, stop):
            return
        if self.range is not None:
            raise RuntimeError(
                f"the owned weight slice changed from {self.range} to {(start, stop)}; "
                "a ShardedOptimizer needs a fixed buffer size and algorithm"
            )
        self.range = (start, stop)
        dtype = self.weights.dtype
        for name in self.config.state_names():
            if self.loaded is not None and name in self.loaded:
                self.buffers[name] = np.array(self.loaded[name][start:stop], dtype=dtype)
            else:
                self.buffers[name] = np.zeros(stop - start, dtype)
        self.loaded = None

    def update(self, start: int, stop: int, grad: np.ndarray, lr: float, steps_done: int) -> None:
        """One optimizer step on weights[start:stop] (the owned range or a piece of it)."""
        if self.range is None:
            self.own(start, stop)
        assert self.range is not None
        lo, hi = self.range
        if not lo <= start <= stop <= hi:
            raise RuntimeError(f"update of {(start, stop)} outside the owned slice {self.range}")
        piece = {name: buf[start - lo : stop - lo] for name, buf in self.buffers.items()}
        optimizer_step(
            self.shard,
            self.weights[start:stop],
            grad,
            lr=lr,
            steps_done=steps_done,
            momentum=piece.get("momentum_buffer"),
            exp_avg=piece.get("exp_avg"),
            exp_avg_sq=piece.get("exp_avg_sq"),
            max_exp_avg_sq=piece.get("max_exp_avg_sq"),
        )


# ------------------------------------------------------------------------ sharded optimizer
_STRATEGIES = ("allreduce", "scatter_gather")


class ShardedOptimizer:
    """BigDL's phase 2 for a torch model: every rank updates only the weight slice it owns.

    `step()` after `backward()`:

    * ``strategy="allreduce"`` (default): one sliced allreduce on the gradient buffer whose
      `on_slice` runs the optimizer kernel on the owned weight slice and writes the *new
      weights* into the reduced slice, so the all-gathered result is the new weights; they
      are copied into the weight buffer (one memcpy).
    * ``strategy="scatter_gather"``: reduce-scatter the gradients (the update runs in
      `on_slice`), then all-gather the weight buffer in place.

    `op="mean"` averages gradients across ranks (what DDP does; the loss is a per-rank mean),
    `op="sum"` sums them. `local_grads` are the gradient buffers of other local replicas
    (phase 1 sums them into this one with the kernels). The update follows torch.optim's
    formulas (single parameter group); `step()` leaves the gradient buffer zeroed. State is
    held only for the owned slice; :meth:`state_dict` gathers it in torch.optim's format.
    """

    def __init__(
        self,
        optimizer: Any,
        model: Any,
        node: Any,
        *,
        op: str = "mean",
        strategy: str = "allreduce",
        algorithm: str = "auto",
        broadcast: bool = True,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if op not in ("sum", "mean"):
            raise ValueError(f"op must be 'sum' or 'mean', got {op!r}")
        if strategy not in _STRATEGIES:
            raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")
        self.config = OptimizerConfig.of(optimizer)
        self.flat = model if isinstance(model, FlatParameters) else FlatParameters(model)
        self.runner = _Runner(node, loop)
        self.op = op
        self.strategy = strategy
        self.algorithm = algorithm
        self.lr = float(self.config.lr)
        self.steps = 0
        self._slice = _SliceState(self.config, self.flat.weights_np)
        if broadcast and self.runner.can_block:
            self.broadcast_weights()

    # ----------------------------------------------------------------------- collectives
    def _resolved_algorithm(self) -> str:
        if self.strategy == "scatter_gather":
            return "sliced"
        if self.algorithm != "auto":
            return self.algorithm
        coll = self.runner.collectives
        # Every rank on one host with shared memory agreed at start: the owners update their
        # slices straight out of the shared segments (`shm`); otherwise the sliced exchange.
        shared = coll.one_host and bool(coll.shm.usable)
        return choose_algorithm(
            self.flat.weights_np.nbytes, self.runner.world_size, shared_memory=shared
        )

    async def broadcast_weights_async(self, root: int = 0) -> None:
        """Make every rank's weights equal to `root`'s."""
        await self.runner.node.broadcast(self.flat.weights, root)

    def broadcast_weights(self, root: int = 0) -> None:
        self.runner.call(self.broadcast_weights_async(root))

    async def step_async(
        self, lr: float | None = None, local_grads: Sequence[torch.Tensor] = ()
    ) -> None:
        """The sharded step on the node's loop (see the class docstring)."""
        lr = self.lr if lr is None else float(lr)
        flat = self.flat
        grads = [flat.grads_np, *(_np(g) for g in local_grads)]
        steps_done = self.steps
        weights = flat.weights_np
        coll = self.runner.collectives
        state = self._slice

        if self.strategy == "allreduce":

            def on_slice(start: int, stop: int, reduced: np.ndarray) -> None:
                state.update(start, stop, reduced, lr, steps_done)
                np.copyto(reduced, weights[start:stop])

            algorithm = self._resolved_algorithm()
            if algorithm == "sliced":
                # The update is elementwise: run it on each reduced chunk, so the all-gather
                # of the new weights starts before the whole slice is reduced.
                if state.range is None:
                    plan = plan_slices(flat.numel, self.runner.world_size, max(1, flat.numel))
                    state.own(*plan.owned(self.runner.rank))
                hook = {"on_chunk": on_slice}
            else:
                hook = {"on_slice": on_slice}
            await coll.allreduce(grads, op=self.op, algorithm=algorithm, local_copies=False, **hook)
            np.copyto(weights, flat.grads_np)
        else:

            def on_slice(start: int, stop: int, reduced: np.ndarray) -> None:
                state.update(start, stop, reduced, lr, steps_done)

            if len(grads) > 1:
                kernels.sum_into(grads[0], grads)
            await coll.reduce_scatter(grads[0], op=self.op, on_slice=on_slice)
            await coll.allgather(weights)
        flat.grads.zero_()
        for g in local_grads:
            g.zero_()
        self.steps += 1

    def step(self, lr: float | None = None, local_grads: Sequence[torch.Tensor] = ()) -> None:
        """Blocking :meth:`step_async` (needs `p2pdl.connect()` or a loop running elsewhere)."""
        self.flat.attach_grads()
        self.runner.call(self.step_async(lr, local_grads))

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the gradient buffer (grads stay views into it; `set_to_none` is ignored)."""
        del set_to_none
        self.flat.zero_grad()

    # -------------------------------------------------------------------------- state
    async def _gather_state(self) -> dict[str, np.ndarray]:
        names = self.config.state_names()
        size = self.flat.numel
        dtype = self.flat.weights_np.dtype
        state = self._slice
        if state.range is None and state.loaded is not None:
            return {k: np.asarray(v, dtype) for k, v in state.loaded.items()}
        replicated = self.runner.world_size == 1 or self._resolved_algorithm() == "direct"
        out: dict[str, np.ndarray] = {}
        for name in names:
            full = np.zeros(size, dtype)
            if state.range is not None:
                a, b = state.range
                full[a:b] = state.buffers[name]
            if not replicated and self.steps > 0:
                # Disjoint slices: a sum of zeros and one owner's value is exact.
                await self.runner.node.allreduce(full, "sum", "sliced")
            out[name] = full
        return out

    async def state_dict_async(self) -> dict[str, Any]:
        """The gathered optimizer state in torch.optim's state_dict format (a collective)."""
        full = await self._gather_state()
        config = replace(self.config, lr=self.lr)
        reference = config.torch_optimizer(self.flat.params)
        sd = reference.state_dict()
        state: dict[int, dict[str, Any]] = {}
        if self.steps > 0:
            from torch.optim.optimizer import _get_scalar_dtype

            for i, (off, shape) in enumerate(zip(self.flat.offsets, self.flat.shapes, strict=True)):
                n = math.prod(shape)
                entry: dict[str, Any] = {}
                if config.name != "sgd":
                    entry["step"] = torch.tensor(float(self.steps), dtype=_get_scalar_dtype())
                for name, values in full.items():
                    entry[name] = torch.from_numpy(values[off : off + n].copy()).view(shape)
                if entry:
                    state[i] = entry
        sd["state"] = state
        sd["p2pdl"] = {"steps": self.steps, "config": config.to_dict()}
        return sd

    def state_dict(self) -> dict[str, Any]:
        """Blocking :meth:`state_dict_async`: every rank must call it."""
        return self.runner.call(self.state_dict_async())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a torch.optim-format state (from :meth:`state_dict` or a torch optimizer).

        Local: each rank keeps the part of the state it will own. Call it on every rank.
        """
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != 1:
            raise ValueError("expected a torch.optim state_dict with one parameter group")
        group = groups[0]
        if len(group.get("params", ())) != len(self.flat.params):
            raise ValueError(
                f"the state has {len(group.get('params', ()))} parameters, "
                f"the model {len(self.flat.params)}"
            )
        extra = state_dict.get("p2pdl", {})
        dtype = self.flat.weights_np.dtype
        per_param = state_dict.get("state", {})
        names = self.config.state_names()
        loaded = {name: np.zeros(self.flat.numel, dtype) for name in names}
        steps = int(extra.get("steps", 0))
        for i, pid in enumerate(group["params"]):
            entry = per_param.get(pid, per_param.get(str(pid)))
            if not entry:
                continue
            off, shape = self.flat.offsets[i], self.flat.shapes[i]
            n = math.prod(shape)
            for name in names:
                value = entry.get(name)
                if value is None:
                    raise ValueError(f"parameter {i}: the state has no {name!r}")
                if tuple(value.shape) != shape:
                    raise ValueError(f"parameter {i}: {name} has shape {tuple(value.shape)}")
                loaded[name][off : off + n] = value.detach().reshape(-1).to(torch.float64).numpy()
            if "step" in entry:
                steps = max(steps, int(float(entry["step"])))
            elif not extra:
                steps = max(steps, 1)
        self.steps = steps
        self.lr = float(group.get("lr", self.lr))
        self._slice = _SliceState(self.config, self.flat.weights_np)
        self._slice.loaded = loaded


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model) if isinstance(model, DistributedDataParallel) else model


def save_checkpoint(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: ShardedOptimizer | torch.optim.Optimizer | None = None,
    *,
    node: Any = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Save `{"model", "optimizer", "extra"}` with torch.save (rank 0 writes, atomically).

    Loadable in plain PyTorch: `model.load_state_dict(ck["model"])`,
    `torch.optim.X(model.parameters(), ...).load_state_dict(ck["optimizer"])`. With a
    ShardedOptimizer every rank must call this (its state is gathered).
    """
    if isinstance(optimizer, ShardedOptimizer):
        opt_state = optimizer.state_dict()
        runner = optimizer.runner
    else:
        opt_state = optimizer.state_dict() if optimizer is not None else None
        runner = _Runner(node) if node is not None else None
    rank = runner.rank if runner is not None else 0
    if rank == 0:
        checkpoint = {
            "model": _unwrap(model).state_dict(),
            "optimizer": opt_state,
            "extra": extra or {},
        }
        target = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(target))
        fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".pt", dir=folder)
        try:
            with os.fdopen(fd, "wb") as stream:
                torch.save(checkpoint, stream)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    if runner is not None and runner.world_size > 1 and runner.can_block:
        runner.call(runner.node.barrier())


def load_checkpoint(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: ShardedOptimizer | torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Load what :func:`save_checkpoint` wrote into `model` (and `optimizer`); returns extra."""
    checkpoint = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    _unwrap(model).load_state_dict(checkpoint["model"])
    if optimizer is not None and checkpoint.get("optimizer") is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    return dict(checkpoint.get("extra") or {})


# ----------------------------------------------------------------- DDP-style wrapper
@dataclass
class _Bucket:
    index: int
    params: list[torch.nn.Parameter]
    buffer: torch.Tensor
    views: list[torch.Tensor]
    pending: int = 0
    future: concurrent.futures.Future[Any] | None = None


class DistributedDataParallel(torch.nn.Module):
    """torch DDP's contract on p2pdl: when `loss.backward()` returns, every `.grad` is the mean.

    Gradients land in flat bucket buffers (reverse parameter order, about `bucket_mb` MiB
    each; the first one `first_bucket_mb`, so communication starts early). A post-accumulate
    hook counts a bucket's parameters; as soon as one is complete its allreduce starts on the
    node's loop thread while backward goes on. An autograd callback queued at the first hook
    waits for all of them before `backward()` returns, as torch's DDP does. Buckets are
    launched in index order on every rank, so collectives pair up whatever order hooks fire in.

    `node` is `p2pdl.connect()`'s blocking node (or an asyncio `Node` plus the `loop` it runs
    on in another thread). Parameters are broadcast from rank 0 at construction.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        node: Any,
        *,
        bucket_mb: float = 4.0,
        first_bucket_mb: float = 1.0,
        op: str = "mean",
        algorithm: str = "auto",
        compression: str | None = None,
        broadcast: bool = True,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__()
        if op not in ("sum", "mean"):
            raise ValueError(f"op must be 'sum' or 'mean', got {op!r}")
        if bucket_mb <= 0 or first_bucket_mb <= 0:
            raise ValueError("bucket sizes must be positive")
        self.module = module
        self._runner = _Runner(node, loop)
        if not self._runner.can_block:
            raise TypeError("DistributedDataParallel needs p2pdl.connect()'s node (or loop=)")
        self._op = op
        self._algorithm = algorithm
        self._compression = compression
        params = _params_of(module)
        if not params:
            raise ValueError("the module has no trainable parameters")
        for p in params:
            if p.device.type != "cpu" or p.dtype not in (torch.float32, torch.float64):
                raise TypeError("parameters must be float32/float64 CPU tensors")
        self._buckets = self._make_buckets(params, bucket_mb, first_bucket_mb)
        self._where: dict[int, tuple[_Bucket, torch.Tensor]] = {}
        for bucket in self._buckets:
            for p, view in zip(bucket.params, bucket.views, strict=True):
                self._where[id(p)] = (bucket, view)
                p.grad = view
                p.register_post_accumulate_grad_hook(self._on_grad)
        self._sync = True
        self._armed = False
        self._next_launch = 0
        self._reset()
        if broadcast:
            self._broadcast_params(params)

    @staticmethod
    def _make_buckets(
        params: list[torch.nn.Parameter], bucket_mb: float, first_mb: float
    ) -> list[_Bucket]:
        groups: list[list[torch.nn.Parameter]] = []
        current: list[torch.nn.Parameter] = []
        size = 0
        for p in reversed(params):
            limit = (first_mb if not groups else bucket_mb) * (1 << 20)
            nbytes = p.numel() * p.element_size()
            if current and (size + nbytes > limit or p.dtype != current[0].dtype):
                groups.append(current)
                current, size = [], 0
            current.append(p)
            size += nbytes
        if current:
            groups.append(current)
        buckets = []
        for index, group in enumerate(groups):
            total = sum(p.numel() for p in group)
            buffer = torch.zeros(total, dtype=group[0].dtype)
            views, off = [], 0
            for p in group:
                views.append(buffer[off : off + p.numel()].view_as(p))
                if p.grad is not None:
                    views[-1].copy_(p.grad)
                off += p.numel()
            buckets.append(_Bucket(index, group, buffer, views))
        return buckets

    def _broadcast_params(self, params: list[torch.nn.Parameter]) -> None:
        for dtype in {p.dtype for p in params}:
            group = [p for p in params if p.dtype == dtype]
            flat = torch.cat([p.detach().reshape(-1) for p in group])
            self._runner.call(self._runner.node.broadcast(flat, 0))
            with torch.no_grad():
                off = 0
                for p in group:
                    p.copy_(flat[off : off + p.numel()].view_as(p))
                    off += p.numel()

    @property
    def buckets(self) -> list[list[torch.nn.Parameter]]:
        return [b.params for b in self._buckets]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no communication) inside this block."""
        before = self._sync
        self._sync = False
        try:
            yield
        finally:
            self._sync = before

    def _reset(self) -> None:
        for bucket in self._buckets:
            bucket.pending = len(bucket.params)
            bucket.future = None
        self._next_launch = 0
        self._armed = False

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._sync:
            return
        if not self._armed:
            self._armed = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
        bucket, view = self._where[id(p)]
        g = p.grad
        if g is None or g.data_ptr() != view.data_ptr():
            # zero_grad(set_to_none=True) detached .grad from the bucket: copy it back in.
            with torch.no_grad():
                if g is None:
                    view.zero_()
                else:
                    view.copy_(g)
            p.grad = view
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch_ready()

    def _launch(self, bucket: _Bucket) -> None:
        node = self._runner.node
        bucket.future = self._runner.submit(
            node.allreduce(
                bucket.buffer,
                self._op,
                self._algorithm,
                compression=self._compression,
            )
        )

    def _launch_ready(self) -> None:
        while (
            self._next_launch < len(self._buckets) and self._buckets[self._next_launch].pending == 0
        ):
            self._launch(self._buckets[self._next_launch])
            self._next_launch += 1

    def _finish(self) -> None:
        """Runs when autograd is done: launch what is left (unused parameters), then wait."""
        try:
            for bucket in self._buckets[self._next_launch :]:
                for p, view in zip(bucket.params, bucket.views, strict=True):
                    if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                        with torch.no_grad():
                            view.zero_() if p.grad is None else view.copy_(p.grad)
                        p.grad = view
                bucket.pending = 0
            self._launch_ready()
            timeout = self._runner.timeout()
            for bucket in self._buckets:
                assert bucket.future is not None
                bucket.future.result(timeout)
        finally:
            self._reset()


# ------------------------------------------------------------------------------- the task
def default_partitions() -> int:
    """Local replicas per node when not told: the cores torch's intra-op threads leave idle.

    ``max(1, os.cpu_count() // torch.get_num_threads())`` — 1 on a machine where torch already
    uses every core, more when each process is limited to fewer threads than there are cores.
    """
    return max(1, (os.cpu_count() or 1) // max(1, torch.get_num_threads()))


def _batch(dataset: Any, indices: Sequence[int]) -> Any:
    """Samples `indices` of an indexable data set, stacked into a batch."""
    if isinstance(dataset, tuple) and dataset and isinstance(dataset[0], torch.Tensor):
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return tuple(t[index] for t in dataset)
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, tuple):  # torch.utils.data.TensorDataset
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return tuple(t[index] for t in tensors)
    getitems = getattr(dataset, "__getitems__", None)
    items = getitems(list(indices)) if getitems is not None else [dataset[i] for i in indices]
    from torch.utils.data import default_collate

    return default_collate(items)


def _split(indices: Sequence[int], k: int) -> list[list[int]]:
    n = len(indices)
    bounds = [n * i // k for i in range(k + 1)]
    return [list(indices[bounds[i] : bounds[i + 1]]) for i in range(k)]


@dataclass
class TorchTask:
    """A torch training task: for p2pdl's group-scheduled runtime, and for standalone loops.

    `model_fn()` builds the model (called under `torch.manual_seed(seed)` on every node;
    every node starts from rank 0's weights anyway), `loss_fn(output, target)` returns the
    mean loss of a batch, `dataset` is indexable (a `(inputs, targets)` tuple of tensors, a
    TensorDataset, or anything whose items `default_collate` stacks), `optimizer` an
    optimizer config ({"name": "sgd"|"adam"|"adamw", "lr": ..., torch.optim's settings}).

    **Job mode** (`python -m p2pdl node --lead --job module:task`): `spec` gives the runtime
    the data set size, global batch, learning rate and epochs; `setup(ctx)` registers the
    flat weights with `ctx.init_model` and points the model (and `partitions - 1` replica
    copies) at the runtime's weight buffer and at one gradient buffer each; `step(ctx,
    samples, lr)` runs the replicas' forward/backward in threads and leaves the **summed**
    per-sample gradient in every buffer. The runtime does phase 1 (sum of the replicas'
    buffers), phase 2 and the sharded optimizer.

    **Standalone** (:func:`train`, a blocking node): `setup(node)` builds the same and a
    :class:`ShardedOptimizer`; :meth:`local_step` does forward/backward and the sharded step.
    """

    model_fn: Callable[[], torch.nn.Module]
    loss_fn: Callable[[Any, Any], torch.Tensor]
    dataset: Any
    optimizer: Any = field(default_factory=lambda: {"name": "sgd", "lr": 0.1})
    partitions: int | None = None
    seed: int = 0
    strategy: str = "allreduce"
    eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None
    global_batch: int = 64
    epochs: int = 1
    lr_schedule: dict[str, Any] | None = None
    """A job LR schedule mapping (`LRSchedule` fields); default: constant `optimizer` lr."""

    def __post_init__(self) -> None:
        self.config = OptimizerConfig.of(self.optimizer)
        self.model: torch.nn.Module | None = None
        self.replicas: list[torch.nn.Module] = []
        self.flats: list[FlatParameters] = []
        self.sharded: ShardedOptimizer | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.dataset[0]) if isinstance(self.dataset, tuple) else len(self.dataset)

    @property
    def spec(self) -> dict[str, Any]:
        """The job spec the runtime's leader reads."""
        return {
            "dataset_size": len(self),
            "global_batch": self.global_batch,
            "lr": dict(self.lr_schedule) if self.lr_schedule else self.config.lr,
            "epochs": self.epochs,
            "seed": self.seed,
        }

    def runtime_optimizer(self) -> dict[str, Any]:
        """The optimizer config in the runtime's terms (`kind`; the lr comes from the job)."""
        c = self.config
        return {
            "kind": c.name,
            "momentum": c.momentum,
            "dampening": c.dampening,
            "nesterov": c.nesterov,
            "weight_decay": c.weight_decay,
            "betas": list(c.betas),
            "eps": c.eps,
            "amsgrad": c.amsgrad,
        }

    # ------------------------------------------------------------------------- set up
    def _seeded_model(self) -> torch.nn.Module:
        """`model_fn()` under `manual_seed(seed)`; the lock keeps nodes in threads apart."""
        with _SEED_LOCK:
            torch.manual_seed(self.seed)
            return self.model_fn()

    def _build(self, weights: torch.Tensor | None, grads: Sequence[torch.Tensor]) -> None:
        k = len(grads) if grads else (self.partitions or default_partitions())
        if k < 1:
            raise ValueError(f"partitions must be >= 1, got {k}")
        model = self._seeded_model()
        flat = FlatParameters(model, weights=weights, grads=grads[0] if grads else None)
        self.model = model
        self.replicas = [model]
        self.flats = [flat]
        for i in range(1, k):
            replica = copy.deepcopy(model)
            self.replicas.append(replica)
            self.flats.append(flat.replica(replica, grads[i] if grads else None))
        if k > 1 and self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(k - 1, thread_name_prefix="replica")

    def setup(self, ctx: Any) -> None:
        """Job mode with the runtime's `TaskContext`; standalone with a node (see the class)."""
        if hasattr(ctx, "init_model"):
            k = self.partitions or default_partitions()
            initial = FlatParameters(self._seeded_model()).weights_np
            if initial.dtype != np.float32:
                raise TypeError("job mode trains float32 models")
            ctx.init_model(initial, self.runtime_optimizer(), replicas=k)
            weights = torch.from_numpy(ctx.weights)
            self._build(weights, [torch.from_numpy(g) for g in ctx.grads])
            return
        node = getattr(ctx, "node", ctx) if not hasattr(ctx, "submit") else ctx
        self._build(None, ())
        self.sharded = ShardedOptimizer(
            self.config,
            self.flats[0],
            node,
            op="mean",
            strategy=self.strategy,
            broadcast=False,
            loop=getattr(ctx, "loop", None) if not hasattr(ctx, "submit") else None,
        )

    # ---------------------------------------------------------------------- the steps
    def _forward_backward(
        self, samples: Sequence[int], *, summed: bool = False
    ) -> tuple[float, int]:
        """Every replica's forward/backward on its share of `samples`: (loss sum, count).

        Gradients accumulate into the replicas' buffers: the gradient of the mean loss over
        `samples`, or (`summed`) of the sum of the per-sample losses.
        """
        k = len(self.replicas)
        shares = _split(samples, k)
        total = max(1, len(samples))

        def work(i: int) -> tuple[float, int]:
            idx = shares[i]
            if not idx:
                return 0.0, 0
            inputs, target = _batch(self.dataset, idx)
            replica = self.replicas[i]
            replica.train()
            loss = self.loss_fn(replica(inputs), target)
            (loss * (len(idx) if summed else len(idx) / total)).backward()
            return float(loss.detach()) * len(idx), len(idx)

        if k == 1:
            return work(0)
        assert self._pool is not None
        futures = [self._pool.submit(work, i) for i in range(1, k)]
        first = work(0)
        results = [first, *(f.result() for f in futures)]
        return sum(r[0] for r in results), sum(r[1] for r in results)

    def step(self, ctx: Any, samples: Any, lr: float) -> dict[str, Any]:
        """Job mode: overwrite every gradient buffer with the summed per-sample gradient.

        Returns {"loss": summed loss, "count": samples}. (With a node instead of the
        runtime's context this is :meth:`local_step`.)
        """
        if not hasattr(ctx, "init_model"):
            return self.local_step(ctx, samples, lr)
        for flat in self.flats:
            flat.zero_grad()
        indices = np.asarray(samples).tolist()
        loss_sum, count = self._forward_backward(indices, summed=True)
        return {"loss": loss_sum, "count": count}

    def _local_grads(self) -> list[torch.Tensor]:
        return [f.grads for f in self.flats[1:]]

    def local_step(self, node: Any, samples: Sequence[int], lr: float) -> dict[str, float]:
        """Standalone: forward/backward on this node's `samples`, then the sharded step."""
        assert self.sharded is not None, "setup(node) first"
        for f in self.flats:
            f.attach_grads()
        loss_sum, count = self._forward_backward(samples)
        self.sharded.runner.call(self.sharded.step_async(lr, self._local_grads()))
        return {"loss": loss_sum / max(1, count), "samples": float(count)}

    async def local_step_async(
        self, node: Any, samples: Sequence[int], lr: float
    ) -> dict[str, float]:
        """:meth:`local_step` from the node's own loop: compute in a thread, collective here."""
        assert self.sharded is not None, "setup(node) first"
        for f in self.flats:
            f.attach_grads()
        loop = asyncio.get_running_loop()
        loss_sum, count = await loop.run_in_executor(None, self._forward_backward, samples)
        await self.sharded.step_async(lr, self._local_grads())
        return {"loss": loss_sum / max(1, count), "samples": float(count)}

    def evaluate(self) -> dict[str, float]:
        if self.eval_fn is None or self.model is None:
            return {}
        self.model.eval()
        with torch.no_grad():
            return dict(self.eval_fn(self.model))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


# ------------------------------------------------------------------ standalone training loop
def sample_plan(
    n_samples: int, global_batch: int, step: int, world_size: int, seed: int = 0
) -> list[list[int]]:
    """The samples each rank uses at `step`: a seeded shuffle per epoch, cut into equal shares.

    Pure and identical on every rank (the runtime's planner does the same per group).
    """
    if global_batch < world_size:
        raise ValueError(f"global batch {global_batch} is smaller than {world_size} ranks")
    per_epoch = n_samples // global_batch
    if per_epoch < 1:
        raise ValueError(f"global batch {global_batch} exceeds the {n_samples} samples")
    epoch, within = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_samples)
    batch = order[within * global_batch : (within + 1) * global_batch].tolist()
    return _split(batch, world_size)


class Progress:
    """A one-line progress bar (steps, samples/s, loss) on stderr; plain lines when piped."""

    def __init__(self, total: int, stream: Any = None, every: float = 0.2) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every if self.tty else max(2.0, every)
        self.start = time.perf_counter()
        self._last = 0.0
        self._lock = threading.Lock()

    def update(self, step: int, samples: int, loss: float, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last < self.every and step < self.total:
            return
        self._last = now
        elapsed = max(now - self.start, 1e-9)
        width = 24
        filled = int(width * step / max(1, self.total))
        bar = "#" * filled + "-" * (width - filled)
        text = (
            f"[{bar}] {step}/{self.total} steps  {samples / elapsed:,.0f} samples/s  "
            f"loss {loss:.4f}"
        )
        with self._lock:
            if self.tty:
                self.stream.write("\r" + text + ("\n" if step >= self.total else ""))
            else:
                self.stream.write(text + "\n")
            self.stream.flush()


def train(
    task: TorchTask,
    node: Any,
    *,
    steps: int,
    global_batch: int,
    lr: float | Callable[[int], float] | None = None,
    progress: bool = False,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    start_step: int = 0,
) -> dict[str, float]:
    """Run `task` for `steps` steps on a blocking node, without the scheduling runtime.

    Each rank takes its share of every global batch from :func:`sample_plan`. Returns the
    throughput figures (samples/s counted over the whole cluster, wall time, last loss).
    """
    runner = _Runner(node)
    if task.sharded is None:
        task.setup(node)
        assert task.sharded is not None
        task.sharded.broadcast_weights()
    n = len(task)
    bar = Progress(steps) if progress and runner.rank == 0 else None
    begin = time.perf_counter()
    loss = float("nan")
    done = 0
    for step in range(start_step, start_step + steps):
        share = sample_plan(n, global_batch, step, runner.world_size, task.seed)[runner.rank]
        rate = lr(step) if callable(lr) else (lr if lr is not None else task.config.lr)
        metrics = task.local_step(node, share, rate)
        loss = metrics["loss"]
        done += 1
        if on_step is not None:
            on_step(step, metrics)
        if bar is not None:
            bar.update(done, done * global_batch, loss, force=done == steps)
    wall = time.perf_counter() - begin
    return {
        "steps": float(done),
        "samples_per_s": done * global_batch / max(wall, 1e-9),
        "wall_s": wall,
        "loss": loss,
    }

"""A model's parameters as views into one flat weight buffer, its gradients into another.

The collectives then read and write the model's memory directly, with no per-step copies.
Only the parameters are synchronised; module buffers (BatchNorm running statistics) stay
local to each replica.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["FlatParameters", "params_of", "to_numpy", "weights_digest"]


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
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


def params_of(source: Any) -> list[torch.nn.Parameter]:
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
        params = params_of(model)
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
        self.weights_np = to_numpy(self.weights)
        self.grads_np = to_numpy(self.grads)
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
    h = hashlib.sha256()
    if isinstance(model_or_flat, FlatParameters):
        h.update(model_or_flat.weights_np.tobytes())
    else:
        for p in params_of(model_or_flat):
            h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()

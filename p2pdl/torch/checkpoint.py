"""Checkpoints of a torch model (and its optimizer) that plain PyTorch can load."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from p2pdl.torch.attach import Attached
from p2pdl.torch.ddp import DistributedDataParallel
from p2pdl.torch.optim import ShardedOptimizer

__all__ = ["load_checkpoint", "save_checkpoint"]


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
        attached: Attached | None = optimizer.attached
    else:
        opt_state = optimizer.state_dict() if optimizer is not None else None
        attached = Attached(node) if node is not None else None
    rank = attached.rank if attached is not None else 0
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
    if attached is not None and attached.world_size > 1 and attached.can_block:
        attached.call(attached.node.barrier())


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

"""Boundary snapshots: in memory on every node, and on disk (atomically) on the leader.

A `Snapshot` is the full training state at a group boundary: the weights, the **full**
optimizer state (every slice: at a boundary the owners' slices are all-gathered, so every
node holds the whole of it and any new slicing can be served from any survivor), the
optimizer step count and the in-band sample accounting. Snapshots are immutable once taken.

On disk: `checkpoint.npz` in the checkpoint directory, written to a temporary file in the
same directory, fsync'ed, then `os.replace`d over the old one, so a crash leaves either the
old or the new checkpoint, never half of one. No pickle: arrays plus a JSON metadata blob.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from p2pdl.errors import ConfigError

__all__ = ["CHECKPOINT_NAME", "Snapshot", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_NAME = "checkpoint.npz"
FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Training state at the start of global step `step`."""

    step: int
    weights: np.ndarray
    state: dict[str, np.ndarray]
    opt_steps: int
    totals: np.ndarray
    """float64 [data epochs, 3]: samples, index sum, loss sum of the steps done so far."""

    def __post_init__(self) -> None:
        for array in (self.weights, self.totals, *self.state.values()):
            array.flags.writeable = False


def save_checkpoint(
    directory: str | os.PathLike[str], snap: Snapshot, meta: dict[str, Any]
) -> Path:
    """Write `snap` (+ `meta`, plain JSON types) atomically; returns the checkpoint path."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    info = {
        "version": FORMAT_VERSION,
        "step": snap.step,
        "opt_steps": snap.opt_steps,
        "state_names": sorted(snap.state),
        **meta,
    }
    arrays: dict[str, np.ndarray] = {
        "weights": snap.weights,
        "totals": snap.totals,
        "meta": np.frombuffer(json.dumps(info).encode(), dtype=np.uint8),
    }
    for name, array in snap.state.items():
        arrays[f"state_{name}"] = array
    target = folder / CHECKPOINT_NAME
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return target


def load_checkpoint(directory: str | os.PathLike[str]) -> tuple[Snapshot, dict[str, Any]]:
    """Read the checkpoint of `directory`: (snapshot, metadata); ConfigError if unusable."""
    path = Path(directory) / CHECKPOINT_NAME
    if not path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            weights = np.array(data["weights"], dtype=np.float32)
            totals = np.array(data["totals"], dtype=np.float64)
            state = {
                name: np.array(data[f"state_{name}"], dtype=np.float32)
                for name in meta["state_names"]
            }
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"--resume: cannot read {path}: {exc}") from None
    if meta.get("version") != FORMAT_VERSION:
        raise ConfigError(f"--resume: {path} has format {meta.get('version')!r}")
    snap = Snapshot(
        step=int(meta["step"]),
        weights=weights,
        state=state,
        opt_steps=int(meta["opt_steps"]),
        totals=totals,
    )
    return snap, meta

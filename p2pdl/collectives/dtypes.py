"""What a collective accepts: flat views of numpy arrays and CPU tensors, and the reductions.

Every collective turns its arguments into `Buffer`s first (a flat, C-contiguous numpy view
and the name of its element type), so the algorithms see numpy arrays only, whatever the
caller passed. bfloat16 has no numpy dtype: a torch bfloat16 tensor is viewed as uint16 words
of bf16 bits, and numpy callers wrap such words with `bf16_words(array)`. Data movement
(broadcast, gathers, scatters, all-to-all, point to point) takes any fixed-size element type;
reductions take the `REDUCIBLE` ones. Nothing here sends anything: every check runs before a
collective takes its operation number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from p2pdl import kernels

__all__ = [
    "FLOATS",
    "REDUCE_OPS",
    "REDUCIBLE",
    "Bf16Words",
    "Buffer",
    "as_buffer",
    "bf16_words",
    "check_reduction",
    "reduce_sources",
    "scale_buffer",
]

FLOATS = ("float16", "bfloat16", "float32", "float64")
REDUCIBLE = (*FLOATS, "int8", "uint8", "int16", "int32", "int64", "bool")
REDUCE_OPS = ("sum", "mean", "min", "max", "prod")
_ALIASES = {"avg": "mean", "product": "prod"}
_NAMES = {np.dtype(c).char: np.dtype(c).name for c in "efdbBhHiIlLqQ?"}
"""numpy's own element types by character: `dtype.name` costs microseconds per call."""


@dataclass(frozen=True, slots=True)
class Bf16Words:
    """A numpy uint16 array whose words are bfloat16 bits (numpy has no bfloat16 dtype)."""

    words: np.ndarray


def bf16_words(array: np.ndarray) -> Bf16Words:
    """Mark a uint16 numpy array as bfloat16 bits, for reductions in bfloat16."""
    if not isinstance(array, np.ndarray) or array.dtype != np.uint16:
        raise TypeError(f"bf16_words takes a uint16 numpy array, got {_describe(array)}")
    return Bf16Words(array)


@dataclass(frozen=True, slots=True)
class Buffer:
    """A flat numpy view of the caller's memory and its element type's name."""

    array: np.ndarray
    kind: str
    """"float32", "bfloat16" (uint16 words), "int64", "bool", ... (numpy's names)."""

    @property
    def size(self) -> int:
        return int(self.array.size)

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    @property
    def signature(self) -> str:
        """The element type and size, as descriptors name them."""
        return f"{self.kind}[{self.array.size}]"

    def bytes(self) -> np.ndarray:
        """The same memory as flat uint8."""
        return self.array.view(np.uint8)


def _describe(array: object) -> str:
    dtype = getattr(array, "dtype", None)
    return f"{type(array).__name__} of {dtype}" if dtype is not None else type(array).__name__


def as_buffer(array: Any, what: str = "array", *, writable: bool = True) -> Buffer:
    """`array` (numpy array, `Bf16Words` or CPU tensor, C-contiguous) as a flat `Buffer`.

    TypeError for other objects, tensors off the CPU and object dtypes; ValueError for
    non-contiguous or (when `writable`) read-only memory."""
    kind = None
    if isinstance(array, Bf16Words):
        array, kind = array.words, "bfloat16"
    elif not isinstance(array, np.ndarray):
        array, kind = _tensor_view(array, what)
    dtype = array.dtype
    if dtype.hasobject or dtype.itemsize == 0:
        raise TypeError(f"{what} has dtype {dtype}, which holds no plain values")
    if not dtype.isnative:
        raise TypeError(f"{what} has dtype {dtype}, not in this machine's byte order")
    if not array.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous")
    if writable and not array.flags.writeable:
        raise ValueError(f"{what} must be writable (the result is written in place)")
    return Buffer(array.reshape(-1), kind or _NAMES.get(dtype.char) or dtype.name)


def _tensor_view(tensor: Any, what: str) -> tuple[np.ndarray, str | None]:
    refused = f"{what} must be a numpy array or a torch CPU tensor, got {_describe(tensor)}"
    if not type(tensor).__module__.startswith("torch"):
        raise TypeError(refused)
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise TypeError(refused)
    if tensor.device.type != "cpu":
        raise TypeError(f"{what} must be a CPU tensor, got one on {tensor.device}")
    if tensor.layout != torch.strided:
        raise TypeError(f"{what} must be a dense tensor, got {tensor.layout}")
    if not tensor.is_contiguous():
        raise ValueError(f"{what} must be contiguous")
    flat = tensor.detach().reshape(-1)
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.uint16).numpy(), "bfloat16"
    try:
        return flat.numpy(), None
    except TypeError:  # an element type numpy lacks (float8, ...): its bytes, named by torch
        return flat.view(torch.uint8).numpy(), str(flat.dtype).removeprefix("torch.")


def check_reduction(
    kind: str, op: object, premul: object = None, compression: str | None = None
) -> str:
    """The canonical op for reducing `kind` with `op` (aliases "avg", "product"), or raise.

    mean needs a float type (an integer mean would have to round: sum and divide instead);
    `premul` (torch's PREMUL_SUM factor) needs op "sum" and a float type; compression needs
    a float32 sum or mean."""
    if not isinstance(op, str) or _ALIASES.get(op, op) not in REDUCE_OPS:
        raise ValueError(f"op must be one of {REDUCE_OPS} (or 'avg', 'product'), got {op!r}")
    op = _ALIASES.get(op, op)
    if kind not in REDUCIBLE:
        raise TypeError(f"cannot reduce {kind}: reductions take {', '.join(REDUCIBLE)}")
    if op == "mean" and kind not in FLOATS:
        raise TypeError(f"op 'mean' needs a float dtype, got {kind} (sum, then divide)")
    if premul is not None:
        if isinstance(premul, bool) or not isinstance(premul, (int, float, np.floating)):
            raise TypeError(f"premul must be a real number, got {premul!r}")
        if op != "sum":
            raise ValueError(f"premul multiplies the inputs of a sum, not of {op!r}")
        if kind not in FLOATS:
            raise TypeError(f"premul needs a float dtype, got {kind}")
    if compression is not None:
        if op not in ("sum", "mean") or kind not in FLOATS:
            raise ValueError(f"compression is for float sums and means, not {op} of {kind}")
        if kind != "float32":
            raise TypeError(f"{compression} compression needs float32 buffers, got {kind}")
    return op


def reduce_sources(
    dst: np.ndarray, sources: list[np.ndarray], op: str, kind: str, parallel: bool | None
) -> None:
    """dst = sources[0] op sources[1] op ... left to right (`dst` may be one of them)."""
    if kind == "bfloat16":
        kernels.reduce_into_bf16(dst, sources, "sum" if op == "mean" else op, parallel=parallel)
    else:
        kernels.reduce_into(dst, sources, "sum" if op == "mean" else op, parallel=parallel)


def scale_buffer(buf: np.ndarray, kind: str, alpha: float, parallel: bool | None = None) -> None:
    """buf *= alpha in place (16-bit floats computed in float32, rounded once)."""
    if kind == "bfloat16":
        kernels.scale_bf16(buf, alpha, parallel=parallel)
    else:
        kernels.scale_(buf, alpha, parallel=parallel)

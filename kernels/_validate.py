"""Argument checks shared by the public wrappers.

They turn anything a kernel's signature would reject into a plain ``TypeError`` (wrong kind or
dtype) or ``ValueError`` (layout, size, read-only, overlap), so users never meet a Numba typing
error.  Arrays of any shape are accepted if C-contiguous and are flattened as views.  The checks
are a handful of attribute reads each: these wrappers sit on the per-step critical path.
"""

from __future__ import annotations

import numpy as np

#: dtype character -> name, for every dtype some wrapper accepts ("q" is an alias of int64).
_NAMES = {c: np.dtype(c).name for c in "fdeHbBhilq?"}
#: dtype character -> every accepted character of the same dtype (e.g. int64: "l" and "q").
_SAME = {c: "".join(d for d in _NAMES if np.dtype(d) == np.dtype(c)) for c in _NAMES}


def _describe(chars: str) -> str:
    names = list(dict.fromkeys(_NAMES[c] for c in chars))
    return " or ".join(names) if len(names) <= 2 else "one of " + ", ".join(names)


def flat(a: object, name: str, chars: str, writeable: bool = False) -> np.ndarray:
    """Return ``a`` as a 1-D view after checking type, dtype, contiguity and writeability."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    dt = a.dtype
    if dt.char not in chars or not dt.isnative:
        raise TypeError(f"{name} must have dtype {_describe(chars)} (native order), got {dt}")
    flags = a.flags
    if not flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if writeable and not flags.writeable:
        raise ValueError(f"{name} is read-only")
    if a.ndim != 1:
        a = a.reshape(-1)
    return a


def like(
    a: object, name: str, ref: np.ndarray, ref_name: str, writeable: bool = False
) -> np.ndarray:
    """Check ``a`` like :func:`flat` and require the dtype and size of ``ref``."""
    a = flat(a, name, _SAME[ref.dtype.char], writeable)
    if a.size != ref.size:
        raise ValueError(f"{name} has {a.size} elements but {ref_name} has {ref.size}")
    return a


def same_size(a: np.ndarray, name: str, ref: np.ndarray, ref_name: str) -> None:
    if a.size != ref.size:
        raise ValueError(f"{name} has {a.size} elements but {ref_name} has {ref.size}")


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def no_partial_overlap(dst: np.ndarray, dst_name: str, src: np.ndarray, src_name: str) -> None:
    """Allow ``src`` to be exactly ``dst`` (same memory) but not to overlap it otherwise."""
    if src is dst or not np.may_share_memory(dst, src):
        return
    if _address(dst) == _address(src) and dst.nbytes == src.nbytes:
        return
    raise ValueError(
        f"{src_name} partially overlaps {dst_name}; only the very same buffer is allowed"
    )


def no_overlap(dst: np.ndarray, dst_name: str, src: np.ndarray, src_name: str) -> None:
    """Require ``dst`` and ``src`` to share no memory at all."""
    if np.may_share_memory(dst, src):
        raise ValueError(f"{src_name} and {dst_name} must not share memory")


def real(x: object, name: str) -> float:
    """A Python float from a real number (bools and non-numbers are refused)."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    return float(x)

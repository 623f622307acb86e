"""Lazy compilation of explicitly typed Numba kernels, and the serial/parallel switch.

Every kernel is compiled from an explicit signature (contiguous 1-D arrays, ``f4[::1]``-style),
with ``nogil=True`` so it runs in worker threads beside the event loop, and ``cache=True`` so a
second process loads it from ``__pycache__``.  Compilation happens on first use of a
(kernel, dtype) pair rather than at import: importing the package stays cheap and a process only
pays for the kernels it calls.  :func:`precompile` compiles everything up front.

Above :func:`parallel_threshold` elements a wrapper runs the ``parallel=True`` variant (``prange``
over blocks, thread count from ``numba.set_num_threads``); below it, the serial one.  Parallel
launches are serialised by a process-wide lock: each one already uses every Numba thread, and two
at once would only oversubscribe the cores.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from numba import types as nt
from numba.typed import List

DISABLE_JIT: bool = bool(numba.config.DISABLE_JIT)

#: Options shared by every public kernel.  ``error_model="numpy"`` keeps divisions free of
#: Python's zero check so loops vectorise; ``boundscheck`` stays off (wrappers check sizes).
KERNEL_OPTS: dict[str, Any] = {"nogil": True, "cache": True, "error_model": "numpy"}
#: Options for helpers that are only called from kernels (compiled into their callers).
INNER_OPTS: dict[str, Any] = {"nogil": True, "error_model": "numpy"}

#: Elements per ``prange`` iteration in parallel kernels (256 KiB of float32).
BLOCK = 1 << 16

FLOAT_TYPES = {"f": nt.float32, "d": nt.float64}


def array(dtype: nt.Type, readonly: bool = False) -> nt.Array:
    """Numba type of a C-contiguous 1-D array (``readonly`` ones also accept writeable arrays)."""
    return nt.Array(dtype, 1, "C", readonly=readonly)


def _default_threshold() -> int:
    raw = os.environ.get("P2PDL_KERNEL_PARALLEL_MIN", "")
    return int(raw) if raw.isdigit() else 1 << 20


_parallel_min: int = _default_threshold()
_parallel_lock = threading.Lock()


def parallel_threshold() -> int:
    """Element count from which wrappers pick the multi-threaded kernel when not told."""
    return _parallel_min


def set_parallel_threshold(n: int) -> None:
    """Set the element count from which wrappers use the multi-threaded kernels.

    ``0`` always uses them; a huge value never does.  Also read at import from
    ``P2PDL_KERNEL_PARALLEL_MIN``.
    """
    global _parallel_min
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"threshold must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"threshold must be >= 0, got {n}")
    _parallel_min = int(n)


class _Table(dict):
    """dtype key -> dispatcher; compiles ``fn`` for that key's signature on first lookup."""

    def __init__(self, fn: Callable[..., None], sigs: dict[str, Any], parallel: bool) -> None:
        super().__init__()
        self.fn = fn
        self.sigs = sigs
        self.parallel = parallel

    def __missing__(self, key: str) -> Callable[..., None]:
        disp = numba.njit(self.sigs[key], parallel=self.parallel, **KERNEL_OPTS)(self.fn)
        self[key] = disp
        return disp


class Kernel:
    """A serial and a parallel implementation of one kernel, compiled lazily per dtype key."""

    __slots__ = ("parallel", "serial")

    def __init__(
        self, serial: Callable[..., None], parallel: Callable[..., None], sigs: dict[str, Any]
    ) -> None:
        self.serial = _Table(serial, sigs, parallel=False)
        self.parallel = _Table(parallel, sigs, parallel=True)


_ALL: list[Kernel] = []


def kernel(
    serial: Callable[..., None], parallel: Callable[..., None], sigs: dict[str, Any]
) -> Kernel:
    """Register a kernel pair (distinct Python functions, so their cache entries never mix)."""
    k = Kernel(serial, parallel, sigs)
    _ALL.append(k)
    return k


def typed_list(list_type: nt.ListType, items: list) -> Any:
    """``items`` as a Numba typed list of ``list_type`` (a plain list when the JIT is off).

    Building one costs a few microseconds per item: callers keep it for the k-way paths.
    """
    if DISABLE_JIT:
        return items
    typed = List.empty_list(list_type.item_type)
    for x in items:
        typed.append(x)
    return typed


def run(k: Kernel, key: str, n: int, parallel: bool | None, *args: Any) -> None:
    """Run ``k`` for dtype ``key`` on ``n`` elements, multi-threaded if asked or if large."""
    if parallel is None:
        parallel = n >= _parallel_min
    if parallel:
        with _parallel_lock:
            k.parallel[key](*args)
    else:
        k.serial[key](*args)


def precompile(parallel: bool = True) -> int:
    """Compile (or load from cache) every kernel for every dtype; return how many."""
    count = 0
    for k in _ALL:
        tables = (k.serial, k.parallel) if parallel else (k.serial,)
        for table in tables:
            for key in table.sigs:
                table[key]
                count += 1
    return count

"""Elementwise arithmetic on flat float32/float64 buffers: add, one-pass sum, scale, axpy.

``sum_into`` is phase 1 of the two-phase AllReduce (summing the gradients of local replicas): it
reads every source once and writes the destination once, instead of the k-1 passes that chained
``np.add`` calls make.  Sums are formed left to right, ``((s0 + s1) + s2) + ...``, so results are
bit-identical to sequential ``np.add``.  ``scale_`` also takes float16 buffers (computed in
float32, rounded once): the second half of a mean over float16 gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit, prange
from numba import types as nt

from . import _validate as v
from ._jit import BLOCK, FLOAT_TYPES, INNER_OPTS, array, kernel, run, typed_list
from .compress import FP16, scale16

#: Elements per cache block when summing more than four sources (16 KiB of float32).
CACHE_BLOCK = 4096

# --- inner loops (0-based over whole argument arrays, so LLVM vectorises them) -----------------


@njit(**INNER_OPTS)
def _add_vec(d, s):
    for i in range(d.size):
        d[i] += s[i]


@njit(**INNER_OPTS)
def _sum2_vec(d, a, b):
    for i in range(d.size):
        d[i] = a[i] + b[i]


@njit(**INNER_OPTS)
def _sum3_vec(d, a, b, c):
    for i in range(d.size):
        d[i] = a[i] + b[i] + c[i]


@njit(**INNER_OPTS)
def _sum4_vec(d, a, b, c, e):
    for i in range(d.size):
        d[i] = a[i] + b[i] + c[i] + e[i]


@njit(**INNER_OPTS)
def _acc2_vec(d, a, b):
    for i in range(d.size):
        d[i] = d[i] + a[i] + b[i]


@njit(**INNER_OPTS)
def _acc3_vec(d, a, b, c):
    for i in range(d.size):
        d[i] = d[i] + a[i] + b[i] + c[i]


@njit(**INNER_OPTS)
def _copy_vec(d, s):
    for i in range(d.size):
        d[i] = s[i]


@njit(**INNER_OPTS)
def _sumk_range(dst, srcs, lo, hi):
    """Sum any number of sources over [lo, hi), one cache block at a time.

    The running sum lives in a block-sized scratch buffer that stays in L1 and is copied to
    ``dst`` last, so ``dst`` may be any one of ``srcs``, and no loop ever sees the same buffer
    through two arguments (which would defeat LLVM's vectorisation: its alias checks fail).
    """
    k = len(srcs)
    tmp = np.empty(min(CACHE_BLOCK, hi - lo), dst.dtype)
    for b0 in range(lo, hi, CACHE_BLOCK):
        b1 = min(b0 + CACHE_BLOCK, hi)
        t = tmp[: b1 - b0]
        if k == 1:
            _copy_vec(t, srcs[0][b0:b1])
        elif k == 2:
            _sum2_vec(t, srcs[0][b0:b1], srcs[1][b0:b1])
        elif k == 3:
            _sum3_vec(t, srcs[0][b0:b1], srcs[1][b0:b1], srcs[2][b0:b1])
        else:
            _sum4_vec(t, srcs[0][b0:b1], srcs[1][b0:b1], srcs[2][b0:b1], srcs[3][b0:b1])
        j = 4
        while j < k:
            r = k - j
            if r == 1:
                _add_vec(t, srcs[j][b0:b1])
            elif r == 2:
                _acc2_vec(t, srcs[j][b0:b1], srcs[j + 1][b0:b1])
            else:
                _acc3_vec(t, srcs[j][b0:b1], srcs[j + 1][b0:b1], srcs[j + 2][b0:b1])
            j += 3
        _copy_vec(dst[b0:b1], t)


@njit(**INNER_OPTS)
def _scale_vec(d, alpha):
    for i in range(d.size):
        d[i] *= alpha


@njit(**INNER_OPTS)
def _add_copy_vec(d, s, o):
    for i in range(d.size):
        x = d[i] + s[i]
        d[i] = x
        o[i] = x


@njit(**INNER_OPTS)
def _axpy_vec(d, alpha, s):
    for i in range(d.size):
        d[i] += alpha * s[i]


# --- kernels: a serial and a parallel (prange over blocks) function for each -----------------


def _add_s(d, s):
    _add_vec(d, s)


def _add_p(d, s):
    n = d.size
    for b in prange((n + BLOCK - 1) // BLOCK):
        lo = b * BLOCK
        hi = min(lo + BLOCK, n)
        _add_vec(d[lo:hi], s[lo:hi])


def _add_copy_s(d, s, o):
    _add_copy_vec(d, s, o)


def _add_copy_p(d, s, o):
    n = d.size
    for b in prange((n + BLOCK - 1) // BLOCK):
        lo = b * BLOCK
        hi = min(lo + BLOCK, n)
        _add_copy_vec(d[lo:hi], s[lo:hi], o[lo:hi])


def _sum2_s(d, a, b):
    _sum2_vec(d, a, b)


def _sum2_p(d, a, b):
    n = d.size
    for k in prange((n + BLOCK - 1) // BLOCK):
        lo = k * BLOCK
        hi = min(lo + BLOCK, n)
        _sum2_vec(d[lo:hi], a[lo:hi], b[lo:hi])


def _sum3_s(d, a, b, c):
    _sum3_vec(d, a, b, c)


def _sum3_p(d, a, b, c):
    n = d.size
    for k in prange((n + BLOCK - 1) // BLOCK):
        lo = k * BLOCK
        hi = min(lo + BLOCK, n)
        _sum3_vec(d[lo:hi], a[lo:hi], b[lo:hi], c[lo:hi])


def _sum4_s(d, a, b, c, e):
    _sum4_vec(d, a, b, c, e)


def _sum4_p(d, a, b, c, e):
    n = d.size
    for k in prange((n + BLOCK - 1) // BLOCK):
        lo = k * BLOCK
        hi = min(lo + BLOCK, n)
        _sum4_vec(d[lo:hi], a[lo:hi], b[lo:hi], c[lo:hi], e[lo:hi])


def _acc2_s(d, a, b):
    _acc2_vec(d, a, b)


def _acc2_p(d, a, b):
    n = d.size
    for k in prange((n + BLOCK - 1) // BLOCK):
        lo = k * BLOCK
        hi = min(lo + BLOCK, n)
        _acc2_vec(d[lo:hi], a[lo:hi], b[lo:hi])


def _acc3_s(d, a, b, c):
    _acc3_vec(d, a, b, c)


def _acc3_p(d, a, b, c):
    n = d.size
    for k in prange((n + BLOCK - 1) // BLOCK):
        lo = k * BLOCK
        hi = min(lo + BLOCK, n)
        _acc3_vec(d[lo:hi], a[lo:hi], b[lo:hi], c[lo:hi])


def _sumk_s(d, srcs):
    _sumk_range(d, srcs, 0, d.size)


def _sumk_p(d, srcs):
    n = d.size
    for k in prange((n + BLOCK - 1) // BLOCK):
        lo = k * BLOCK
        _sumk_range(d, srcs, lo, min(lo + BLOCK, n))


def _scale_s(d, alpha):
    _scale_vec(d, alpha)


def _scale_p(d, alpha):
    n = d.size
    for b in prange((n + BLOCK - 1) // BLOCK):
        lo = b * BLOCK
        _scale_vec(d[lo : min(lo + BLOCK, n)], alpha)


def _axpy_s(d, alpha, s):
    _axpy_vec(d, alpha, s)


def _axpy_p(d, alpha, s):
    n = d.size
    for b in prange((n + BLOCK - 1) // BLOCK):
        lo = b * BLOCK
        hi = min(lo + BLOCK, n)
        _axpy_vec(d[lo:hi], alpha, s[lo:hi])


def _sigs(make):
    return {ch: make(t, array(t), array(t, True)) for ch, t in FLOAT_TYPES.items()}


_RO_LIST = {ch: nt.ListType(array(t, True)) for ch, t in FLOAT_TYPES.items()}

_ADD = kernel(_add_s, _add_p, _sigs(lambda t, w, r: nt.void(w, r)))
_ADD_COPY = kernel(_add_copy_s, _add_copy_p, _sigs(lambda t, w, r: nt.void(w, r, w)))
_SUM2 = kernel(_sum2_s, _sum2_p, _sigs(lambda t, w, r: nt.void(w, r, r)))
_SUM3 = kernel(_sum3_s, _sum3_p, _sigs(lambda t, w, r: nt.void(w, r, r, r)))
_SUM4 = kernel(_sum4_s, _sum4_p, _sigs(lambda t, w, r: nt.void(w, r, r, r, r)))
_ACC2 = kernel(_acc2_s, _acc2_p, _sigs(lambda t, w, r: nt.void(w, r, r)))
_ACC3 = kernel(_acc3_s, _acc3_p, _sigs(lambda t, w, r: nt.void(w, r, r, r)))
_SUMK = kernel(
    _sumk_s, _sumk_p, {ch: nt.void(array(t), _RO_LIST[ch]) for ch, t in FLOAT_TYPES.items()}
)
_SCALE = kernel(_scale_s, _scale_p, _sigs(lambda t, w, r: nt.void(w, t)))
_AXPY = kernel(_axpy_s, _axpy_p, _sigs(lambda t, w, r: nt.void(w, t, r)))

# --- public wrappers --------------------------------------------------------------------------


def add_(dst: np.ndarray, src: np.ndarray, *, parallel: bool | None = None) -> None:
    """``dst += src`` in place (float32 or float64, same dtype and size).

    ``src`` may be ``dst`` itself but must not otherwise overlap it.  ``parallel``: ``None``
    picks the multi-threaded kernel from :func:`parallel_threshold` elements on; ``True`` /
    ``False`` force it on or off.
    """
    dst = v.flat(dst, "dst", "fd", True)
    src = v.like(src, "src", dst, "dst")
    v.no_partial_overlap(dst, "dst", src, "src")
    run(_ADD, dst.dtype.char, dst.size, parallel, dst, src)


def add_copy_(
    dst: np.ndarray, src: np.ndarray, out: np.ndarray, *, parallel: bool | None = None
) -> None:
    """``dst += src`` and ``out[:] = dst`` in one pass (float32 or float64, same dtype and
    size): a sum that two places need is read once, not written and read back.

    ``src`` may be ``dst`` itself but must not otherwise overlap it; ``out`` must share no
    memory with either.  ``parallel`` as for :func:`add_`.
    """
    dst = v.flat(dst, "dst", "fd", True)
    src = v.like(src, "src", dst, "dst")
    out = v.like(out, "out", dst, "dst", True)
    v.no_partial_overlap(dst, "dst", src, "src")
    v.no_overlap(out, "out", dst, "dst")
    v.no_overlap(out, "out", src, "src")
    run(_ADD_COPY, dst.dtype.char, dst.size, parallel, dst, src, out)


def sum_into(dst: np.ndarray, srcs: Sequence[np.ndarray], *, parallel: bool | None = None) -> None:
    """``dst = srcs[0] + srcs[1] + ... + srcs[k-1]`` in one pass over memory (k >= 1).

    ``dst`` may be one of ``srcs`` (the very same buffer) and must not otherwise overlap them;
    sources may overlap each other.  Specialised kernels serve k <= 4 with ``dst`` distinct from
    the sources or equal to ``srcs[0]`` (the usual phase-1 case: sum into the first replica's
    buffer); larger k, or ``dst`` being a later source, walks all sources per cache block
    through an L1 scratch block (paying a few microseconds to build a typed list of them).
    """
    dst = v.flat(dst, "dst", "fd", True)
    if isinstance(srcs, np.ndarray) or not isinstance(srcs, (list, tuple)):
        raise TypeError(f"srcs must be a list or tuple of arrays, got {type(srcs).__name__}")
    k = len(srcs)
    if k == 0:
        raise ValueError("srcs must hold at least one array")
    flat = []
    alias = -1  # index of the source that is dst itself, if any
    for j, s in enumerate(srcs):
        name = f"srcs[{j}]"
        s = v.like(s, name, dst, "dst")
        if s is dst or np.may_share_memory(dst, s):
            v.no_partial_overlap(dst, "dst", s, name)
            alias = j
        flat.append(s)
    sum_flat(dst, flat, alias, parallel)


def sum_flat(dst: np.ndarray, flat: list, alias: int, parallel: bool | None) -> None:
    """:func:`sum_into` on checked 1-D arrays; ``alias`` is the index of ``dst`` among them."""
    k = len(flat)
    key = dst.dtype.char
    n = dst.size
    if alias > 0 or k > 4:
        _sum_general(key, n, parallel, dst, flat)
    elif alias == 0:  # dst is srcs[0]: accumulate the rest into it
        if k == 2:
            run(_ADD, key, n, parallel, dst, flat[1])
        elif k == 3:
            run(_ACC2, key, n, parallel, dst, flat[1], flat[2])
        elif k == 4:
            run(_ACC3, key, n, parallel, dst, flat[1], flat[2], flat[3])
    elif k == 1:
        np.copyto(dst, flat[0])
    elif k == 2:
        run(_SUM2, key, n, parallel, dst, flat[0], flat[1])
    elif k == 3:
        run(_SUM3, key, n, parallel, dst, flat[0], flat[1], flat[2])
    else:
        run(_SUM4, key, n, parallel, dst, flat[0], flat[1], flat[2], flat[3])


def _sum_general(key: str, n: int, parallel: bool | None, dst: np.ndarray, flat: list) -> None:
    run(_SUMK, key, n, parallel, dst, typed_list(_RO_LIST[key], flat))


def scale_(buf: np.ndarray, alpha: float, *, parallel: bool | None = None) -> None:
    """``buf *= alpha`` in place (alpha rounded to the buffer's dtype, as NumPy does).

    float16 buffers are computed in float32 (alpha rounded to float32) and rounded once back to
    float16, as a mean of float16 gradients needs; :func:`scale_bf16` does the same for bf16.
    """
    buf = v.flat(buf, "buf", "fde", True)
    alpha = v.real(alpha, "alpha")
    if buf.dtype.char == "e":
        scale16(buf.view(np.uint16), alpha, FP16, parallel)
    else:
        run(_SCALE, buf.dtype.char, buf.size, parallel, buf, alpha)


def axpy_(dst: np.ndarray, alpha: float, src: np.ndarray, *, parallel: bool | None = None) -> None:
    """``dst += alpha * src`` in place; ``src`` may be ``dst`` itself, not overlap it otherwise."""
    dst = v.flat(dst, "dst", "fd", True)
    src = v.like(src, "src", dst, "dst")
    alpha = v.real(alpha, "alpha")
    v.no_partial_overlap(dst, "dst", src, "src")
    run(_AXPY, dst.dtype.char, dst.size, parallel, dst, alpha, src)

"""Reductions of k buffers into one, for every dtype and op that torch.distributed reduces.

``reduce_into(dst, sources, op)`` forms ``((s0 op s1) op s2) ...`` strictly left to right, so
results are bit-identical to chained NumPy ufuncs (``np.add``, ``np.multiply``, ``np.minimum``,
``np.maximum``), and reads every source once and writes ``dst`` once.  Integers wrap around on
overflow; bool ``sum``/``prod`` are logical or/and (NCCL's convention); float ``min``/``max``
propagate NaN and, on ties (``-0.0`` vs ``0.0``), give the right operand, as NumPy does.
float16 and bfloat16 (uint16 words) accumulate in float32 and round once at the end.

Each kernel takes the op (and, for 16-bit words, the format) as a runtime code and branches on
it outside its loops, so one compiled variant per (kernel, dtype) serves every op.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit, prange
from numba import types as nt

from . import _validate as v
from ._jit import BLOCK, FLOAT_TYPES, INNER_OPTS, array, kernel, run, typed_list
from .arith import CACHE_BLOCK, _copy_vec, sum_flat
from .compress import BF16, FP16, dec16_vec, enc16_vec

SUM, PROD, MIN, MAX = 0, 1, 2, 3
OPS = {"sum": SUM, "prod": PROD, "min": MIN, "max": MAX}

#: Element types of the kernels on plain arrays, keyed by dtype character.
PLAIN_TYPES = {
    np.dtype(np.float32).char: nt.float32,
    np.dtype(np.float64).char: nt.float64,
    np.dtype(np.int8).char: nt.int8,
    np.dtype(np.uint8).char: nt.uint8,
    np.dtype(np.int16).char: nt.int16,
    np.dtype(np.int32).char: nt.int32,
    np.dtype(np.int64).char: nt.int64,
}
_F16 = np.dtype(np.float16).char
_BOOL = np.dtype(np.bool_).char
#: Accepted dtype characters (with aliases such as "q" for int64) -> kernel key.
_KEYS = {c: np.dtype(np.dtype(c).str).char for c in "fdebBhilq?"}
_ACCEPT = "".join(_KEYS)
#: Keys whose ops are exact (associative and commutative): dst may go first in any order.
_EXACT = "".join(np.dtype(t).char for t in (np.int8, np.uint8, np.int16, np.int32, np.int64))

# --- element op and loops -----------------------------------------------------------------------


@njit(**INNER_OPTS)
def _comb(x, y, op):
    """``x op y``; min/max as np.minimum/np.maximum: a NaN ``x`` wins, then a NaN ``y``, and a
    tie gives ``y``.  Small integers compute in int64 and wrap when stored."""
    if op == SUM:
        return x + y
    if op == PROD:
        return x * y
    if op == MIN:
        return x if (x < y) | (x != x) else y
    return x if (x > y) | (x != x) else y


@njit(**INNER_OPTS)
def _fold(x0, x1, x2, x3, k, op):
    """``x0 op x1 op x2 op x3`` over the first ``k`` (2..4) of them, left to right."""
    y = _comb(x0, x1, op)
    if k > 2:
        y = _comb(y, x2, op)
    if k > 3:
        y = _comb(y, x3, op)
    return y


# The ``*_vec`` dispatchers branch on the op once and inline the loop functions with it as a
# constant, so each loop is branch-free and vectorises (k and r are constant per loop already).


@njit(inline="always", **INNER_OPTS)
def _first_loops(d, a, b, c, e, k, op):
    n = d.size
    if k == 2:
        for i in range(n):
            d[i] = _comb(a[i], b[i], op)
    elif k == 3:
        for i in range(n):
            d[i] = _fold(a[i], b[i], c[i], c[i], 3, op)
    else:
        for i in range(n):
            d[i] = _fold(a[i], b[i], c[i], e[i], 4, op)


@njit(inline="always", **INNER_OPTS)
def _acc_loops(d, a, b, c, k, op):
    n = d.size
    if k == 2:
        for i in range(n):
            d[i] = _comb(d[i], a[i], op)
    elif k == 3:
        for i in range(n):
            d[i] = _fold(d[i], a[i], b[i], b[i], 3, op)
    else:
        for i in range(n):
            d[i] = _fold(d[i], a[i], b[i], c[i], 4, op)


@njit(inline="always", **INNER_OPTS)
def _pos_loops(d, a, b, c, k, r, op):
    n = d.size
    if k == 2:
        for i in range(n):
            d[i] = _comb(a[i], d[i], op)
    elif k == 3:
        if r == 1:
            for i in range(n):
                d[i] = _fold(a[i], d[i], b[i], b[i], 3, op)
        else:
            for i in range(n):
                d[i] = _fold(a[i], b[i], d[i], d[i], 3, op)
    elif r == 1:
        for i in range(n):
            d[i] = _fold(a[i], d[i], b[i], c[i], 4, op)
    elif r == 2:
        for i in range(n):
            d[i] = _fold(a[i], b[i], d[i], c[i], 4, op)
    else:
        for i in range(n):
            d[i] = _fold(a[i], b[i], c[i], d[i], 4, op)


@njit(**INNER_OPTS)
def _first_vec(d, a, b, c, e, k, op):
    """``d = a op b op c op e`` over the first ``k`` (2..4); ``d`` is none of the sources."""
    if op == SUM:
        _first_loops(d, a, b, c, e, k, SUM)
    elif op == PROD:
        _first_loops(d, a, b, c, e, k, PROD)
    elif op == MIN:
        _first_loops(d, a, b, c, e, k, MIN)
    else:
        _first_loops(d, a, b, c, e, k, MAX)


@njit(**INNER_OPTS)
def _acc_vec(d, a, b, c, k, op):
    """``d = d op a op b op c`` over the first ``k`` (2..4) operands, ``d`` included."""
    if op == SUM:
        _acc_loops(d, a, b, c, k, SUM)
    elif op == PROD:
        _acc_loops(d, a, b, c, k, PROD)
    elif op == MIN:
        _acc_loops(d, a, b, c, k, MIN)
    else:
        _acc_loops(d, a, b, c, k, MAX)


@njit(**INNER_OPTS)
def _pos_vec(d, a, b, c, k, r, op):
    """``d = s0 op ... op s{k-1}`` (k in 2..4) where ``d`` itself is ``s{r}``, r >= 1, and
    ``a, b, c`` are the other sources in order: ``d`` is read once per element, just before it
    is written, and is the only argument written, so the loop vectorises wherever ``d`` sits.
    (Integers never need it: their ops are exact, so ``d`` can go first.)"""
    if op == SUM:
        _pos_loops(d, a, b, c, k, r, SUM)
    elif op == PROD:
        _pos_loops(d, a, b, c, k, r, PROD)
    elif op == MIN:
        _pos_loops(d, a, b, c, k, r, MIN)
    else:
        _pos_loops(d, a, b, c, k, r, MAX)


@njit(**INNER_OPTS)
def _list_range(dst, srcs, lo, hi, op):
    """``dst = srcs[0] op ... op srcs[k-1]`` over [lo, hi) for k > 4, one cache block at a time.

    As in ``_sumk_range``, the running result lives in an L1 scratch block copied to ``dst``
    last, so ``dst`` may be any one of the sources and no loop sees the same buffer through two
    arguments (which would defeat vectorisation).
    """
    k = len(srcs)
    tmp = np.empty(min(CACHE_BLOCK, hi - lo), dst.dtype)
    for b0 in range(lo, hi, CACHE_BLOCK):
        b1 = min(b0 + CACHE_BLOCK, hi)
        t = tmp[: b1 - b0]
        _copy_vec(t, srcs[0][b0:b1])  # one L1 pass more, one loop family less to compile
        _acc_vec(t, srcs[1][b0:b1], srcs[2][b0:b1], srcs[3][b0:b1], 4, op)
        for j in range(4, k, 3):
            r = min(k - j, 3)  # t op srcs[j] [op srcs[j+1] [op srcs[j+2]]]
            a = srcs[j][b0:b1]
            b = srcs[j + min(1, r - 1)][b0:b1]
            _acc_vec(t, a, b, srcs[j + r - 1][b0:b1], r + 1, op)
        _copy_vec(dst[b0:b1], t)


@njit(**INNER_OPTS)
def _half_range(dst, srcs, k, lo, hi, op, fmt):
    """The same for 16-bit words of format ``fmt`` and any k (``srcs`` a typed list or a tuple):
    each block is decoded exactly into a float32 scratch, reduced there in order, and rounded
    once into ``dst``; ``dst`` may be any one of the sources."""
    n = min(CACHE_BLOCK, hi - lo)
    acc = np.empty(n, np.float32)
    tmp = np.empty(n, np.float32)
    for b0 in range(lo, hi, CACHE_BLOCK):
        b1 = min(b0 + CACHE_BLOCK, hi)
        t = acc[: b1 - b0]
        u = tmp[: b1 - b0]
        dec16_vec(srcs[0][b0:b1], t, fmt)
        for j in range(1, k):
            dec16_vec(srcs[j][b0:b1], u, fmt)
            _acc_vec(t, u, u, u, 2, op)
        enc16_vec(t, dst[b0:b1], fmt)


# --- kernels: a serial and a parallel (prange over blocks) function for each -----------------
# k: how many sources there are (fixed-arity kernels: the unused arguments repeat the first);
# r: where dst sits among them.


def _first_s(d, a, b, c, e, k, op):
    _first_vec(d, a, b, c, e, k, op)


def _first_p(d, a, b, c, e, k, op):
    n = d.size
    for j in prange((n + BLOCK - 1) // BLOCK):
        lo = j * BLOCK
        hi = min(lo + BLOCK, n)
        _first_vec(d[lo:hi], a[lo:hi], b[lo:hi], c[lo:hi], e[lo:hi], k, op)


def _acc_s(d, a, b, c, k, op):
    _acc_vec(d, a, b, c, k, op)


def _acc_p(d, a, b, c, k, op):
    n = d.size
    for j in prange((n + BLOCK - 1) // BLOCK):
        lo = j * BLOCK
        hi = min(lo + BLOCK, n)
        _acc_vec(d[lo:hi], a[lo:hi], b[lo:hi], c[lo:hi], k, op)


def _pos_s(d, a, b, c, k, r, op):
    _pos_vec(d, a, b, c, k, r, op)


def _pos_p(d, a, b, c, k, r, op):
    n = d.size
    for j in prange((n + BLOCK - 1) // BLOCK):
        lo = j * BLOCK
        hi = min(lo + BLOCK, n)
        _pos_vec(d[lo:hi], a[lo:hi], b[lo:hi], c[lo:hi], k, r, op)


def _list_s(d, srcs, op):
    _list_range(d, srcs, 0, d.size, op)


def _list_p(d, srcs, op):
    n = d.size
    for j in prange((n + BLOCK - 1) // BLOCK):
        lo = j * BLOCK
        _list_range(d, srcs, lo, min(lo + BLOCK, n), op)


def _half4_s(d, a, b, c, e, k, op, fmt):
    _half_range(d, (a, b, c, e), k, 0, d.size, op, fmt)


def _half4_p(d, a, b, c, e, k, op, fmt):
    n = d.size
    for j in prange((n + BLOCK - 1) // BLOCK):
        lo = j * BLOCK
        _half_range(d, (a, b, c, e), k, lo, min(lo + BLOCK, n), op, fmt)


def _halfk_s(d, srcs, op, fmt):
    _half_range(d, srcs, len(srcs), 0, d.size, op, fmt)


def _halfk_p(d, srcs, op, fmt):
    n = d.size
    for j in prange((n + BLOCK - 1) // BLOCK):
        lo = j * BLOCK
        _half_range(d, srcs, len(srcs), lo, min(lo + BLOCK, n), op, fmt)


_I = nt.int64
_RO_LIST = {ch: nt.ListType(array(t, True)) for ch, t in PLAIN_TYPES.items()}
_FIXED_SIGS = {
    ch: nt.void(array(t), *[array(t, True)] * 4, _I, _I) for ch, t in PLAIN_TYPES.items()
}
_W16 = array(nt.uint16)
_R16 = array(nt.uint16, True)
_RO_LIST16 = nt.ListType(_R16)

_FIRST = kernel(_first_s, _first_p, _FIXED_SIGS)
_ACC = kernel(
    _acc_s,
    _acc_p,
    {ch: nt.void(array(t), *[array(t, True)] * 3, _I, _I) for ch, t in PLAIN_TYPES.items()},
)
_POS = kernel(
    _pos_s,
    _pos_p,
    {ch: nt.void(array(t), *[array(t, True)] * 3, _I, _I, _I) for ch, t in FLOAT_TYPES.items()},
)
_LIST = kernel(
    _list_s, _list_p, {ch: nt.void(array(t), _RO_LIST[ch], _I) for ch, t in PLAIN_TYPES.items()}
)
_HALF4 = kernel(_half4_s, _half4_p, {"H": nt.void(_W16, _R16, _R16, _R16, _R16, _I, _I, _I)})
_HALFK = kernel(_halfk_s, _halfk_p, {"H": nt.void(_W16, _RO_LIST16, _I, _I)})

# --- public wrappers --------------------------------------------------------------------------


def reduce_into(
    dst: np.ndarray, sources: Sequence[np.ndarray], op: str, *, parallel: bool | None = None
) -> None:
    """``dst = sources[0] op sources[1] op ... op sources[k-1]``, left to right, in one pass.

    ``op`` is ``"sum"``, ``"prod"``, ``"min"`` or ``"max"``; dtypes float32, float64, float16,
    int8, uint8, int16, int32, int64 and bool, every source of ``dst``'s dtype and size (bf16
    words go to :func:`reduce_into_bf16`).  The results are those of chained ``np.add`` /
    ``np.multiply`` / ``np.minimum`` / ``np.maximum``: integers wrap around, float min/max
    propagate NaN; bool sum/max are logical or, prod/min logical and.  float16 accumulates in
    float32 and rounds once, as ``(s0.astype(f32) op ...).astype(f16)``.  float32/float64 sum
    is :func:`sum_into` (the same bits; with ``dst`` a later one of k <= 4 sources, the
    positional kernel here is faster).  ``dst`` may be one of the sources (the very same
    buffer, at any position) and must not otherwise overlap them; sources may overlap each
    other.  ``parallel`` as for :func:`sum_into`.
    """
    dst = v.flat(dst, "dst", _ACCEPT, True)
    code = _op_code(op)
    flat, alias = _sources(dst, sources)
    key = _KEYS[dst.dtype.char]
    if key == _F16:
        words = [s.view(np.uint16) for s in flat]
        _reduce16(dst.view(np.uint16), words, code, FP16, parallel)
        return
    k = len(flat)
    n = dst.size
    if code == SUM and key in "fd" and (alias <= 0 or k > 4):
        sum_flat(dst, flat, alias, parallel)  # sum_into's own tuned kernels
        return
    if key == _BOOL:  # 0/1 bytes: or is max and and is min, on the uint8 kernels
        code = {SUM: MAX, PROD: MIN}.get(code, code)
        dst = dst.view(np.uint8)
        flat = [s.view(np.uint8) for s in flat]
        key = dst.dtype.char
    if alias > 0 and key in _EXACT:
        flat.insert(0, flat.pop(alias))
        alias = 0
    if k > 4:
        run(_LIST, key, n, parallel, dst, typed_list(_RO_LIST[key], flat), code)
    elif alias == 0:
        if k > 1:
            run(_ACC, key, n, parallel, dst, *_pad(flat[1:], 3), k, code)
    elif alias > 0:
        rest = flat[:alias] + flat[alias + 1 :]
        run(_POS, key, n, parallel, dst, *_pad(rest, 3), k, alias, code)
    elif k == 1:
        np.copyto(dst, flat[0])
    else:
        run(_FIRST, key, n, parallel, dst, *_pad(flat, 4), k, code)


def reduce_into_bf16(
    dst: np.ndarray, sources: Sequence[np.ndarray], op: str, *, parallel: bool | None = None
) -> None:
    """:func:`reduce_into` for bfloat16 words (uint16 arrays of bf16 bits).

    Each element is decoded exactly, reduced in float32 left to right, and rounded once as
    :func:`encode_bf16` rounds (nearest even; a NaN keeps its sign and gets the quiet bit).
    """
    dst = v.flat(dst, "dst", "H", True)
    code = _op_code(op)
    flat, _ = _sources(dst, sources)
    _reduce16(dst, flat, code, BF16, parallel)


def _op_code(op: object) -> int:
    if not isinstance(op, str):
        raise TypeError(f"op must be a str, got {type(op).__name__}")
    code = OPS.get(op)
    if code is None:
        raise ValueError(f"op must be one of {', '.join(map(repr, OPS))}; got {op!r}")
    return code


def _sources(dst: np.ndarray, sources: object) -> tuple[list[np.ndarray], int]:
    """The checked 1-D sources, and the index of the (last) one that is ``dst`` itself, or -1."""
    if isinstance(sources, np.ndarray) or not isinstance(sources, (list, tuple)):
        raise TypeError(f"sources must be a list or tuple of arrays, got {type(sources).__name__}")
    if not sources:
        raise ValueError("sources must hold at least one array")
    flat = []
    alias = -1
    for j, s in enumerate(sources):
        name = f"sources[{j}]"
        s = v.like(s, name, dst, "dst")
        if s is dst or np.may_share_memory(dst, s):
            v.no_partial_overlap(dst, "dst", s, name)
            alias = j
        flat.append(s)
    return flat, alias


def _pad(arrays: list[np.ndarray], m: int) -> list[np.ndarray]:
    """``arrays`` filled up to ``m`` arguments with the first (the kernels never read those)."""
    return arrays + [arrays[0]] * (m - len(arrays))


def _reduce16(
    dst: np.ndarray, flat: list[np.ndarray], code: int, fmt: int, parallel: bool | None
) -> None:
    k = len(flat)
    n = dst.size
    if k > 4:
        run(_HALFK, "H", n, parallel, dst, typed_list(_RO_LIST16, flat), code, fmt)
    else:
        run(_HALF4, "H", n, parallel, dst, *_pad(flat, 4), k, code, fmt)

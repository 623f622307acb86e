"""Small dense products for low-rank (PowerSGD) gradient compression, in a fixed order.

PowerSGD approximates each gradient matrix ``M`` (rows x cols) by ``P @ Q.T`` with ``P``
(rows x r) and ``Q`` (cols x r), r of 1 to 8. The ranks exchange only ``P`` and ``Q``, and
each of them rebuilds the same approximation and updates its replica of the weights with it —
so the products must give the *same bits* on every rank, whatever BLAS, thread count or CPU
the host has. These kernels fix the summation order (a plain loop nest, no FMA contraction:
Numba's default, no fastmath), which BLAS does not promise. Arrays are flat, row-major.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba import types as nt

from . import _validate as v
from ._jit import INNER_OPTS, array, kernel, run

_EPS = np.float32(1e-30)
_SPAN = np.float32(1e-3)
"""A column whose norm falls below this fraction of its own is taken as in the span."""


@njit(**INNER_OPTS)
def _project_vec(m, q, out, rows, cols, r):
    """out (rows x r) = m (rows x cols) @ q (cols x r)."""
    for i in range(rows):
        for t in range(r):
            acc = np.float32(0.0)
            for j in range(cols):
                acc += m[i * cols + j] * q[j * r + t]
            out[i * r + t] = acc


@njit(**INNER_OPTS)
def _back_project_vec(m, p, out, rows, cols, r):
    """out (cols x r) = m.T @ p (rows x r), accumulated over rows in order."""
    for k in range(cols * r):
        out[k] = np.float32(0.0)
    for i in range(rows):
        for j in range(cols):
            mij = m[i * cols + j]
            for t in range(r):
                out[j * r + t] += mij * p[i * r + t]


@njit(**INNER_OPTS)
def _expand_vec(p, q, out, rows, cols, r):
    """out (rows x cols) = p (rows x r) @ q.T (q: cols x r)."""
    for i in range(rows):
        for j in range(cols):
            acc = np.float32(0.0)
            for t in range(r):
                acc += p[i * r + t] * q[j * r + t]
            out[i * cols + j] = acc


@njit(**INNER_OPTS)
def _column_norm(p, rows, r, t):
    norm = np.float32(0.0)
    for i in range(rows):
        norm += p[i * r + t] * p[i * r + t]
    return np.sqrt(norm)


@njit(**INNER_OPTS)
def _orthonormalize_vec(p, rows, r):
    """Gram-Schmidt on the r columns of p (rows x r), in place, each column projected out
    twice ("twice is enough": one pass leaves float32 cancellation noise that is not
    orthogonal); a column (almost) in the span of the earlier ones becomes zero."""
    for t in range(r):
        before = _column_norm(p, rows, r, t)
        for _ in range(2):
            for s in range(t):
                dot = np.float32(0.0)
                for i in range(rows):
                    dot += p[i * r + t] * p[i * r + s]
                for i in range(rows):
                    p[i * r + t] -= dot * p[i * r + s]
        after = _column_norm(p, rows, r, t)
        inv = np.float32(0.0)
        if after > _SPAN * before and after > _EPS:
            inv = np.float32(1.0) / after
        for i in range(rows):
            p[i * r + t] *= inv


def _project_s(m, q, out, rows, cols, r):
    _project_vec(m, q, out, rows, cols, r)


def _project_p(m, q, out, rows, cols, r):
    _project_vec(m, q, out, rows, cols, r)


def _back_project_s(m, p, out, rows, cols, r):
    _back_project_vec(m, p, out, rows, cols, r)


def _back_project_p(m, p, out, rows, cols, r):
    _back_project_vec(m, p, out, rows, cols, r)


def _expand_s(p, q, out, rows, cols, r):
    _expand_vec(p, q, out, rows, cols, r)


def _expand_p(p, q, out, rows, cols, r):
    _expand_vec(p, q, out, rows, cols, r)


def _orthonormalize_s(p, rows, r):
    _orthonormalize_vec(p, rows, r)


def _orthonormalize_p(p, rows, r):
    _orthonormalize_vec(p, rows, r)


_F4, _I8 = nt.float32, nt.int64
_PRODUCT_SIG = {"f": nt.void(array(_F4, True), array(_F4, True), array(_F4), _I8, _I8, _I8)}
# The "parallel" variants run serially too: the order of every sum is the point.
_PROJECT = kernel(_project_s, _project_p, _PRODUCT_SIG)
_BACK_PROJECT = kernel(_back_project_s, _back_project_p, _PRODUCT_SIG)
_EXPAND = kernel(_expand_s, _expand_p, _PRODUCT_SIG)
_ORTHO = kernel(_orthonormalize_s, _orthonormalize_p, {"f": nt.void(array(_F4), _I8, _I8)})


def _dims(rows: int, cols: int, r: int) -> tuple[int, int, int]:
    for name, x in (("rows", rows), ("cols", cols), ("rank", r)):
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1:
            raise ValueError(f"{name} must be a positive int, got {x!r}")
    return int(rows), int(cols), int(r)


def _sized(a: object, name: str, n: int, writable: bool) -> np.ndarray:
    flat = v.flat(a, name, "f", writable)
    if flat.size != n:
        raise ValueError(f"{name} has {flat.size} elements, expected {n}")
    return flat


def project(m: np.ndarray, q: np.ndarray, out: np.ndarray, rows: int, cols: int, r: int) -> None:
    """``out = m @ q`` for float32 ``m`` (rows x cols) and ``q`` (cols x r)."""
    rows, cols, r = _dims(rows, cols, r)
    m = _sized(m, "m", rows * cols, False)
    q = _sized(q, "q", cols * r, False)
    out = _sized(out, "out", rows * r, True)
    v.no_overlap(out, "out", m, "m")
    v.no_overlap(out, "out", q, "q")
    run(_PROJECT, "f", rows * cols, False, m, q, out, rows, cols, r)


def back_project(
    m: np.ndarray, p: np.ndarray, out: np.ndarray, rows: int, cols: int, r: int
) -> None:
    """``out = m.T @ p`` for float32 ``m`` (rows x cols) and ``p`` (rows x r)."""
    rows, cols, r = _dims(rows, cols, r)
    m = _sized(m, "m", rows * cols, False)
    p = _sized(p, "p", rows * r, False)
    out = _sized(out, "out", cols * r, True)
    v.no_overlap(out, "out", m, "m")
    v.no_overlap(out, "out", p, "p")
    run(_BACK_PROJECT, "f", rows * cols, False, m, p, out, rows, cols, r)


def expand(p: np.ndarray, q: np.ndarray, out: np.ndarray, rows: int, cols: int, r: int) -> None:
    """``out = p @ q.T`` for float32 ``p`` (rows x r) and ``q`` (cols x r)."""
    rows, cols, r = _dims(rows, cols, r)
    p = _sized(p, "p", rows * r, False)
    q = _sized(q, "q", cols * r, False)
    out = _sized(out, "out", rows * cols, True)
    v.no_overlap(out, "out", p, "p")
    v.no_overlap(out, "out", q, "q")
    run(_EXPAND, "f", rows * cols, False, p, q, out, rows, cols, r)


def orthonormalize(p: np.ndarray, rows: int, r: int) -> None:
    """Make the ``r`` columns of float32 ``p`` (rows x r) orthonormal in place (Gram-Schmidt,
    twice per column); a column in the span of the earlier ones becomes zero."""
    rows, _cols, r = _dims(rows, 1, r)
    p = _sized(p, "p", rows * r, True)
    run(_ORTHO, "f", rows * r, False, p, rows, r)

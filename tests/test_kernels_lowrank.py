"""Low-rank products against NumPy, in a fixed order (same bits every call)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pdl.kernels import lowrank as L


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 40), cols=st.integers(1, 40), r=st.integers(1, 5), seed=st.integers(0, 999)
)
def test_products_match_numpy(rows: int, cols: int, r: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((rows, cols)).astype(np.float32)
    q = rng.standard_normal((cols, r)).astype(np.float32)
    p = rng.standard_normal((rows, r)).astype(np.float32)
    out = np.empty((rows, r), np.float32)
    L.project(m, q, out, rows, cols, r)
    assert np.allclose(out, m @ q, rtol=1e-4, atol=1e-4)
    back = np.empty((cols, r), np.float32)
    L.back_project(m, p, back, rows, cols, r)
    assert np.allclose(back, m.T @ p, rtol=1e-4, atol=1e-4)
    full = np.empty((rows, cols), np.float32)
    L.expand(p, q, full, rows, cols, r)
    assert np.allclose(full, p @ q.T, rtol=1e-4, atol=1e-4)
    again = np.empty_like(full)
    L.expand(p, q, again, rows, cols, r)
    assert np.array_equal(full, again)


def test_orthonormalize_gives_orthonormal_columns() -> None:
    rng = np.random.default_rng(3)
    p = rng.standard_normal((50, 4)).astype(np.float32)
    L.orthonormalize(p, 50, 4)
    assert np.allclose(p.T @ p, np.eye(4), atol=1e-5)
    zero = np.zeros((6, 2), np.float32)
    L.orthonormalize(zero, 6, 2)
    assert not zero.any()


def test_bad_arguments_are_typed_errors() -> None:
    m = np.zeros(6, np.float32)
    with pytest.raises(ValueError, match="q has 4 elements, expected 3"):
        L.project(m, np.zeros(4, np.float32), np.zeros(2, np.float32), 2, 3, 1)
    with pytest.raises(TypeError, match="float32"):
        L.project(m.astype(np.float64), np.zeros(3, np.float32), np.zeros(2, np.float32), 2, 3, 1)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        L.orthonormalize(m, 6, 0)
    with pytest.raises(ValueError, match="must not share memory"):
        L.project(m, m[:3], m[:2], 2, 3, 1)

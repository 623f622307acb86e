"""8-bit quantisation kernels against a NumPy reference, with and without error feedback."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pdl import kernels as K
from p2pdl.kernels import quant


def naive_quantize(x: np.ndarray, residual: np.ndarray | None, block: int):
    """The reference: per block, scale = max|y| / 127, q = rint(y / scale) in [-127, 127]."""
    y = x.astype(np.float32) + (residual if residual is not None else np.float32(0))
    n = y.size
    q = np.zeros(n, np.int8)
    scales = np.zeros(-(-n // block), np.float32)
    left = np.zeros(n, np.float32)
    for b in range(scales.size):
        part = y[b * block : (b + 1) * block]
        amax = np.float32(np.max(np.abs(part))) if part.size else np.float32(0)
        scale = np.float32(amax / np.float32(127))
        inv = np.float32(np.float32(127) / amax) if amax > 0 else np.float32(0)
        codes = np.clip(np.rint(part * inv), -127, 127).astype(np.int8)
        q[b * block : (b + 1) * block] = codes
        scales[b] = scale
        left[b * block : (b + 1) * block] = part - codes.astype(np.float32) * scale
    return q, scales, left


def arrays(n: int, block: int):
    return np.empty(n, np.int8), np.empty(quant.wire_bytes(n, block) - n >> 2, np.float32)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 2000),
    block=st.sampled_from([1, 7, 256]),
    seed=st.integers(0, 2**31 - 1),
    feedback=st.booleans(),
    parallel=st.booleans(),
)
def test_quantize_and_dequantize_match_the_reference(
    n: int, block: int, seed: int, feedback: bool, parallel: bool
) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * rng.choice([1e-3, 1.0, 1e3])).astype(np.float32)
    residual = (rng.standard_normal(n) * 0.01).astype(np.float32) if feedback else None
    expect_q, expect_scales, expect_left = naive_quantize(x, residual, block)
    q, scales = arrays(n, block)
    K.quantize_int8(x, q, scales, residual=residual, block=block, parallel=parallel)
    assert np.array_equal(q, expect_q)
    assert np.array_equal(scales, expect_scales)
    if residual is not None:
        assert np.array_equal(residual, expect_left)
    out = np.full(n, 5.0, np.float32)
    K.dequantize_int8(out, q, scales, block=block, parallel=parallel)
    expect = np.repeat(scales, block)[:n] * q.astype(np.float32)
    assert np.array_equal(out, expect)
    K.dequantize_int8(out, q, scales, block=block, accumulate=True, parallel=parallel)
    assert np.array_equal(out, expect + expect)


def test_error_feedback_carries_what_was_lost_into_later_calls() -> None:
    """Sent over many calls, the dequantised sum tracks the true sum to one call's error."""
    rng = np.random.default_rng(1)
    n, block, calls = 4096, 256, 50
    residual = np.zeros(n, np.float32)
    sent = np.zeros(n, np.float64)
    true = np.zeros(n, np.float64)
    q, scales = arrays(n, block)
    out = np.empty(n, np.float32)
    for _ in range(calls):
        g = rng.standard_normal(n).astype(np.float32)
        true += g
        K.quantize_int8(g, q, scales, residual=residual, block=block)
        K.dequantize_int8(out, q, scales, block=block)
        sent += out
    assert np.allclose(sent + residual, true, atol=1e-3)  # nothing lost, only delayed
    one_call_error = np.abs(sent - true).max()
    assert one_call_error < 4 * np.abs(scales).max()  # bounded, not growing with calls


def test_non_finite_blocks_arrive_as_nan_not_as_finite_numbers() -> None:
    x = np.ones(512, np.float32)
    x[3] = np.inf
    x[300] = np.nan
    q, scales = arrays(512, 256)
    K.quantize_int8(x, q, scales, block=256)
    out = np.empty(512, np.float32)
    K.dequantize_int8(out, q, scales, block=256)
    assert np.isnan(out).all()


def test_bad_arguments_are_typed_errors() -> None:
    x = np.zeros(10, np.float32)
    q, scales = arrays(10, 4)
    with pytest.raises(TypeError, match="float32"):
        K.quantize_int8(x.astype(np.float64), q, scales, block=4)
    with pytest.raises(TypeError, match="int8"):
        K.quantize_int8(x, q.astype(np.int16), scales, block=4)
    with pytest.raises(ValueError, match="scales has 2 elements"):
        K.quantize_int8(x, q, scales[:2], block=4)
    with pytest.raises(ValueError, match="block must be a positive int"):
        K.quantize_int8(x, q, scales, block=0)
    with pytest.raises(ValueError, match="must not share memory"):
        K.quantize_int8(x, q, scales, residual=x, block=4)
    with pytest.raises(ValueError, match="read-only"):
        ro = np.zeros(10, np.float32)
        ro.flags.writeable = False
        K.dequantize_int8(ro, q, scales, block=4)
    assert quant.wire_bytes(1024) == 1024 + 16

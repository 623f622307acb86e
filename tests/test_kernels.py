"""Arithmetic kernels and slicing against the NumPy references in ``naive.py``."""

from __future__ import annotations

import naive
import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import p2pdl.kernels as K
from p2pdl.kernels import _jit

JIT = not numba.config.DISABLE_JIT
# Sizes: empty, tiny, odd, around the cache block, and (with the JIT) several parallel blocks.
SIZES = [0, 1, 2, 3, 7, 31, 1000, 4095, 4097] + ([_jit.BLOCK * 3 + 5, 300_001] if JIT else [])
DTYPES = [np.float32, np.float64]
PAR = [False, True]


def rand(rng: np.random.Generator, n: int, dtype: type, k: int = 1) -> list[np.ndarray]:
    return [rng.standard_normal(n).astype(dtype) for _ in range(k)]


@pytest.mark.parametrize("parallel", PAR)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_add(n, dtype, parallel):
    rng = np.random.default_rng(n)
    dst, src = rand(rng, n, dtype, 2)
    expect = naive.add(dst, src)
    K.add_(dst, src, parallel=parallel)
    assert np.array_equal(dst, expect)
    K.add_(dst, dst, parallel=parallel)  # the very same buffer is allowed
    assert np.array_equal(dst, expect + expect)


@pytest.mark.parametrize("parallel", PAR)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_add_copy(n, dtype, parallel):
    rng = np.random.default_rng(n)
    dst, src, out = rand(rng, n, dtype, 3)
    expect = naive.add(dst, src)
    K.add_copy_(dst, src, out, parallel=parallel)
    assert np.array_equal(dst, expect) and np.array_equal(out, expect)
    K.add_copy_(dst, dst, out, parallel=parallel)  # the very same buffer is allowed
    assert np.array_equal(dst, expect + expect) and np.array_equal(out, expect + expect)


def test_add_copy_refuses_overlap_and_unlike_buffers():
    a, b = np.ones(8, np.float32), np.ones(8, np.float32)
    with pytest.raises(ValueError, match="must not share memory"):
        K.add_copy_(a, b, a)
    with pytest.raises(ValueError, match="must not share memory"):
        K.add_copy_(a, b, b[::1])
    with pytest.raises(ValueError, match="partially overlaps"):
        K.add_copy_(a[1:], a[:-1], b[1:])
    with pytest.raises(TypeError):
        K.add_copy_(a, b, np.ones(8, np.float64))
    with pytest.raises(ValueError, match="elements"):
        K.add_copy_(a, b, np.ones(9, np.float32))


@pytest.mark.parametrize("parallel", PAR)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 7, 8, 11])
def test_sum_into(k, n, dtype, parallel):
    rng = np.random.default_rng(k * 1000 + n)
    srcs = rand(rng, n, dtype, k)
    expect = naive.sum_into(srcs)
    dst = np.full(n, np.nan, dtype)
    K.sum_into(dst, srcs, parallel=parallel)
    assert np.array_equal(dst, expect)  # same left-to-right order: bit-identical
    for j in {0, k // 2, k - 1}:  # dst may be any one of the sources
        copies = [s.copy() for s in srcs]
        K.sum_into(copies[j], tuple(copies), parallel=parallel)
        assert np.array_equal(copies[j], expect)


def test_sum_into_repeated_source():
    rng = np.random.default_rng(5)
    (a,) = rand(rng, 10_001, np.float32)
    dst = np.empty_like(a)
    K.sum_into(dst, [a] * 6)
    assert np.array_equal(dst, naive.sum_into([a] * 6))


@settings(max_examples=40 if JIT else 15, deadline=None)
@given(
    n=st.integers(0, 20_000 if JIT else 300),
    k=st.integers(1, 9),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
)
def test_sum_into_random(n, k, dtype, seed):
    rng = np.random.default_rng(seed)
    srcs = rand(rng, n, dtype, k)
    dst = np.empty(n, dtype)
    K.sum_into(dst, srcs)
    assert np.array_equal(dst, naive.sum_into(srcs))


@pytest.mark.parametrize("parallel", PAR)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_scale_axpy(n, dtype, parallel):
    rng = np.random.default_rng(n + 7)
    a, b = rand(rng, n, dtype, 2)
    expect = naive.scale(a, 0.3)
    K.scale_(a, 0.3, parallel=parallel)
    assert np.array_equal(a, expect)
    expect = naive.axpy(a, -1.7, b)
    K.axpy_(a, -1.7, b, parallel=parallel)
    assert np.array_equal(a, expect)


def test_multidimensional_contiguous_is_flattened():
    a = np.ones((3, 4), np.float32)
    b = np.arange(12, dtype=np.float32).reshape(3, 4)
    K.add_(a, b)
    assert np.array_equal(a, 1 + b)
    K.sum_into(a, [b, b.reshape(-1), b])  # sizes matter, not shapes
    assert np.array_equal(a, 3 * b)


def test_parallel_threshold_switch():
    old = K.parallel_threshold()
    try:
        rng = np.random.default_rng(3)
        a, b = rand(rng, 5000, np.float32, 2)
        expect = naive.add(a, b)
        K.set_parallel_threshold(0)  # every call takes the multi-threaded kernel
        assert K.parallel_threshold() == 0
        K.add_(a, b)
        assert np.array_equal(a, expect)
        with pytest.raises(ValueError):
            K.set_parallel_threshold(-1)
        with pytest.raises(TypeError):
            K.set_parallel_threshold(1.5)
    finally:
        K.set_parallel_threshold(old)
    assert K.parallel_threshold() == old


def test_precompile_serial():
    assert K.precompile(parallel=False) >= 20


@pytest.mark.skipif(not JIT, reason="inspects compiled dispatchers")
def test_kernels_are_explicitly_typed_nogil_and_cached():
    K.precompile(parallel=False)
    for k in _jit._ALL:
        for key, disp in k.serial.items():
            assert disp.targetoptions["nogil"] and disp.targetoptions.get("cache", True)
            assert len(disp.signatures) == 1, (disp, key)  # only the explicit signature


# --- validation -------------------------------------------------------------------------------

F4 = np.zeros(8, np.float32)


@pytest.mark.parametrize(
    ("dst", "src", "exc", "match"),
    [
        ([0.0] * 8, F4, TypeError, "numpy.ndarray"),
        (F4.copy(), [0.0] * 8, TypeError, "numpy.ndarray"),
        (np.zeros(8, np.int32), np.zeros(8, np.int32), TypeError, "dtype"),
        (np.zeros(8, np.float16), np.zeros(8, np.float16), TypeError, "dtype"),
        (np.zeros(8, ">f4"), np.zeros(8, ">f4"), TypeError, "native"),
        (F4.copy(), np.zeros(8, np.float64), TypeError, "dtype"),
        (F4.copy(), np.zeros(9, np.float32), ValueError, "elements"),
        (np.zeros(16, np.float32)[::2], F4, ValueError, "contiguous"),
        (F4.copy(), np.zeros(16, np.float32)[::2], ValueError, "contiguous"),
        (np.zeros((4, 2), np.float32, order="F"), F4, ValueError, "contiguous"),
    ],
)
def test_add_validation(dst, src, exc, match):
    with pytest.raises(exc, match=match):
        K.add_(dst, src)


def test_readonly_and_overlap():
    ro = np.zeros(8, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        K.add_(ro, F4)
    with pytest.raises(ValueError, match="read-only"):
        K.scale_(ro, 2.0)
    dst = np.ones(8, np.float32)
    K.add_(dst, ro)  # read-only sources are fine
    K.sum_into(dst, [ro, ro, ro, ro, ro])
    buf = np.arange(9, dtype=np.float32)
    with pytest.raises(ValueError, match="overlap"):
        K.add_(buf[1:], buf[:-1])
    with pytest.raises(ValueError, match="overlap"):
        K.axpy_(buf[1:], 2.0, buf[:-1])
    with pytest.raises(ValueError, match="overlap"):
        K.sum_into(buf[1:], [F4, buf[:-1]])
    assert np.array_equal(buf, np.arange(9, dtype=np.float32))


def test_sum_into_validation():
    with pytest.raises(ValueError, match="at least one"):
        K.sum_into(F4.copy(), [])
    with pytest.raises(TypeError, match="list or tuple"):
        K.sum_into(F4.copy(), np.zeros((2, 8), np.float32))
    with pytest.raises(TypeError, match="srcs\\[2\\]"):
        K.sum_into(F4.copy(), [F4, F4, np.zeros(8, np.float64)])
    with pytest.raises(ValueError, match="srcs\\[1\\]"):
        K.sum_into(F4.copy(), [F4, np.zeros(7, np.float32)])


def test_scalar_validation():
    with pytest.raises(TypeError, match="alpha"):
        K.scale_(F4.copy(), "2")
    with pytest.raises(TypeError, match="alpha"):
        K.axpy_(F4.copy(), True, F4)
    with pytest.raises(TypeError, match="alpha"):
        K.axpy_(F4.copy(), None, F4)


# --- slicing ----------------------------------------------------------------------------------


def test_slice_bounds_bigdl():
    assert K.slice_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert K.slice_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert K.slice_bounds(0, 2) == [(0, 0), (0, 0)]
    assert K.slice_bounds(10, 3, align=4) == [(0, 4), (4, 8), (8, 10)]
    assert K.slice_bounds(35, 2, align=8) == [(0, 16), (16, 35)]


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 5000), parts=st.integers(1, 64), align=st.integers(1, 70))
def test_slice_bounds_properties(n, parts, align):
    b = K.slice_bounds(n, parts, align)
    assert b == naive.slice_bounds(n, parts, align)
    assert len(b) == parts and b[0][0] == 0 and b[-1][1] == n
    assert all(b[j][1] == b[j + 1][0] for j in range(parts - 1))
    assert all(start % align == 0 for start, _ in b)
    body = [stop - start for start, stop in b[:-1]] + [b[-1][1] - b[-1][0] - n % align]
    assert max(body) - min(body) <= align


@pytest.mark.parametrize(
    ("args", "exc"),
    [
        ((-1, 2), ValueError),
        ((4, 0), ValueError),
        ((4, 2, 0), ValueError),
        ((4.0, 2), TypeError),
        ((4, True), TypeError),
        ((4, 2, "8"), TypeError),
    ],
)
def test_slice_bounds_validation(args, exc):
    with pytest.raises(exc):
        K.slice_bounds(*args)


def test_full_fence_is_compiled_from_its_signature_and_emits_a_fence() -> None:
    """The fence that shared-memory waits rely on (`shmsync.ring`): compiled once, from an
    explicit signature; its intrinsic is an LLVM ``fence seq_cst``: on x86-64 an ``mfence`` or
    a locked read-modify-write, either of which orders earlier stores before later loads."""
    from p2pdl.kernels import fence

    K.full_fence()
    if _jit.DISABLE_JIT:
        return
    (compiled,) = fence._FENCE
    assert [str(sig) for sig in compiled.signatures] == ["()"]

    def probe() -> None:  # the same intrinsic, compiled afresh (cached code is opaque)
        fence._seq_cst_fence()

    fresh = numba.njit("void()")(probe)
    assert "fence seq_cst" in fresh.inspect_llvm(())
    asm = fresh.inspect_asm(())
    assert "mfence" in asm or "\tlock\t" in asm, asm

"""reduce_into / reduce_into_bf16 / 16-bit scaling against the NumPy references in ``naive.py``."""

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
# Without the JIT every element is a Python call: fewer sizes, still across the cache block.
SIZES_K = SIZES if JIT else [0, 1, 7, 4097]
# 1..4: the fixed-arity kernels; 5..8: the typed-list path (one, two or three past the first 4).
KS = [1, 2, 3, 4, 5, 6, 8] if JIT else [1, 2, 3, 4, 5, 8]
KS_LARGE = [2, 3, 5]  # for the large sizes: each kind of kernel once


def ks(n: int) -> list[int]:
    return KS if n <= (4097 if JIT else 1000) else KS_LARGE


DTYPES = [np.float32, np.float64, np.float16, np.int8, np.uint8, np.int16, np.int32, np.int64,
          np.bool_]  # fmt: skip
OPS = ["sum", "prod", "min", "max"]
PAR = [False, True]
SPECIALS = [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1.0, -1.0, 3e38, 1e-40, 65504.0, 6e-8]

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # overflow/NaN, JIT off


def sources(rng: np.random.Generator, n: int, dtype: type, k: int) -> list[np.ndarray]:
    """k arrays: full-range and small integers; normals with a few infs, NaNs, zeros of both
    signs, huge and subnormal values; for float16 also some random bit patterns."""
    dt = np.dtype(dtype)
    if dt == np.bool_:
        return [rng.random(n) < 0.7 for _ in range(k)]
    if dt.kind in "iu":
        info = np.iinfo(dt)
        full = rng.integers(info.min, info.max, (k, n), dtype=dt, endpoint=True)
        small = rng.integers(-3 if dt.kind == "i" else 0, 4, (k, n)).astype(dt)
        return list(np.where(rng.random((k, n)) < 0.5, small, full))
    x = rng.standard_normal((k, n)) * 4
    mask = rng.random((k, n)) < 0.03
    x[mask] = rng.choice(np.array(SPECIALS), int(mask.sum()))
    with np.errstate(over="ignore"):
        out = x.astype(dt)
    if dt == np.float16:
        bits = rng.integers(0, 1 << 16, (k, n)).astype(np.uint16).view(np.float16)
        out = np.where(rng.random((k, n)) < 0.1, bits, out)
    return [row.copy() for row in out]


def words(rng: np.random.Generator, n: int, k: int) -> list[np.ndarray]:
    """k arrays of bf16 words: rounded floats (with specials) and some random bit patterns."""
    out = []
    for x in sources(rng, n, np.float32, k):
        w = naive.encode_bf16(x)
        bits = rng.integers(0, 1 << 16, n).astype(np.uint16)
        out.append(np.where(rng.random(n) < 0.1, bits, w))
    return out


def assert_same(out: np.ndarray, expect: np.ndarray, op: str, bf16: bool = False) -> None:
    """Bit-exact; for float sum/prod a NaN need only be a NaN (IEEE leaves its payload open)."""
    if bf16:
        nan_out, nan_exp = (out & 0x7FFF) > 0x7F80, (expect & 0x7FFF) > 0x7F80
    elif out.dtype.kind == "f":
        nan_out, nan_exp = np.isnan(out), np.isnan(expect)
    else:
        nan_out = nan_exp = None
    if nan_exp is not None and op in ("sum", "prod"):
        assert np.array_equal(nan_out, nan_exp)
        out, expect = out[~nan_exp], expect[~nan_exp]
    bad = np.flatnonzero(out.view(np.uint8) != expect.view(np.uint8))
    assert bad.size == 0, (bad[:5], out[bad[:5] // out.itemsize], expect[bad[:5] // out.itemsize])


def positions(k: int) -> list[int | None]:
    """Where ``dst`` sits among the sources: nowhere, and anywhere (k <= 4: each place has its
    own loop) or first, middle, last."""
    return [*(range(k) if k <= 4 else sorted({0, k // 2, k - 1})), None]


def check(reduce, ref, srcs, op, parallel, bf16=False):
    expect = ref(srcs, op)
    for j in positions(len(srcs)):
        copies = [s.copy() for s in srcs]
        dst = np.full_like(srcs[0], 7) if j is None else copies[j]
        reduce(dst, copies if j is None else tuple(copies), op, parallel=parallel)
        assert_same(dst, expect, op, bf16)
        for i, (c, s) in enumerate(zip(copies, srcs, strict=True)):
            if i != j:
                assert np.array_equal(c.view(np.uint8), s.view(np.uint8))  # sources untouched


@pytest.mark.parametrize("parallel", PAR)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES_K)
def test_reduce_into(n, dtype, op, parallel):
    rng = np.random.default_rng(n)
    for k in ks(n):
        check(K.reduce_into, naive.reduce_into, sources(rng, n, dtype, k), op, parallel)


@pytest.mark.parametrize("parallel", PAR)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n", SIZES_K)
def test_reduce_into_bf16(n, op, parallel):
    rng = np.random.default_rng(n + 1)
    for k in ks(n):
        srcs = words(rng, n, k)
        check(K.reduce_into_bf16, naive.reduce_into_bf16, srcs, op, parallel, bf16=True)


# every pair and triple of special values, so each NaN/zero/inf meets each other in each order
FLOAT_EDGES = [0.0, -0.0, np.inf, -np.inf, 1.0, -1.0, 2.0, 1e-40, 3e38, 65504.0, 6e-8]
# quiet NaNs of both signs, with payloads, signalling ones
NANS = {
    "f": np.array([0x7FC00000, 0xFFC00000, 0x7FC00001, 0x7F800001, 0xFFA00000], np.uint32),
    "d": np.array([0x7FF8 << 48, 0xFFF8 << 48, (0x7FF8 << 48) + 1, (0x7FF0 << 48) + 1], np.uint64),
    "e": np.array([0x7E00, 0xFE00, 0x7E01, 0x7C01, 0xFD00], np.uint16),
}
NANS = {c: bits.view(np.dtype(c)) for c, bits in NANS.items()}


def edge_sources(dtype: type, k: int, step: int = 1) -> list[np.ndarray]:
    """Every k-tuple of edge values (every ``step``-th one), as k arrays."""
    if dtype == "bf16":
        vals = naive.encode_bf16(np.array(FLOAT_EDGES, np.float32))
        vals = np.concatenate([vals, np.array([0x7FC0, 0xFFC0, 0x7F81, 0xFFC1], np.uint16)])
    else:
        with np.errstate(over="ignore"):
            vals = np.array(FLOAT_EDGES, np.float64).astype(dtype)
        vals = np.concatenate([vals, NANS[np.dtype(dtype).char]])
    combos = np.unravel_index(np.arange(0, vals.size**k, step), (vals.size,) * k)
    return [np.ascontiguousarray(vals[c]) for c in combos]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, "bf16"])
def test_reduce_special_values(dtype, op):
    bf16 = dtype == "bf16"
    reduce = K.reduce_into_bf16 if bf16 else K.reduce_into
    ref = naive.reduce_into_bf16 if bf16 else naive.reduce_into
    for k in (2, 3, 5):
        step = 1 if k < 5 else 37 if JIT else 997  # a sample of the 15**5 and more
        srcs = edge_sources(dtype, k, step)
        check(reduce, ref, srcs, op, False, bf16)


def test_signed_zeros_follow_numpy():
    z, m = np.zeros(3, np.float32), -np.zeros(3, np.float32)
    for op, ufunc in (("min", np.minimum), ("max", np.maximum)):
        for a, b in ((z, m), (m, z)):
            out = np.empty(3, np.float32)
            K.reduce_into(out, [a, b], op)
            assert np.array_equal(np.signbit(out), np.signbit(ufunc(a, b)))
    nan = np.full(2, np.nan, np.float32)
    out = np.empty(2, np.float32)
    K.reduce_into(out, [np.ones(2, np.float32), nan, np.zeros(2, np.float32)], "min")
    assert np.isnan(out).all()


def test_integer_wraparound_and_bool_semantics():
    i8 = np.array([127, -128, 100], np.int8)
    out = np.empty(3, np.int8)
    K.reduce_into(out, [i8, np.array([1, -1, 100], np.int8)], "sum")
    assert out.tolist() == [-128, 127, -56]
    u8 = np.array([16, 255, 3], np.uint8)
    K.reduce_into(u8, [u8, u8], "prod")
    assert u8.tolist() == [0, 1, 9]
    big = np.array([np.iinfo(np.int64).max], np.int64)
    K.reduce_into(big, [big, np.ones(1, np.int64)], "sum")
    assert big[0] == np.iinfo(np.int64).min
    t, f = np.array([True, True, False, False]), np.array([True, False, True, False])
    b = np.empty(4, bool)
    for op, expect in (("sum", t | f), ("max", t | f), ("prod", t & f), ("min", t & f)):
        K.reduce_into(b, [t, f], op)
        assert np.array_equal(b, expect)


def test_repeated_sources_and_dst():
    rng = np.random.default_rng(9)
    for dtype in (np.float32, np.int32, np.float16):
        (a,) = sources(rng, 5001 if JIT else 301, dtype, 1)
        for op in OPS:
            expect = naive.reduce_into([a] * 6, op)
            dst = np.empty_like(a)
            K.reduce_into(dst, [a] * 6, op)
            assert_same(dst, expect, op)
            for k in (2, 3, 6):  # dst several times among the sources
                d = a.copy()
                K.reduce_into(d, [d] * k, op)
                assert_same(d, naive.reduce_into([a] * k, op), op)


def test_shapes_and_int64_alias():
    a = np.arange(12, dtype=np.int64).reshape(3, 4)
    q = np.arange(12, dtype="q")  # same dtype as int64, other type character
    out = np.zeros((4, 3), np.int64)
    K.reduce_into(out, [a, q, a.reshape(-1)], "sum")  # sizes matter, not shapes
    assert np.array_equal(out.reshape(-1), 3 * np.arange(12))
    K.reduce_into(q, [q, a], "max")
    assert np.array_equal(q, np.arange(12))
    f = np.ones((2, 3), np.float16)
    K.reduce_into(f, [f, f.reshape(-1), f], "sum")
    assert np.array_equal(f, np.full((2, 3), 3, np.float16))


@settings(max_examples=60 if JIT else 20, deadline=None)
@given(
    n=st.integers(0, 20_000 if JIT else 200),
    k=st.integers(1, 9),
    dtype=st.sampled_from([*DTYPES, "bf16"]),
    op=st.sampled_from(OPS),
    where=st.integers(-1, 8),
    parallel=st.sampled_from([None, False, True]),
    seed=st.integers(0, 2**32 - 1),
)
def test_reduce_random(n, k, dtype, op, where, parallel, seed):
    rng = np.random.default_rng(seed)
    bf16 = dtype == "bf16"
    srcs = words(rng, n, k) if bf16 else sources(rng, n, dtype, k)
    expect = (naive.reduce_into_bf16 if bf16 else naive.reduce_into)(srcs, op)
    dst = srcs[where] if 0 <= where < k else np.empty_like(srcs[0])
    (K.reduce_into_bf16 if bf16 else K.reduce_into)(dst, srcs, op, parallel=parallel)
    assert_same(dst, expect, op, bf16)


# --- 16-bit scaling ---------------------------------------------------------------------------

ALPHAS = [0.5, 1 / 3, -2.0, 1e-8, 70000.0]


@pytest.mark.parametrize("parallel", PAR)
@pytest.mark.parametrize("n", SIZES)
def test_scale_float16_and_bf16(n, parallel):
    rng = np.random.default_rng(n + 2)
    (h,) = sources(rng, n, np.float16, 1)
    (w,) = words(rng, n, 1)
    for alpha in ALPHAS:
        buf = h.copy()
        K.scale_(buf, alpha, parallel=parallel)
        assert_same(buf, naive.scale(h, alpha), "min")  # bit-exact, NaNs included
        buf16 = w.copy()
        K.scale_bf16(buf16, alpha, parallel=parallel)
        assert_same(buf16, naive.scale_bf16(w, alpha), "min", bf16=True)


def test_mean_of_float16_is_sum_then_scale():
    rng = np.random.default_rng(4)
    srcs = [rng.standard_normal(1000).astype(np.float16) for _ in range(3)]
    dst = np.empty(1000, np.float16)
    K.reduce_into(dst, srcs, "sum")
    K.scale_(dst, 1 / 3)
    assert np.array_equal(dst, naive.scale(naive.reduce_into(srcs, "sum"), 1 / 3))


# --- validation -------------------------------------------------------------------------------

F4 = np.zeros(8, np.float32)


@pytest.mark.parametrize(
    ("dst", "srcs", "op", "exc", "match"),
    [
        ([0.0] * 8, [F4], "sum", TypeError, "numpy.ndarray"),
        (F4.copy(), F4, "sum", TypeError, "list or tuple"),
        (F4.copy(), [], "sum", ValueError, "at least one"),
        (F4.copy(), [F4, [0.0] * 8], "sum", TypeError, "sources\\[1\\]"),
        (F4.copy(), [F4], "mean", ValueError, "'sum', 'prod', 'min', 'max'"),
        (F4.copy(), [F4], None, TypeError, "op must be a str"),
        (np.zeros(8, np.uint16), [np.zeros(8, np.uint16)], "sum", TypeError, "one of float32"),
        (np.zeros(8, np.complex64), [np.zeros(8, np.complex64)], "sum", TypeError, "dtype"),
        (np.zeros(8, ">i4"), [np.zeros(8, ">i4")], "max", TypeError, "native"),
        (F4.copy(), [F4, np.zeros(8, np.float16)], "sum", TypeError, "sources\\[1\\]"),
        (np.zeros(8, np.int32), [np.zeros(8, np.int64)], "sum", TypeError, "int32"),
        (F4.copy(), [F4, np.zeros(9, np.float32)], "max", ValueError, "elements"),
        (np.zeros(16, np.int8)[::2], [np.zeros(8, np.int8)], "sum", ValueError, "contiguous"),
        (np.zeros(8, np.int8), [np.zeros(16, np.int8)[::2]], "sum", ValueError, "contiguous"),
    ],
)
def test_reduce_into_validation(dst, srcs, op, exc, match):
    with pytest.raises(exc, match=match):
        K.reduce_into(dst, srcs, op)


def test_readonly_and_overlap():
    ro = np.ones(8, np.int16)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        K.reduce_into(ro, [ro], "sum")
    dst = np.zeros(8, np.int16)
    K.reduce_into(dst, [ro, ro, ro, ro, ro], "sum")  # read-only sources are fine
    assert np.array_equal(dst, np.full(8, 5, np.int16))
    buf = np.arange(9, dtype=np.float16)
    with pytest.raises(ValueError, match="overlap"):
        K.reduce_into(buf[1:], [buf[1:], buf[:-1]], "max")
    w = np.arange(9, dtype=np.uint16)
    with pytest.raises(ValueError, match="overlap"):
        K.reduce_into_bf16(w[1:], [w[:-1]], "min")
    assert np.array_equal(buf, np.arange(9, dtype=np.float16))
    assert np.array_equal(w, np.arange(9, dtype=np.uint16))


def test_bf16_and_scale_validation():
    w = np.zeros(8, np.uint16)
    with pytest.raises(TypeError, match="uint16"):
        K.reduce_into_bf16(np.zeros(8, np.float16), [w], "sum")
    with pytest.raises(TypeError, match="uint16"):
        K.reduce_into_bf16(w.copy(), [w, np.zeros(8, np.int16)], "sum")
    with pytest.raises(ValueError, match="op"):
        K.reduce_into_bf16(w.copy(), [w], "avg")
    with pytest.raises(TypeError, match="uint16"):
        K.scale_bf16(np.zeros(8, np.float32), 2.0)
    ro = w.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        K.scale_bf16(ro, 2.0)
    with pytest.raises(TypeError, match="alpha"):
        K.scale_bf16(w.copy(), "2")
    with pytest.raises(TypeError, match="one of float32, float64, float16"):
        K.scale_(np.zeros(8, np.int32), 2.0)
    with pytest.raises(TypeError, match="alpha"):
        K.scale_(np.zeros(8, np.float16), None)

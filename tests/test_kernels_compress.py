"""bf16/fp16 wire compression against NumPy (``np.float16`` casts) bit for bit."""

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
N_RANDOM = 1 << 20 if JIT else 3000

EDGE_BITS = [
    0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x00800000,  # zeros, f32 subnormals
    0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FA00000, 0x7FFFFFFF,
    0x7F802000, 0xFF801000,  # inf, quiet/signalling NaNs, payload only in low bits
    0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x3F808000, 0x3F818000, 0x3F807FFF,  # bf16 ties
    0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x47800000,  # fp16 max-finite rounding
    0x38800000, 0x387FFFFF, 0x387FF000, 0x38000000, 0x33800000, 0x33000000, 0x33000001,
    0x32FFFFFF, 0x33400000, 0x33C00000, 0x34200000, 0x3F801000, 0x3F803000, 0x3F800FFF,
]  # fmt: skip


def sample_bits(n: int, seed: int = 0) -> np.ndarray:
    """Random float32 bit patterns, with fp16 halfway cases and fp16-subnormal magnitudes."""
    rng = np.random.default_rng(seed)
    r = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    ties = (r & np.uint32(0xFFFFE000)) | np.uint32(0x1000)  # exactly half an fp16 ulp
    sub = (r & np.uint32(0x807FFFFF)) | (rng.integers(100, 114, n).astype(np.uint32) << 23)
    sub_ties = sub & np.uint32(0xFFFF0000)  # many exact ties in the subnormal range
    near = (r & np.uint32(0x8001FFFF)) | np.uint32(0x477E0000)  # around 65504, max finite
    edges = np.array(EDGE_BITS, np.uint32)
    return np.concatenate([edges, r, ties, sub, sub_ties, near])


@pytest.fixture(scope="module")
def values() -> np.ndarray:
    return sample_bits(N_RANDOM // 5).view(np.float32)


@pytest.mark.parametrize("parallel", [False, True])
def test_encode_fp16_matches_numpy(values, parallel):
    out = K.encode_fp16(values, parallel=parallel)
    expect = naive.encode_fp16(values)
    bad = np.flatnonzero(out != expect)
    assert bad.size == 0, [hex(values.view(np.uint32)[i]) for i in bad[:10]]


@pytest.mark.parametrize("parallel", [False, True])
def test_encode_bf16_matches_reference(values, parallel):
    out = np.empty(values.size, np.uint16)
    assert K.encode_bf16(values, out, parallel=parallel) is out
    assert np.array_equal(out, naive.encode_bf16(values))


@pytest.mark.parametrize("parallel", [False, True])
def test_encode_round_bf16_matches_reference(values, parallel):
    buf = values.copy()
    out = np.empty(values.size, np.uint16)
    K.encode_round_bf16(buf, out, parallel=parallel)
    rounded, words = naive.encode_round_bf16(values)
    assert np.array_equal(out, words)
    assert np.array_equal(buf.view(np.uint32), rounded.view(np.uint32))


@pytest.mark.parametrize("n", [0, 1, 5, 4097])
def test_encode_round_bf16_sizes_and_bad_input(n):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    buf, out = x.copy(), np.empty(n, np.uint16)
    K.encode_round_bf16(buf, out)
    assert np.array_equal(out, naive.encode_bf16(x))
    with pytest.raises(TypeError):
        K.encode_round_bf16(x.astype(np.float64), out)
    with pytest.raises(ValueError):
        K.encode_round_bf16(buf, np.empty(n + 1, np.uint16))
    readonly = x.copy()
    readonly.flags.writeable = False
    with pytest.raises(ValueError):
        K.encode_round_bf16(readonly, out)


@pytest.mark.parametrize("alpha", [1.0, 0.25, 1 / 3])
@pytest.mark.parametrize("parallel", [False, True])
def test_decode_add_encode_round_bf16_matches_the_three_passes(values, parallel, alpha):
    """Edge and random bit patterns (NaNs, infinities, ties, subnormals) on both sides."""
    words = naive.encode_bf16(values[::-1].copy())
    dst, out = values.copy(), np.empty(values.size, np.uint16)
    K.decode_add_encode_round_bf16(dst, words, out, alpha=alpha, parallel=parallel)
    rounded, expect = naive.decode_add_encode_round_bf16(values, words, alpha)
    assert np.array_equal(out, expect)
    assert np.array_equal(dst.view(np.uint32), rounded.view(np.uint32))
    # the same bits as the three separate kernels
    three, words3 = values.copy(), np.empty(values.size, np.uint16)
    K.decode_add_bf16(three, words, parallel=parallel)
    K.scale_(three, alpha, parallel=parallel)
    K.encode_round_bf16(three, words3, parallel=parallel)
    assert np.array_equal(out, words3)
    assert np.array_equal(dst.view(np.uint32), three.view(np.uint32))


@pytest.mark.parametrize("n", [0, 1, 5, 4097])
def test_decode_add_encode_round_bf16_sizes_in_place_words_and_bad_input(n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    words = naive.encode_bf16(rng.standard_normal(n).astype(np.float32))
    rounded, expect = naive.decode_add_encode_round_bf16(x, words)
    dst, inplace = x.copy(), words.copy()
    K.decode_add_encode_round_bf16(dst, inplace, inplace)  # out may be src16 itself
    assert np.array_equal(inplace, expect)
    assert np.array_equal(dst.view(np.uint32), rounded.view(np.uint32))
    out = np.empty(n, np.uint16)
    with pytest.raises(TypeError):
        K.decode_add_encode_round_bf16(x.astype(np.float64), words, out)
    with pytest.raises(TypeError):
        K.decode_add_encode_round_bf16(x.copy(), words.astype(np.int32), out)
    with pytest.raises(ValueError):
        K.decode_add_encode_round_bf16(x.copy(), words, np.empty(n + 1, np.uint16))
    with pytest.raises(ValueError):
        K.decode_add_encode_round_bf16(x.copy(), np.empty(n + 1, np.uint16), out)
    if n > 1:
        shared = np.empty(n + 1, np.uint16)
        with pytest.raises(ValueError):  # out overlaps src16 by all but one word
            K.decode_add_encode_round_bf16(x.copy(), shared[:n], shared[1:])
    with pytest.raises(TypeError):
        K.decode_add_encode_round_bf16(x.copy(), words, out, alpha="half")


def test_encode_semantics_spot_checks():
    x = np.array([1.0, np.inf, -np.inf, np.nan, 65520.0, 65519.0, 2.0**-25, 2.0**-24, 1e-8],
                 np.float32)  # fmt: skip
    h = K.encode_fp16(x)
    assert [hex(v) for v in h] == ["0x3c00", "0x7c00", "0xfc00", "0x7e00", "0x7c00", "0x7bff",
                                   "0x0", "0x1", "0x0"]  # fmt: skip
    b = K.encode_bf16(x)
    assert [hex(v) for v in b[:4]] == ["0x3f80", "0x7f80", "0xff80", "0x7fc0"]
    snan = np.array([0x7F800001, 0xFF800001], np.uint32).view(np.float32)
    for enc, dec in ((K.encode_bf16, K.decode_bf16), (K.encode_fp16, K.decode_fp16)):
        back = np.empty(2, np.float32)
        dec(enc(snan), back)
        assert np.isnan(back).all()  # a NaN never becomes inf
    assert np.all(K.encode_bf16(snan) & 0x40)  # bf16 quietens it


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=300))
def test_encode_random_bit_patterns(bits):
    x = np.array(bits, np.uint32).view(np.float32)
    assert np.array_equal(K.encode_fp16(x), naive.encode_fp16(x))
    assert np.array_equal(K.encode_bf16(x), naive.encode_bf16(x))


ALL16 = np.arange(1 << 16, dtype=np.uint64).astype(np.uint16)


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # sNaN, pure Python
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("decode", "ref"), [(K.decode_fp16, naive.decode_fp16), (K.decode_bf16, naive.decode_bf16)]
)
def test_decode_all_words(decode, ref, dtype):
    h = ALL16 if JIT else np.ascontiguousarray(ALL16[::13])
    out = np.empty(h.size, dtype)
    decode(h, out)
    expect = ref(h, dtype)
    assert np.array_equal(out.view(np.uint8), expect.view(np.uint8))  # bit-exact, NaNs included


SIZES = [0, 1, 5, 4097] + ([_jit.BLOCK * 2 + 3] if JIT else [])


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_decode_add(fmt, n, dtype, parallel):
    rng = np.random.default_rng(n)
    enc = getattr(K, f"encode_{fmt}")
    dec_add = getattr(K, f"decode_add_{fmt}")
    dec = getattr(K, f"decode_{fmt}")
    h = enc(rng.standard_normal(n).astype(np.float32) * 100)
    dst = rng.standard_normal(n).astype(dtype)
    expect = dst + getattr(naive, f"decode_{fmt}")(h, dtype)
    dec_add(dst, h, parallel=parallel)
    assert np.array_equal(dst, expect)
    out = np.empty(n, dtype)
    dec(h, out, parallel=parallel)
    assert np.array_equal(out, getattr(naive, f"decode_{fmt}")(h, dtype))


def test_roundtrip_error_bounds():
    x = np.random.default_rng(1).standard_normal(10_000).astype(np.float32)
    for fmt, rel in (("bf16", 2.0**-8), ("fp16", 2.0**-11)):
        back = np.zeros_like(x)
        getattr(K, f"decode_add_{fmt}")(back, getattr(K, f"encode_{fmt}")(x))
        assert np.all(np.abs(back - x) <= rel * np.abs(x) + 2.0**-24)


def test_readonly_payload_is_accepted():
    payload = K.encode_bf16(np.ones(4, np.float32)).tobytes()
    h = np.frombuffer(payload, np.uint16)  # read-only, as received off the wire
    dst = np.zeros(4, np.float32)
    K.decode_add_bf16(dst, h)
    assert np.array_equal(dst, np.ones(4, np.float32))


@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_validation(fmt):
    enc = getattr(K, f"encode_{fmt}")
    dec = getattr(K, f"decode_{fmt}")
    dec_add = getattr(K, f"decode_add_{fmt}")
    x = np.zeros(8, np.float32)
    with pytest.raises(TypeError, match="float32"):
        enc(np.zeros(8, np.float64))
    with pytest.raises(TypeError, match="uint16"):
        enc(x, np.zeros(8, np.int16))
    with pytest.raises(ValueError, match="elements"):
        enc(x, np.zeros(7, np.uint16))
    with pytest.raises(ValueError, match="share memory"):
        enc(x, x.view(np.uint16)[:8])
    with pytest.raises(ValueError, match="contiguous"):
        enc(np.zeros(16, np.float32)[::2])
    with pytest.raises(TypeError, match="uint16"):
        dec(x, np.zeros(8, np.float32))
    with pytest.raises(TypeError, match="float32 or float64"):
        dec(np.zeros(8, np.uint16), np.zeros(8, np.float16))
    with pytest.raises(ValueError, match="share memory"):
        buf = np.zeros(8, np.float32)
        dec_add(buf, buf.view(np.uint16)[:8])
    with pytest.raises(ValueError, match="elements"):
        dec_add(x, np.zeros(9, np.uint16))
    with pytest.raises(TypeError, match="ndarray"):
        dec_add(x, [0] * 8)

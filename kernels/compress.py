"""Wire compression of float32 slices to 16-bit words: bfloat16 and IEEE half (fp16).

Encoding rounds to nearest, ties to even.  bf16 keeps float32's range: it is the top half of the
float32 bits, rounded, with NaNs kept NaN (and quiet).  fp16 follows ``np.float16`` bit for bit:
overflow goes to +-inf, small values to subnormals or signed zero, and a NaN keeps its sign and
top payload bits (so a quiet NaN stays quiet; a payload that would vanish becomes 0x7c01).

``decode_add_*`` decodes and accumulates in one pass, which is how a reduce-scatter owner sums
compressed slices as they arrive.  Decoding is exact; a float64 destination receives the exact
float32 value.  The block codecs ``dec16_vec`` / ``enc16_vec`` (format chosen by ``FP16`` /
``BF16``) serve :mod:`.reduce` and ``scale_bf16``, so those round exactly as the encoders do.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba import types as nt

from . import _validate as v
from ._jit import BLOCK, FLOAT_TYPES, INNER_OPTS, array, kernel, run

_U2 = nt.uint16
_U4 = nt.uint32

# --- scalar conversions (int64 arithmetic, identical under Numba and plain NumPy) -------------


@njit(**INNER_OPTS)
def _bf16_bits(x):
    """float32 bits -> bfloat16 bits, round to nearest even; NaN -> quiet NaN."""
    b = np.int64(x)
    nan = (b & 0x7FFFFFFF) > 0x7F800000
    rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    quiet = (b >> 16) | 0x40
    return quiet if nan else rounded


@njit(**INNER_OPTS)
def _fp16_bits(x):
    """float32 bits -> IEEE half bits, exactly as NumPy's float32 -> float16 cast."""
    b = np.int64(x)
    sign = (b >> 16) & 0x8000
    a = b & 0x7FFFFFFF
    # normal range [2**-14, 65520): rebias the exponent and round the 13 dropped bits
    normal = ((a - 0x38000000) + 0xFFF + ((a >> 13) & 1)) >> 13
    # subnormal or zero (a < 2**-14): round (1.mantissa) >> s, s in [14, 25]
    s = min(max(126 - (a >> 23), 14), 25)
    m = (a & 0x7FFFFF) | 0x800000
    r = m >> s
    rem = m & ((np.int64(1) << s) - 1)
    half = np.int64(1) << (s - 1)
    sub = r + ((rem > half) | ((rem == half) & ((r & 1) == 1)))
    # NaN keeps its top payload bits (and stays a NaN); overflow and inf give inf
    nan_bits = 0x7C00 + ((a & 0x7FFFFF) >> 13)
    nan_bits = 0x7C01 if nan_bits == 0x7C00 else nan_bits
    big = nan_bits if a > 0x7F800000 else 0x7C00
    out = normal if a >= 0x38800000 else sub
    out = big if a >= 0x47800000 else out
    return sign | out


@njit(**INNER_OPTS)
def _bf16_value(h):
    return np.uint32(np.uint32(h) << np.uint32(16)).view(np.float32)


@njit(**INNER_OPTS)
def _fp16_value(h):
    """IEEE half bits -> float32 value (exact)."""
    x = np.int64(h)
    sign = (x & 0x8000) << 16
    e = (x >> 10) & 0x1F
    m = x & 0x3FF
    normal = sign | ((e + 112) << 23) | (m << 13)
    special = sign | 0x7F800000 | (m << 13)
    bits = special if e == 0x1F else normal
    f = np.uint32(bits).view(np.float32)
    tiny = np.float32(m) * np.float32(5.9604644775390625e-08)  # m * 2**-24, exact
    tiny = -tiny if sign != 0 else tiny
    return tiny if e == 0 else f


#: Codes of the 16-bit formats, for the kernels that serve both (a runtime argument).
FP16 = 0
BF16 = 1

# --- loops ------------------------------------------------------------------------------------


@njit(**INNER_OPTS)
def _enc_bf16_vec(src, out):
    for i in range(out.size):
        out[i] = _bf16_bits(src[i])


@njit(**INNER_OPTS)
def _dec_bf16_vec(src, out):
    for i in range(out.size):
        out[i] = _bf16_value(src[i])


@njit(**INNER_OPTS)
def _decadd_bf16_vec(dst, src):
    for i in range(dst.size):
        dst[i] += _bf16_value(src[i])


@njit(**INNER_OPTS)
def _encround_bf16_vec(bits, out):
    for i in range(out.size):
        h = _bf16_bits(bits[i])
        out[i] = h
        bits[i] = np.uint32(h) << np.uint32(16)  # the decoded value, written back in place


@njit(**INNER_OPTS)
def _decadd_encround_bf16_vec(dst, src, out, alpha):
    for i in range(dst.size):
        x = (dst[i] + _bf16_value(src[i])) * alpha
        h = _bf16_bits(np.float32(x).view(np.uint32))
        out[i] = h
        dst[i] = _bf16_value(h)


@njit(**INNER_OPTS)
def _enc_fp16_vec(src, out):
    for i in range(out.size):
        out[i] = _fp16_bits(src[i])


@njit(**INNER_OPTS)
def _dec_fp16_vec(src, out):
    for i in range(out.size):
        out[i] = _fp16_value(src[i])


@njit(**INNER_OPTS)
def _decadd_fp16_vec(dst, src):
    for i in range(dst.size):
        dst[i] += _fp16_value(src[i])


@njit(**INNER_OPTS)
def dec16_vec(src, out, fmt):
    """16-bit words of format ``fmt`` -> float32 values (exact)."""
    if fmt == FP16:
        _dec_fp16_vec(src, out)
    else:
        _dec_bf16_vec(src, out)


@njit(**INNER_OPTS)
def enc16_vec(src, out, fmt):
    """float32 values -> 16-bit words of format ``fmt``, rounded as :func:`encode_fp16` /
    :func:`encode_bf16` do."""
    bits = src.view(np.uint32)
    if fmt == FP16:
        _enc_fp16_vec(bits, out)
    else:
        _enc_bf16_vec(bits, out)


@njit(**INNER_OPTS)
def _scale16_vec(buf, alpha, fmt):
    a = np.float32(alpha)
    if fmt == FP16:
        for i in range(buf.size):
            buf[i] = _fp16_bits(np.float32(_fp16_value(buf[i]) * a).view(np.uint32))
    else:
        for i in range(buf.size):
            buf[i] = _bf16_bits(np.float32(_bf16_value(buf[i]) * a).view(np.uint32))


# --- kernels ----------------------------------------------------------------------------------
# (a, b): (src, out) for encode/decode, (dst, src) for decode_add.


def _enc_bf16_s(a, b):
    _enc_bf16_vec(a, b)


def _enc_bf16_p(a, b):
    n = a.size
    for k in prange((n + BLOCK - 1) // BLOCK):
        lo = k * BLOCK
        hi = min(lo + BLOCK, n)
        _enc_bf16_vec(a[lo:hi], b[lo:hi])


def _dec_bf16_s(a, b):
    _dec_bf16_vec(a, b)


def _dec_bf16_p(a, b):
    n = a.size
    for k in prange((n + BLOCK - 1) // BLOCK):
        lo = k * BLOCK
        hi = min(lo + BLOCK, n)
        _dec_bf16_vec(a[lo:hi], b[lo:hi])


def _decadd_bf16_s(a, b):
    _decadd_bf16_vec(a, b)


def _decadd_bf16_p(a, b):
    n = a.size
    for k in prange((n + BLOCK - 1) // BLOCK):
        lo = k * BLOCK
        hi = min(lo + BLOCK, n)
        _decadd_bf16_vec(a[lo:hi], b[lo:hi])


def _enc_fp16_s(a, b):
    _enc_fp16_vec(a, b)


def _enc_fp16_p(a, b):
    n = a.size
    for k in prange((n + BLOCK - 1) // BLOCK):
        lo = k * BLOCK
        hi = min(lo + BLOCK, n)
        _enc_fp16_vec(a[lo:hi], b[lo:hi])


def _dec_fp16_s(a, b):
    _dec_fp16_vec(a, b)


def _dec_fp16_p(a, b):
    n = a.size
    for k in prange((n + BLOCK - 1) // BLOCK):
        lo = k * BLOCK
        hi = min(lo + BLOCK, n)
        _dec_fp16_vec(a[lo:hi], b[lo:hi])


def _decadd_fp16_s(a, b):
    _decadd_fp16_vec(a, b)


def _decadd_fp16_p(a, b):
    n = a.size
    for k in prange((n + BLOCK - 1) // BLOCK):
        lo = k * BLOCK
        hi = min(lo + BLOCK, n)
        _decadd_fp16_vec(a[lo:hi], b[lo:hi])


def _encround_bf16_s(a, b):
    _encround_bf16_vec(a, b)


def _encround_bf16_p(a, b):
    n = a.size
    for k in prange((n + BLOCK - 1) // BLOCK):
        lo = k * BLOCK
        hi = min(lo + BLOCK, n)
        _encround_bf16_vec(a[lo:hi], b[lo:hi])


def _decadd_encround_bf16_s(a, b, c, alpha):
    _decadd_encround_bf16_vec(a, b, c, alpha)


def _decadd_encround_bf16_p(a, b, c, alpha):
    n = a.size
    for k in prange((n + BLOCK - 1) // BLOCK):
        lo = k * BLOCK
        hi = min(lo + BLOCK, n)
        _decadd_encround_bf16_vec(a[lo:hi], b[lo:hi], c[lo:hi], alpha)


def _scale16_s(buf, alpha, fmt):
    _scale16_vec(buf, alpha, fmt)


def _scale16_p(buf, alpha, fmt):
    n = buf.size
    for k in prange((n + BLOCK - 1) // BLOCK):
        lo = k * BLOCK
        _scale16_vec(buf[lo : min(lo + BLOCK, n)], alpha, fmt)


_ENC_SIG = {"f": nt.void(array(_U4, True), array(_U2))}  # float32 bits in, 16-bit words out
_ENCROUND_SIG = {"f": nt.void(array(_U4), array(_U2))}  # float32 bits in and out, words out
_DEC_SIG = {ch: nt.void(array(_U2, True), array(t)) for ch, t in FLOAT_TYPES.items()}
_DECADD_SIG = {ch: nt.void(array(t), array(_U2, True)) for ch, t in FLOAT_TYPES.items()}

_ENC_BF16 = kernel(_enc_bf16_s, _enc_bf16_p, _ENC_SIG)
_DEC_BF16 = kernel(_dec_bf16_s, _dec_bf16_p, _DEC_SIG)
_ENCROUND_BF16 = kernel(_encround_bf16_s, _encround_bf16_p, _ENCROUND_SIG)
_DECADD_BF16 = kernel(_decadd_bf16_s, _decadd_bf16_p, _DECADD_SIG)
_DECADD_ENCROUND_BF16 = kernel(
    _decadd_encround_bf16_s,
    _decadd_encround_bf16_p,
    {"f": nt.void(array(nt.float32), array(_U2, True), array(_U2), nt.float32)},
)
_ENC_FP16 = kernel(_enc_fp16_s, _enc_fp16_p, _ENC_SIG)
_DEC_FP16 = kernel(_dec_fp16_s, _dec_fp16_p, _DEC_SIG)
_DECADD_FP16 = kernel(_decadd_fp16_s, _decadd_fp16_p, _DECADD_SIG)

_SCALE16 = kernel(_scale16_s, _scale16_p, {"H": nt.void(array(_U2), nt.float32, nt.int64)})

# --- public wrappers --------------------------------------------------------------------------


def _encode(k, src, out, parallel):
    src = v.flat(src, "src", "f")
    if out is None:
        out = np.empty(src.size, np.uint16)
        res = out
    else:
        res = out
        out = v.flat(out, "out", "H", True)
        v.same_size(out, "out", src, "src")
        v.no_overlap(out, "out", src, "src")
    run(k, "f", src.size, parallel, src.view(np.uint32), out)
    return res


def _decode(k, src16, out, parallel):
    src16 = v.flat(src16, "src16", "H")
    out = v.flat(out, "out", "fd", True)
    v.same_size(out, "out", src16, "src16")
    v.no_overlap(out, "out", src16, "src16")
    run(k, out.dtype.char, out.size, parallel, src16, out)


def _decode_add(k, dst, src16, parallel):
    dst = v.flat(dst, "dst", "fd", True)
    src16 = v.flat(src16, "src16", "H")
    v.same_size(src16, "src16", dst, "dst")
    v.no_overlap(dst, "dst", src16, "src16")
    run(k, dst.dtype.char, dst.size, parallel, dst, src16)


def encode_bf16(
    src: np.ndarray, out: np.ndarray | None = None, *, parallel: bool | None = None
) -> np.ndarray:
    """float32 -> bfloat16 words (uint16), round to nearest even; returns ``out`` (new if None).

    ``out`` must not overlap ``src``.
    """
    return _encode(_ENC_BF16, src, out, parallel)


def encode_round_bf16(buf: np.ndarray, out: np.ndarray, *, parallel: bool | None = None) -> None:
    """``out = encode_bf16(buf)`` and ``buf = decode_bf16(out)``, in one pass.

    What a slice owner sends and keeps must be the same bits on every rank: this rounds its
    float32 buffer to bfloat16 in place while writing the words it sends.
    """
    buf = v.flat(buf, "buf", "f", True)
    out = v.flat(out, "out", "H", True)
    v.same_size(out, "out", buf, "buf")
    v.no_overlap(out, "out", buf, "buf")
    run(_ENCROUND_BF16, "f", buf.size, parallel, buf.view(np.uint32), out)


def decode_bf16(src16: np.ndarray, out: np.ndarray, *, parallel: bool | None = None) -> None:
    """bfloat16 words -> ``out`` (float32 or float64), exactly."""
    _decode(_DEC_BF16, src16, out, parallel)


def decode_add_bf16(dst: np.ndarray, src16: np.ndarray, *, parallel: bool | None = None) -> None:
    """``dst += decode(src16)`` in one pass (``dst`` float32 or float64)."""
    _decode_add(_DECADD_BF16, dst, src16, parallel)


def decode_add_encode_round_bf16(
    dst: np.ndarray,
    src16: np.ndarray,
    out: np.ndarray,
    *,
    alpha: float = 1.0,
    parallel: bool | None = None,
) -> None:
    """``dst = (dst + decode(src16)) * alpha``, then :func:`encode_round_bf16` of it into
    ``out``, in one pass (``dst`` float32; ``alpha`` rounded to float32).

    The owner of a compressed slice does exactly this with the last contribution it receives:
    add it, apply the mean's scale, and round to the words it shares. One pass instead of
    three, with the same bits as ``decode_add_bf16``, ``scale_`` and ``encode_round_bf16``.
    ``out`` may be ``src16`` itself (each word is read before it is written).
    """
    dst = v.flat(dst, "dst", "f", True)
    src16 = v.flat(src16, "src16", "H")
    out = v.flat(out, "out", "H", True)
    v.same_size(src16, "src16", dst, "dst")
    v.same_size(out, "out", dst, "dst")
    v.no_overlap(out, "out", dst, "dst")
    v.no_partial_overlap(out, "out", src16, "src16")
    alpha = v.real(alpha, "alpha")
    run(_DECADD_ENCROUND_BF16, "f", dst.size, parallel, dst, src16, out, alpha)


def encode_fp16(
    src: np.ndarray, out: np.ndarray | None = None, *, parallel: bool | None = None
) -> np.ndarray:
    """float32 -> IEEE half words (uint16), bit-identical to ``src.astype(np.float16)``."""
    return _encode(_ENC_FP16, src, out, parallel)


def decode_fp16(src16: np.ndarray, out: np.ndarray, *, parallel: bool | None = None) -> None:
    """IEEE half words -> ``out`` (float32 or float64), exactly."""
    _decode(_DEC_FP16, src16, out, parallel)


def decode_add_fp16(dst: np.ndarray, src16: np.ndarray, *, parallel: bool | None = None) -> None:
    """``dst += decode(src16)`` in one pass (``dst`` float32 or float64)."""
    _decode_add(_DECADD_FP16, dst, src16, parallel)


def scale16(buf16: np.ndarray, alpha: float, fmt: int, parallel: bool | None) -> None:
    """``buf16 *= alpha`` on checked words of format ``fmt``: in float32, rounded once."""
    run(_SCALE16, "H", buf16.size, parallel, buf16, alpha, fmt)


def scale_bf16(buf16: np.ndarray, alpha: float, *, parallel: bool | None = None) -> None:
    """``buf16 *= alpha`` on bfloat16 words in place: decoded exactly, multiplied in float32 by
    ``alpha`` rounded to float32, and rounded once back as :func:`encode_bf16` does.

    A mean over bf16 buffers is :func:`reduce_into_bf16` with ``"sum"``, then this.
    """
    buf16 = v.flat(buf16, "buf16", "H", True)
    scale16(buf16, v.real(alpha, "alpha"), BF16, parallel)

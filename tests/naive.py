"""Plain NumPy references for every kernel in ``p2pdl.kernels``.

Each function returns new arrays instead of working in place, and is written for clarity, not
speed: the tests compare the kernels against these.
"""

from __future__ import annotations

import numpy as np


def add(dst: np.ndarray, src: np.ndarray) -> np.ndarray:
    return dst + src


def sum_into(srcs: list[np.ndarray]) -> np.ndarray:
    """Left-to-right sum, exactly as chained in-place ``np.add`` calls."""
    out = srcs[0].copy()
    for s in srcs[1:]:
        np.add(out, s, out=out)
    return out


def scale(buf: np.ndarray, alpha: float) -> np.ndarray:
    """``buf * alpha`` in the buffer's dtype; float16 computes in float32 and rounds once."""
    if buf.dtype == np.float16:
        with np.errstate(over="ignore", invalid="ignore"):
            return (buf.astype(np.float32) * np.float32(alpha)).astype(np.float16)
    return buf * buf.dtype.type(alpha)


REDUCE_UFUNCS = {"sum": np.add, "prod": np.multiply, "min": np.minimum, "max": np.maximum}
BOOL_UFUNCS = {"sum": np.logical_or, "prod": np.logical_and, "min": np.logical_and,
               "max": np.logical_or}  # fmt: skip


def reduce_into(srcs: list[np.ndarray], op: str) -> np.ndarray:
    """Chained in-place ufunc calls, left to right: ``((s0 op s1) op s2) ...``.

    Integers wrap around (NumPy's array arithmetic); bool uses logical or/and; float16 is
    reduced in float32 and rounded once at the end.
    """
    if srcs[0].dtype == np.float16:
        wide = [s.astype(np.float32) for s in srcs]
        with np.errstate(over="ignore", invalid="ignore"):
            return reduce_into(wide, op).astype(np.float16)
    ufunc = (BOOL_UFUNCS if srcs[0].dtype == np.bool_ else REDUCE_UFUNCS)[op]
    out = srcs[0].copy()
    with np.errstate(over="ignore", invalid="ignore"):
        for s in srcs[1:]:
            ufunc(out, s, out=out)
    return out


def reduce_into_bf16(srcs16: list[np.ndarray], op: str) -> np.ndarray:
    """bf16 words: decoded, reduced in float32 left to right, rounded once by encode_bf16."""
    return encode_bf16(reduce_into([decode_bf16(h) for h in srcs16], op))


def scale_bf16(buf16: np.ndarray, alpha: float) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return encode_bf16(decode_bf16(buf16) * np.float32(alpha))


def axpy(dst: np.ndarray, alpha: float, src: np.ndarray) -> np.ndarray:
    return dst + dst.dtype.type(alpha) * src


def encode_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits: round to nearest even; NaN -> same sign, quiet bit set."""
    b = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    nan = (b & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, (b >> 16) | 0x40, rounded).astype(np.uint16)


def decode_bf16(h: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # signalling NaNs widen to quiet ones
        return (h.astype(np.uint32) << 16).view(np.float32).astype(dtype)


def encode_round_bf16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the rounded float32 values, the bfloat16 words) of `x`."""
    words = encode_bf16(x)
    return (words.astype(np.uint32) << 16).view(np.float32), words


def decode_add_encode_round_bf16(
    dst: np.ndarray, src16: np.ndarray, alpha: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """(the rounded float32 values, the words) of (dst + decode(src16)) * alpha in float32."""
    with np.errstate(invalid="ignore", over="ignore"):
        total = (dst.astype(np.float32) + decode_bf16(src16)) * np.float32(alpha)
    return encode_round_bf16(total)


def encode_fp16(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(np.float32).astype(np.float16).view(np.uint16)


def decode_fp16(h: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return h.view(np.float16).astype(np.float32).astype(dtype)


def slice_bounds(n: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """Deal the ``n // align`` units out round-robin, then give the tail to the last slice."""
    units, rest = divmod(n, align)
    sizes = [0] * parts
    for u in range(units):
        sizes[u % parts] += align
    sizes[-1] += rest
    out, start = [], 0
    for s in sizes:
        out.append((start, start + s))
        start += s
    return out


def sgd_step(w, g, buf, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
             first_step):  # fmt: skip
    """torch.optim.SGD single-tensor formulas; returns (w, buf)."""
    t = w.dtype.type
    d = g + t(weight_decay) * w if weight_decay != 0 else g.copy()
    if momentum != 0:
        buf = d.copy() if first_step else buf * t(momentum) + t(1 - dampening) * d
        d = d + t(momentum) * buf if nesterov else buf
    return w + t(-lr) * d, buf


def adam_step(w, g, m, v, *, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
              decoupled=False, amsgrad=False, vmax=None):  # fmt: skip
    """torch.optim.Adam / AdamW single-tensor formulas; returns (w, m, v, vmax)."""
    t = w.dtype.type
    w = w.copy()
    if weight_decay != 0:
        if decoupled:
            w = w * t(1 - lr * weight_decay)
        else:
            g = g + t(weight_decay) * w
    wt = 1 - beta1  # torch's lerp switches formula at weight 0.5
    m = m + t(wt) * (g - m) if wt < 0.5 else g + (t(wt) - t(1)) * (g - m)
    v = v * t(beta2) + t(1 - beta2) * g * g
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    if amsgrad:
        vmax = np.maximum(vmax, v)
        denom = np.sqrt(vmax) / t(bc2**0.5) + t(eps)
    else:
        denom = np.sqrt(v) / t(bc2**0.5) + t(eps)
    return w + t(-lr / bc1) * (m / denom), m, v, vmax

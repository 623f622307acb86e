"""Optimizer steps on one weight slice, with torch.optim's formulas and operation order.

Phase 2 of the AllReduce leaves each node owning one slice of the weights and the reduced
gradient for it; these kernels update that slice in one pass over memory (torch's single-tensor
implementation makes several).  The gradient is only read, never written: callers may reuse it.
Scalars are rounded to the arrays' dtype before use, as torch does for its tensor ops.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba import types as nt

from . import _validate as v
from ._jit import BLOCK, FLOAT_TYPES, INNER_OPTS, array, kernel, run


@njit(**INNER_OPTS)
def _sgd_vec(w, g, buf, lr, momentum, one_minus_damp, wd, nesterov, first):
    """torch.optim.SGD (foreach=False): wd, momentum buffer, nesterov, ``w += -lr * d``."""
    neg_lr = -lr
    use_wd = wd != 0
    if momentum == 0:
        for i in range(w.size):
            d = g[i] + wd * w[i] if use_wd else g[i]
            w[i] = w[i] + neg_lr * d
    else:
        for i in range(w.size):
            d = g[i] + wd * w[i] if use_wd else g[i]
            b = d if first else buf[i] * momentum + one_minus_damp * d
            buf[i] = b
            d = d + momentum * b if nesterov else b
            w[i] = w[i] + neg_lr * d


@njit(**INNER_OPTS)
def _adam_vec(
    w, g, m, s, smax, neg_step_size, bc2_sqrt, lerp_w, beta2, omb2, eps, wd, decay, flags
):
    """torch.optim.Adam/AdamW (foreach=False) for one slice.

    ``flags``: bit 0 weight decay, bit 1 decoupled (AdamW), bit 2 amsgrad, bit 3 "large lerp
    weight": torch's ``lerp(m, g, wt)`` is ``m + wt * (g - m)`` for ``wt < 0.5`` and
    ``g + (wt - 1) * (g - m)`` otherwise; ``lerp_w`` is ``wt`` or ``wt - 1`` accordingly.
    """
    use_wd = (flags & 1) != 0
    decoupled = (flags & 2) != 0
    amsgrad = (flags & 4) != 0
    lerp_hi = (flags & 8) != 0
    for i in range(w.size):
        wi = w[i]
        gi = g[i]
        if use_wd:
            if decoupled:
                wi = wi * decay
            else:
                gi = gi + wd * wi
        mi = m[i]
        # exp_avg.lerp_(grad, 1 - beta1)
        base = gi if lerp_hi else mi
        mi = base + lerp_w * (gi - mi)
        # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        si = s[i] * beta2 + omb2 * gi * gi
        m[i] = mi
        s[i] = si
        if amsgrad:
            si = max(smax[i], si)
            smax[i] = si
        # denom = (sqrt(v) / sqrt(bias_correction2)) + eps; w.addcdiv_(m, denom, -step_size)
        denom = np.sqrt(si) / bc2_sqrt + eps
        w[i] = wi + neg_step_size * (mi / denom)


def _sgd_s(w, g, buf, lr, momentum, omd, wd, nesterov, first):
    _sgd_vec(w, g, buf, lr, momentum, omd, wd, nesterov, first)


def _sgd_p(w, g, buf, lr, momentum, omd, wd, nesterov, first):
    n = w.size
    has_buf = buf.size == n
    for k in prange((n + BLOCK - 1) // BLOCK):
        lo = k * BLOCK
        hi = min(lo + BLOCK, n)
        b = buf[lo:hi] if has_buf else buf[0:0]
        _sgd_vec(w[lo:hi], g[lo:hi], b, lr, momentum, omd, wd, nesterov, first)


def _adam_s(w, g, m, s, smax, nss, bc2s, lw, beta2, omb2, eps, wd, decay, flags):
    _adam_vec(w, g, m, s, smax, nss, bc2s, lw, beta2, omb2, eps, wd, decay, flags)


def _adam_p(w, g, m, s, smax, nss, bc2s, lw, beta2, omb2, eps, wd, decay, flags):
    n = w.size
    has_max = smax.size == n
    for k in prange((n + BLOCK - 1) // BLOCK):
        lo = k * BLOCK
        hi = min(lo + BLOCK, n)
        mx = smax[lo:hi] if has_max else smax[0:0]
        _adam_vec(
            w[lo:hi], g[lo:hi], m[lo:hi], s[lo:hi], mx, nss, bc2s, lw, beta2, omb2, eps, wd,
            decay, flags,
        )  # fmt: skip


def _sgd_sig(t):
    w, r = array(t), array(t, True)
    return nt.void(w, r, w, t, t, t, t, nt.boolean, nt.boolean)


def _adam_sig(t):
    w, r = array(t), array(t, True)
    return nt.void(w, r, w, w, w, t, t, t, t, t, t, t, t, nt.int64)


_SGD = kernel(_sgd_s, _sgd_p, {ch: _sgd_sig(t) for ch, t in FLOAT_TYPES.items()})
_ADAM = kernel(_adam_s, _adam_p, {ch: _adam_sig(t) for ch, t in FLOAT_TYPES.items()})

_EMPTY = {"f": np.empty(0, np.float32), "d": np.empty(0, np.float64)}


def _state(a: object, name: str, w: np.ndarray, others: list[tuple[np.ndarray, str]]) -> np.ndarray:
    a = v.like(a, name, w, "w", True)
    for o, oname in others:
        v.no_overlap(a, name, o, oname)
    return a


def sgd_step(
    w: np.ndarray,
    g: np.ndarray,
    momentum_buf: np.ndarray | None,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    first_step: bool,
    parallel: bool | None = None,
) -> None:
    """One ``torch.optim.SGD`` step on the slice ``w`` with gradient ``g`` (left unchanged).

    With ``momentum != 0`` the buffer is updated in place; on ``first_step`` it is set to the
    (weight-decayed) gradient, as torch does when it creates it.  ``momentum_buf`` may be None
    or empty when ``momentum == 0``.
    """
    w = v.flat(w, "w", "fd", True)
    g = v.like(g, "g", w, "w")
    v.no_overlap(w, "w", g, "g")
    lr = v.real(lr, "lr")
    momentum = v.real(momentum, "momentum")
    dampening = v.real(dampening, "dampening")
    weight_decay = v.real(weight_decay, "weight_decay")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov momentum requires momentum > 0 and dampening == 0")
    key = w.dtype.char
    if momentum == 0:
        buf = _EMPTY[key]
    else:
        if momentum_buf is None:
            raise ValueError("momentum_buf is required when momentum != 0")
        buf = _state(momentum_buf, "momentum_buf", w, [(w, "w"), (g, "g")])
    run(
        _SGD, key, w.size, parallel,
        w, g, buf, lr, momentum, 1.0 - dampening, weight_decay, bool(nesterov), bool(first_step),
    )  # fmt: skip


def adam_step(
    w: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    v2: np.ndarray,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    amsgrad: bool = False,
    vmax: np.ndarray | None = None,
    parallel: bool | None = None,
) -> None:
    """One ``torch.optim.Adam`` (or ``AdamW`` with ``decoupled=True``) step on the slice ``w``.

    ``m``/``v2`` are the first/second moment buffers (start at zero), ``step`` the 1-based count
    including this step, ``vmax`` the running maximum of ``v2`` (needed with ``amsgrad``).
    ``g`` is left unchanged.
    """
    w = v.flat(w, "w", "fd", True)
    g = v.like(g, "g", w, "w")
    v.no_overlap(w, "w", g, "g")
    m = _state(m, "m", w, [(w, "w"), (g, "g")])
    v2 = _state(v2, "v2", w, [(w, "w"), (g, "g"), (m, "m")])
    key = w.dtype.char
    if amsgrad:
        if vmax is None:
            raise ValueError("vmax is required when amsgrad=True")
        vmax = _state(vmax, "vmax", w, [(w, "w"), (g, "g"), (m, "m"), (v2, "v2")])
    else:
        vmax = _EMPTY[key]
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if step < 1:
        raise ValueError(f"step must be >= 1 (1-based, counting this step), got {step}")
    lr = v.real(lr, "lr")
    beta1 = v.real(beta1, "beta1")
    beta2 = v.real(beta2, "beta2")
    eps = v.real(eps, "eps")
    weight_decay = v.real(weight_decay, "weight_decay")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"betas must lie in [0, 1), got ({beta1}, {beta2})")
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    lerp_w = 1 - beta1
    lerp_hi = lerp_w >= 0.5
    if lerp_hi:  # torch forms (wt - 1) in the tensor dtype; exact there (Sterbenz), so here too
        lerp_w = (float(np.float32(lerp_w)) if key == "f" else lerp_w) - 1.0
    flags = (weight_decay != 0) | (bool(decoupled) << 1) | (bool(amsgrad) << 2) | (lerp_hi << 3)
    run(
        _ADAM, key, w.size, parallel,
        w, g, m, v2, vmax, -step_size, bias_correction2**0.5, lerp_w, beta2, 1 - beta2,
        eps, weight_decay, 1 - lr * weight_decay, flags,
    )  # fmt: skip

"""Sharded optimizer steps: against the NumPy references, and against torch.optim over 100 steps."""

from __future__ import annotations

import naive
import numba
import numpy as np
import pytest

import p2pdl.kernels as K
from p2pdl.kernels import _jit

JIT = not numba.config.DISABLE_JIT
N = 1000 if JIT else 150
TOL = {np.float32: 1e-5, np.float64: 1e-6}

SGD_CASES = [
    {"lr": 0.1},
    {"lr": 0.1, "weight_decay": 0.01},
    {"lr": 0.05, "momentum": 0.9},
    {"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.02},
    {"lr": 0.05, "momentum": 0.8, "nesterov": True},
    {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.05},
]
ADAM_CASES = [
    {"lr": 1e-2},
    {"lr": 1e-2, "weight_decay": 0.1},
    {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True},
    {"lr": 3e-3, "betas": (0.5, 0.99), "eps": 1e-6},  # lerp weight 0.5: torch's other branch
    {"lr": 3e-3, "betas": (0.2, 0.9), "amsgrad": True},
]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def grads(rng: np.random.Generator, n: int, dtype: type) -> np.ndarray:
    return (rng.standard_normal(n) * rng.uniform(0.1, 3.0)).astype(dtype)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", SGD_CASES)
def test_sgd_vs_naive(case, dtype, parallel):
    rng = np.random.default_rng(0)
    n = _jit.BLOCK + 17 if JIT and parallel else N
    w = rng.standard_normal(n).astype(dtype)
    buf = np.zeros(n, dtype)
    ref_w, ref_buf = w.copy(), buf.copy()
    for step in range(3):
        g = grads(rng, n, dtype)
        g_before = g.copy()
        ref_w, ref_buf = naive.sgd_step(ref_w, g, ref_buf, first_step=step == 0, **case)
        K.sgd_step(w, g, buf, first_step=step == 0, parallel=parallel, **case)
        assert np.array_equal(g, g_before)  # the gradient is never written
        np.testing.assert_allclose(w, ref_w, rtol=TOL[dtype] / 10, atol=0)
        if case.get("momentum"):
            np.testing.assert_allclose(buf, ref_buf, rtol=TOL[dtype] / 10, atol=0)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("case", ADAM_CASES)
def test_adam_vs_naive(case, decoupled, dtype, parallel):
    rng = np.random.default_rng(1)
    n = _jit.BLOCK + 17 if JIT and parallel else N
    case = dict(case)
    beta1, beta2 = case.pop("betas", (0.9, 0.999))
    w = rng.standard_normal(n).astype(dtype)
    m, v, vmax = (np.zeros(n, dtype) for _ in range(3))
    ref = (w.copy(), m.copy(), v.copy(), vmax.copy())
    for step in range(1, 4):
        g = grads(rng, n, dtype)
        g_before = g.copy()
        kw = dict(case, beta1=beta1, beta2=beta2, decoupled=decoupled, step=step)
        ref = naive.adam_step(ref[0], g, ref[1], ref[2], vmax=ref[3], **kw)
        K.adam_step(w, g, m, v, vmax=vmax, parallel=parallel, **kw)
        assert np.array_equal(g, g_before)
        for got, want in zip((w, m, v), ref[:3], strict=True):
            np.testing.assert_allclose(got, want, rtol=TOL[dtype] / 10, atol=1e-30)


# --- against torch.optim over 100 steps -------------------------------------------------------


def _torch_run(opt_name, case, dtype, steps=100, n=N):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(42)
    w0 = rng.standard_normal(n).astype(dtype)
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[opt_name]
    opt = cls([p], foreach=False, **case)
    w = w0.copy()
    s1, s2, s3 = (np.zeros(n, dtype) for _ in range(3))
    case = dict(case)
    beta1, beta2 = case.pop("betas", (0.9, 0.999))
    if opt_name == "adamw":
        case.setdefault("weight_decay", 0.01)  # AdamW's default
    for step in range(1, steps + 1):
        g = grads(rng, n, dtype)
        p.grad = torch.from_numpy(g.copy())
        opt.step()
        if opt_name == "sgd":
            K.sgd_step(w, g, s1, first_step=step == 1, **case)
        else:
            K.adam_step(w, g, s1, s2, vmax=s3, step=step, beta1=beta1, beta2=beta2,
                        decoupled=opt_name == "adamw", **case)  # fmt: skip
    return w, p.detach().numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", SGD_CASES)
def test_sgd_matches_torch(case, dtype):
    w, ref = _torch_run("sgd", case, dtype)
    assert rel_err(w, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("opt_name", ["adam", "adamw"])
@pytest.mark.parametrize("case", ADAM_CASES)
def test_adam_matches_torch(case, opt_name, dtype):
    w, ref = _torch_run(opt_name, case, dtype)
    assert rel_err(w, ref) <= TOL[dtype]


# --- validation -------------------------------------------------------------------------------


def _arrays(n=8, dtype=np.float32):
    return [np.zeros(n, dtype) for _ in range(5)]


def test_sgd_validation():
    w, g, b, _, _ = _arrays()
    K.sgd_step(w, g, None, lr=0.1, first_step=True)  # no buffer needed without momentum
    with pytest.raises(ValueError, match="momentum_buf"):
        K.sgd_step(w, g, None, lr=0.1, momentum=0.9, first_step=True)
    with pytest.raises(ValueError, match="nesterov"):
        K.sgd_step(w, g, b, lr=0.1, nesterov=True, first_step=True)
    with pytest.raises(ValueError, match="nesterov"):
        K.sgd_step(w, g, b, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True, first_step=True)
    with pytest.raises(ValueError, match="share memory"):
        K.sgd_step(w, w, b, lr=0.1, first_step=True)
    with pytest.raises(ValueError, match="share memory"):
        K.sgd_step(w, g, w, lr=0.1, momentum=0.9, first_step=True)
    with pytest.raises(TypeError, match="dtype"):
        K.sgd_step(w, np.zeros(8, np.float64), b, lr=0.1, first_step=True)
    with pytest.raises(ValueError, match="elements"):
        K.sgd_step(w, g, np.zeros(7, np.float32), lr=0.1, momentum=0.5, first_step=True)
    with pytest.raises(TypeError, match="lr"):
        K.sgd_step(w, g, b, lr="0.1", first_step=True)
    with pytest.raises(TypeError):
        K.sgd_step(w, g, b, lr=0.1)  # first_step is required


def test_adam_validation():
    w, g, m, v, _ = _arrays()
    with pytest.raises(ValueError, match="vmax"):
        K.adam_step(w, g, m, v, step=1, lr=0.1, amsgrad=True)
    with pytest.raises(ValueError, match="step"):
        K.adam_step(w, g, m, v, step=0, lr=0.1)
    with pytest.raises(TypeError, match="step"):
        K.adam_step(w, g, m, v, step=1.0, lr=0.1)
    with pytest.raises(ValueError, match="betas"):
        K.adam_step(w, g, m, v, step=1, lr=0.1, beta2=1.0)
    with pytest.raises(ValueError, match="share memory"):
        K.adam_step(w, g, m, m, step=1, lr=0.1)
    with pytest.raises(ValueError, match="share memory"):
        K.adam_step(w, g, m, v, step=1, lr=0.1, amsgrad=True, vmax=v)
    ro = np.zeros(8, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        K.adam_step(w, g, ro, v, step=1, lr=0.1)
    K.adam_step(w, ro, m, v, step=1, lr=0.1)  # a read-only gradient is fine

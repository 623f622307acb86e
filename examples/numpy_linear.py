"""A tiny numpy-only training task: linear regression with 1024 float32 weights (4 KiB).

    python -m p2pdl node --lead --job examples.numpy_linear:task --nodes 2      # one terminal
    python -m p2pdl node --leader 127.0.0.1:PORT                               # another

Synthetic data: `features` standard-normal inputs per sample (1023 by default, plus a
bias: 1024 weights), targets from a fixed random "true" weight vector plus noise; both are
generated from `data_seed`, so every node builds the same dataset. `step` returns the summed
squared-error loss (halved) and writes the summed gradient, as the task interface asks.

Job parameters (`params`): features, noise, data_seed, optimizer (an OptimizerConfig
mapping), step_delay_s (an artificial compute time per step, for demonstrations).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from p2pdl.schedule.task import TaskContext


class LinearRegression:
    """Least squares on synthetic data; the model is one flat float32 vector."""

    spec: dict[str, Any] = {
        "dataset_size": 4096,
        "global_batch": 64,
        "epochs": 2,
        "seed": 0,
        "lr": 0.05,
        "params": {"features": 1023, "noise": 0.01, "data_seed": 1234},
    }
    inline = True
    """Steps take microseconds: run them on the event loop thread."""

    def setup(self, ctx: TaskContext) -> None:
        p = ctx.params
        features = int(p.get("features", 1023))
        n = ctx.job.dataset_size
        rng = np.random.default_rng(int(p.get("data_seed", 1234)))
        self.x = rng.standard_normal((n, features), dtype=np.float32) / np.float32(
            np.sqrt(features)
        )
        true_w = rng.standard_normal(features).astype(np.float32)
        true_b = np.float32(0.5)
        noise = np.float32(p.get("noise", 0.01))
        self.y = self.x @ true_w + true_b + noise * rng.standard_normal(n, dtype=np.float32)
        self.delay = float(p.get("step_delay_s", 0.0))
        optimizer = p.get("optimizer", {"kind": "sgd", "momentum": 0.9})
        ctx.init_model(np.zeros(features + 1, np.float32), optimizer)

    def step(self, ctx: TaskContext, samples: np.ndarray, lr: float) -> dict[str, Any]:
        x = self.x[samples]
        w = ctx.weights
        residual = x @ w[:-1] + w[-1] - self.y[samples]
        grad = ctx.grad
        np.dot(residual, x, out=grad[:-1])
        grad[-1] = residual.sum()
        if self.delay:
            time.sleep(self.delay)  # simulated compute time, not synchronisation
        return {"loss": float(0.5 * residual @ residual), "count": int(samples.size)}


task = LinearRegression
"""The reference for `--job examples.numpy_linear:task` (a zero-argument factory)."""

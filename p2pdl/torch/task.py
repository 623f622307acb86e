"""`TorchTask`: a torch training task, for the group-scheduled runtime and for plain loops."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from p2pdl.collectives import timeline
from p2pdl.errors import P2PDLError
from p2pdl.torch.flat import FlatParameters
from p2pdl.torch.optim import ShardedOptimizer, optimizer_config

__all__ = ["TorchTask", "default_partitions"]

_SEED_LOCK = threading.Lock()
"""torch's default generator is process-wide: seeding and drawing from it must not interleave."""


def default_partitions() -> int:
    """Local replicas per node when not told: the cores torch's intra-op threads leave idle.

    ``max(1, os.cpu_count() // torch.get_num_threads())`` — 1 on a machine where torch already
    uses every core, more when each process is limited to fewer threads than there are cores.
    """
    return max(1, (os.cpu_count() or 1) // max(1, torch.get_num_threads()))


def _batch(dataset: Any, indices: Sequence[int]) -> Any:
    """Samples `indices` of an indexable data set, stacked into a batch."""
    if isinstance(dataset, tuple) and dataset and isinstance(dataset[0], torch.Tensor):
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return tuple(t[index] for t in dataset)
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, tuple):  # torch.utils.data.TensorDataset
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return tuple(t[index] for t in tensors)
    getitems = getattr(dataset, "__getitems__", None)
    items = getitems(list(indices)) if getitems is not None else [dataset[i] for i in indices]
    from torch.utils.data import default_collate

    return default_collate(items)


def _split(indices: Sequence[int], k: int) -> list[list[int]]:
    n = len(indices)
    bounds = [n * i // k for i in range(k + 1)]
    return [list(indices[bounds[i] : bounds[i + 1]]) for i in range(k)]


@dataclass
class TorchTask:
    """A torch training task: for p2pdl's group-scheduled runtime, and for standalone loops.

    `model_fn()` builds the model (called under `torch.manual_seed(seed)` on every node;
    every node starts from rank 0's weights anyway), `loss_fn(output, target)` returns the
    mean loss of a batch, `dataset` is indexable (a `(inputs, targets)` tuple of tensors, a
    TensorDataset, or anything whose items `default_collate` stacks), `optimizer` an
    optimizer config ({"kind": "sgd"|"adam"|"adamw", "lr": ..., torch.optim's settings}).

    **Job mode** (`python -m p2pdl node --lead --job module:task`): `spec` gives the runtime
    the data set size, global batch, learning rate and epochs; `setup(ctx)` registers the
    flat weights with `ctx.init_model` and points the model (and `partitions - 1` replica
    copies) at the runtime's weight buffer and at one gradient buffer each; `step(ctx,
    samples, lr)` runs the replicas' forward/backward in threads and leaves the **summed**
    per-sample gradient in every buffer. The runtime does phase 1 (sum of the replicas'
    buffers), phase 2 and the sharded optimizer.

    **Standalone** (:func:`train`, a blocking node): `setup(node)` builds the same and a
    :class:`ShardedOptimizer`; :meth:`local_step` does forward/backward and the sharded step.
    """

    model_fn: Callable[[], torch.nn.Module]
    loss_fn: Callable[[Any, Any], torch.Tensor]
    dataset: Any
    optimizer: Any = field(default_factory=lambda: {"kind": "sgd", "lr": 0.1})
    partitions: int | None = None
    seed: int = 0
    strategy: str = "allreduce"
    eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None
    global_batch: int = 64
    epochs: int = 1
    lr_schedule: dict[str, Any] | None = None
    """A job LR schedule mapping (`LRSchedule` fields); default: constant `optimizer` lr."""
    compression: str | None = None
    """Wire compression of the sharded step: `"int8-ef"` (8-bit, error feedback) or
    `"powersgd:rank=R"` (low-rank factors, error feedback)."""

    def __post_init__(self) -> None:
        self.config = optimizer_config(self.optimizer)
        self.model: torch.nn.Module | None = None
        self.replicas: list[torch.nn.Module] = []
        self.flats: list[FlatParameters] = []
        self.sharded: ShardedOptimizer | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.dataset[0]) if isinstance(self.dataset, tuple) else len(self.dataset)

    @property
    def spec(self) -> dict[str, Any]:
        """The job spec the runtime's leader reads."""
        return {
            "dataset_size": len(self),
            "global_batch": self.global_batch,
            "lr": dict(self.lr_schedule) if self.lr_schedule else self.config.lr,
            "epochs": self.epochs,
            "seed": self.seed,
        }

    def runtime_optimizer(self) -> dict[str, Any]:
        """The optimizer config in the runtime's terms (the lr comes from the job)."""
        return self.config.to_wire()

    # ------------------------------------------------------------------------- set up
    def _seeded_model(self) -> torch.nn.Module:
        """`model_fn()` under `manual_seed(seed)`; the lock keeps nodes in threads apart."""
        with _SEED_LOCK:
            torch.manual_seed(self.seed)
            return self.model_fn()

    def _build(self, weights: torch.Tensor | None, grads: Sequence[torch.Tensor]) -> None:
        k = len(grads) if grads else (self.partitions or default_partitions())
        if k < 1:
            raise ValueError(f"partitions must be >= 1, got {k}")
        model = self._seeded_model()
        flat = FlatParameters(model, weights=weights, grads=grads[0] if grads else None)
        self.model = model
        self.replicas = [model]
        self.flats = [flat]
        for i in range(1, k):
            replica = copy.deepcopy(model)
            self.replicas.append(replica)
            self.flats.append(flat.replica(replica, grads[i] if grads else None))
        if k > 1 and self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(k - 1, thread_name_prefix="replica")

    def setup(self, ctx: Any) -> None:
        """Job mode with the runtime's `TaskContext`; standalone with a node (see the class)."""
        if hasattr(ctx, "init_model"):
            k = self.partitions or default_partitions()
            initial = FlatParameters(self._seeded_model()).weights_np
            if initial.dtype != np.float32:
                raise TypeError("job mode trains float32 models")
            ctx.init_model(initial, self.runtime_optimizer(), replicas=k)
            weights = torch.from_numpy(ctx.weights)
            self._build(weights, [torch.from_numpy(g) for g in ctx.grads])
            return
        node = getattr(ctx, "node", ctx) if not hasattr(ctx, "submit") else ctx
        self._build(None, ())
        self.sharded = ShardedOptimizer(
            self.config,
            self.flats[0],
            node,
            op="mean",
            strategy=self.strategy,
            compression=self.compression,
            broadcast=False,
            loop=getattr(ctx, "loop", None) if not hasattr(ctx, "submit") else None,
        )

    # ---------------------------------------------------------------------- the steps
    def _forward_backward(
        self, samples: Sequence[int], *, summed: bool = False
    ) -> tuple[float, int]:
        """Every replica's forward/backward on its share of `samples`: (loss sum, count).

        Gradients accumulate into the replicas' buffers: the gradient of the mean loss over
        `samples`, or (`summed`) of the sum of the per-sample losses.
        """
        k = len(self.replicas)
        shares = _split(samples, k)
        total = max(1, len(samples))

        def work(i: int) -> tuple[float, int]:
            idx = shares[i]
            if not idx:
                return 0.0, 0
            inputs, target = _batch(self.dataset, idx)
            replica = self.replicas[i]
            replica.train()
            loss = self.loss_fn(replica(inputs), target)
            (loss * (len(idx) if summed else len(idx) / total)).backward()
            return float(loss.detach()) * len(idx), len(idx)

        if k == 1:
            return work(0)
        assert self._pool is not None
        futures = [self._pool.submit(work, i) for i in range(1, k)]
        first = work(0)
        results = [first, *(f.result() for f in futures)]
        return sum(r[0] for r in results), sum(r[1] for r in results)

    def step(self, ctx: Any, samples: Any, lr: float) -> dict[str, Any]:
        """Job mode: overwrite every gradient buffer with the summed per-sample gradient.

        Returns {"loss": summed loss, "count": samples}. (With a node instead of the
        runtime's context this is :meth:`local_step`.)
        """
        if not hasattr(ctx, "init_model"):
            return self.local_step(ctx, samples, lr)
        for flat in self.flats:
            flat.zero_grad()
        indices = np.asarray(samples).tolist()
        loss_sum, count = self._forward_backward(indices, summed=True)
        return {"loss": loss_sum, "count": count}

    def _local_grads(self) -> list[torch.Tensor]:
        return [f.grads for f in self.flats[1:]]

    def local_step(self, node: Any, samples: Sequence[int], lr: float) -> dict[str, float]:
        """Standalone: forward/backward on this node's `samples`, then the sharded step."""
        assert self.sharded is not None, "setup(node) first"
        for f in self.flats:
            f.attach_grads()
        rank = self.sharded.attached.rank
        if self.sharded.overlaps and len(self.flats) == 1:
            loss_sum, count = self._overlapped_step(samples, lr, rank)
            return {"loss": loss_sum / max(1, count), "samples": float(count)}
        with timeline.span("forward/backward", "compute", rank):
            loss_sum, count = self._forward_backward(samples)
        with timeline.span("sharded step", "collective", rank):
            self.sharded.attached.call(self.sharded.step_async(lr, self._local_grads()))
        return {"loss": loss_sum / max(1, count), "samples": float(count)}

    def _overlapped_step(self, samples: Sequence[int], lr: float, rank: int) -> tuple[float, int]:
        """Forward/backward here while the sharded step, started first on the node's loop,
        sends each gradient chunk as soon as backward has written it."""
        assert self.sharded is not None
        sharded = self.sharded
        ready = sharded.readiness()
        started = timeline.now_us()
        step = sharded.attached.submit(sharded.step_async(lr, ready=ready))
        try:
            with timeline.span("forward/backward", "compute", rank):
                result = self._forward_backward(samples)
        except BaseException as exc:
            ready.fail_threadsafe(P2PDLError(f"backward failed on rank {rank}: {exc!r}"))
            with contextlib.suppress(Exception):
                step.result(sharded.attached.wait())
            raise
        for i in range(len(sharded.flat.params)):  # unused parameters: zero gradients, done
            ready.mark_threadsafe(i)
        try:
            step.result(sharded.attached.wait())
        except BaseException:
            step.cancel()
            raise
        timeline.record("sharded step (overlapped)", "collective", rank, started, timeline.now_us())
        return result

    async def local_step_async(
        self, node: Any, samples: Sequence[int], lr: float
    ) -> dict[str, float]:
        """:meth:`local_step` from the node's own loop: compute in a thread, collective here."""
        assert self.sharded is not None, "setup(node) first"
        for f in self.flats:
            f.attach_grads()
        loop = asyncio.get_running_loop()
        rank = self.sharded.attached.rank
        with timeline.span("forward/backward", "compute", rank):
            loss_sum, count = await loop.run_in_executor(None, self._forward_backward, samples)
        with timeline.span("sharded step", "collective", rank):
            await self.sharded.step_async(lr, self._local_grads())
        return {"loss": loss_sum / max(1, count), "samples": float(count)}

    def evaluate(self) -> dict[str, float]:
        if self.eval_fn is None or self.model is None:
            return {}
        self.model.eval()
        with torch.no_grad():
            return dict(self.eval_fn(self.model))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

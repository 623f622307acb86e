"""A DDP-style wrapper on p2pdl's own API: bucketed gradient averaging during backward.

Use it for what DDP on the `p2pdl` backend does not offer: bf16/fp16 wire compression of
the gradients (`compression=`), or an asyncio node driven from its own loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from p2pdl.torch.attach import Attached
from p2pdl.torch.flat import params_of

__all__ = ["DistributedDataParallel"]


@dataclass
class _Bucket:
    index: int
    params: list[torch.nn.Parameter]
    buffer: torch.Tensor
    views: list[torch.Tensor]
    pending: int = 0
    future: concurrent.futures.Future[Any] | None = None


class DistributedDataParallel(torch.nn.Module):
    """torch DDP's contract on p2pdl: when `loss.backward()` returns, every `.grad` is the mean.

    Gradients land in flat bucket buffers (reverse parameter order, about `bucket_mb` MiB
    each; the first one `first_bucket_mb`, so communication starts early). A post-accumulate
    hook counts a bucket's parameters; as soon as one is complete its allreduce starts on the
    node's loop thread while backward goes on. An autograd callback queued at the first hook
    waits for all of them before `backward()` returns, as torch's DDP does. Buckets are
    launched in index order on every rank, so collectives pair up whatever order hooks fire in.

    `node` is `p2pdl.connect()`'s blocking node (or an asyncio `Node` plus the `loop` it runs
    on in another thread). Parameters are broadcast from rank 0 at construction.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        node: Any,
        *,
        bucket_mb: float = 4.0,
        first_bucket_mb: float = 1.0,
        op: str = "mean",
        algorithm: str = "auto",
        compression: str | None = None,
        broadcast: bool = True,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__()
        if op not in ("sum", "mean"):
            raise ValueError(f"op must be 'sum' or 'mean', got {op!r}")
        if bucket_mb <= 0 or first_bucket_mb <= 0:
            raise ValueError("bucket sizes must be positive")
        self.module = module
        self._attached = Attached(node, loop)
        if not self._attached.can_block:
            raise TypeError("DistributedDataParallel needs p2pdl.connect()'s node (or loop=)")
        self._op = op
        self._algorithm = algorithm
        self._compression = compression
        params = params_of(module)
        if not params:
            raise ValueError("the module has no trainable parameters")
        for p in params:
            if p.device.type != "cpu" or p.dtype not in (torch.float32, torch.float64):
                raise TypeError("parameters must be float32/float64 CPU tensors")
        self._buckets = self._make_buckets(params, bucket_mb, first_bucket_mb)
        self._where: dict[int, tuple[_Bucket, torch.Tensor]] = {}
        for bucket in self._buckets:
            for p, view in zip(bucket.params, bucket.views, strict=True):
                self._where[id(p)] = (bucket, view)
                p.grad = view
                p.register_post_accumulate_grad_hook(self._on_grad)
        self._sync = True
        self._armed = False
        self._next_launch = 0
        self._reset()
        if broadcast:
            self._broadcast_params(params)

    @staticmethod
    def _make_buckets(
        params: list[torch.nn.Parameter], bucket_mb: float, first_mb: float
    ) -> list[_Bucket]:
        groups: list[list[torch.nn.Parameter]] = []
        current: list[torch.nn.Parameter] = []
        size = 0
        for p in reversed(params):
            limit = (first_mb if not groups else bucket_mb) * (1 << 20)
            nbytes = p.numel() * p.element_size()
            if current and (size + nbytes > limit or p.dtype != current[0].dtype):
                groups.append(current)
                current, size = [], 0
            current.append(p)
            size += nbytes
        if current:
            groups.append(current)
        buckets = []
        for index, group in enumerate(groups):
            total = sum(p.numel() for p in group)
            buffer = torch.zeros(total, dtype=group[0].dtype)
            views, off = [], 0
            for p in group:
                views.append(buffer[off : off + p.numel()].view_as(p))
                if p.grad is not None:
                    views[-1].copy_(p.grad)
                off += p.numel()
            buckets.append(_Bucket(index, group, buffer, views))
        return buckets

    def _broadcast_params(self, params: list[torch.nn.Parameter]) -> None:
        for dtype in {p.dtype for p in params}:
            group = [p for p in params if p.dtype == dtype]
            flat = torch.cat([p.detach().reshape(-1) for p in group])
            self._attached.call(self._attached.node.broadcast(flat, 0))
            with torch.no_grad():
                off = 0
                for p in group:
                    p.copy_(flat[off : off + p.numel()].view_as(p))
                    off += p.numel()

    @property
    def buckets(self) -> list[list[torch.nn.Parameter]]:
        return [b.params for b in self._buckets]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no communication) inside this block."""
        before = self._sync
        self._sync = False
        try:
            yield
        finally:
            self._sync = before

    def _reset(self) -> None:
        for bucket in self._buckets:
            bucket.pending = len(bucket.params)
            bucket.future = None
        self._next_launch = 0
        self._armed = False

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._sync:
            return
        if not self._armed:
            self._armed = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
        bucket, view = self._where[id(p)]
        g = p.grad
        if g is None or g.data_ptr() != view.data_ptr():
            # zero_grad(set_to_none=True) detached .grad from the bucket: copy it back in.
            with torch.no_grad():
                if g is None:
                    view.zero_()
                else:
                    view.copy_(g)
            p.grad = view
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch_ready()

    def _launch(self, bucket: _Bucket) -> None:
        node = self._attached.node
        bucket.future = self._attached.submit(
            node.allreduce(
                bucket.buffer,
                self._op,
                self._algorithm,
                compression=self._compression,
            )
        )

    def _launch_ready(self) -> None:
        while (
            self._next_launch < len(self._buckets) and self._buckets[self._next_launch].pending == 0
        ):
            self._launch(self._buckets[self._next_launch])
            self._next_launch += 1

    def _finish(self) -> None:
        """Runs when autograd is done: launch what is left (unused parameters), then wait."""
        try:
            for bucket in self._buckets[self._next_launch :]:
                for p, view in zip(bucket.params, bucket.views, strict=True):
                    if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                        with torch.no_grad():
                            view.zero_() if p.grad is None else view.copy_(p.grad)
                        p.grad = view
                bucket.pending = 0
            self._launch_ready()
            timeout = self._attached.wait()
            for bucket in self._buckets:
                assert bucket.future is not None
                bucket.future.result(timeout)
        finally:
            self._reset()

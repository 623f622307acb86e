"""Where the arithmetic of a collective runs, and the scratch memory it lands in.

Small reductions run inline on the event loop (a thread hop costs more than the work);
large ones run in a worker thread — the kernels release the GIL — so the loop keeps
receiving the next chunks while this one is summed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

T = TypeVar("T")

INLINE_BYTES = 512 * 1024
"""Reductions over fewer bytes than this run on the loop thread."""


class Compute:
    """Runs kernel calls inline or on a worker thread depending on their size."""

    def __init__(self, workers: int = 1, inline_bytes: int = INLINE_BYTES) -> None:
        self.inline_bytes = inline_bytes
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="p2pdl-reduce")
            return self._pool

    async def run(self, nbytes: int, fn: Callable[[], T]) -> T:
        """Run `fn()`; in a worker thread when it touches at least `inline_bytes`."""
        if nbytes < self.inline_bytes:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self._executor(), fn)

    async def drain(self) -> None:
        """Wait for kernel calls in flight (before a rollback rewrites the buffers they use)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, True)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None


class ScratchPool:
    """Reusable receive buffers: the first large allreduce pays for the page faults, not all."""

    def __init__(self, keep: int = 8) -> None:
        self._free: list[np.ndarray] = []
        self._keep = keep

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 array of at least `nbytes` (its first `nbytes` are what callers use)."""
        best = None
        for index, buffer in enumerate(self._free):
            if buffer.nbytes >= nbytes and (
                best is None or buffer.nbytes < self._free[best].nbytes
            ):
                best = index
        if best is not None:
            return self._free.pop(best)
        return np.empty(max(nbytes, 64), dtype=np.uint8)

    def give(self, buffer: np.ndarray) -> None:
        self._free.append(buffer)
        if len(self._free) > self._keep:
            self._free.sort(key=lambda b: b.nbytes)
            self._free.pop(0)

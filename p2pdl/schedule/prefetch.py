"""Prefetching: a background thread prepares the sample indices (and `task.prepare`) of the
steps the worker already knows about, so a step never waits for its data."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["Prefetcher"]


class Prefetcher:
    """A background thread preparing the sample indices (and `task.prepare`) of coming steps."""

    def __init__(self, fn: Callable[[Any], Any], depth: int = 4) -> None:
        self._fn = fn
        self._depth = max(1, depth)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="p2pdl-prefetch")
        self._pending: collections.deque[tuple[Any, Any]] = collections.deque()
        self._ready: collections.deque[tuple[Any, Future[Any]]] = collections.deque()

    def extend(self, items: list[tuple[Any, Any]]) -> None:
        """Queue (key, argument) pairs, in the order they will be asked for."""
        self._pending.extend(items)
        self._fill()

    def _fill(self) -> None:
        while len(self._ready) < self._depth and self._pending:
            key, arg = self._pending.popleft()
            self._ready.append((key, self._pool.submit(self._fn, arg)))

    async def get(self, key: Any) -> Any:
        if not self._ready:
            self._fill()
        if not self._ready or self._ready[0][0] != key:
            raise RuntimeError(f"prefetch order broken: asked for {key}")
        _, future = self._ready.popleft()
        self._fill()
        if future.done():
            return future.result()
        return await asyncio.wrap_future(future)

    def clear(self) -> None:
        self._pending.clear()
        for _, future in self._ready:
            future.cancel()
        self._ready.clear()

    def close(self) -> None:
        self.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

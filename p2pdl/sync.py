"""`connect()`: the blocking facade. The node's event loop runs in a background thread.

    with p2pdl.connect() as node:        # settings from arguments or P2PDL_* / RANK… env
        node.allreduce(array)            # blocks until the result is in `array`

Every call hands a coroutine to the loop thread and waits for it; the operation's own
deadline bounds the wait, so no call can block forever.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from p2pdl.node import Node

T = TypeVar("T")

_GRACE = 5.0
"""Seconds a blocking call waits beyond its operation deadline for the loop to answer."""


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.new_event_loop()


class SyncNode:
    """A `Node` driven from synchronous code; the loop lives in a daemon thread."""

    def __init__(self, node_factory: Callable[[], Node]) -> None:
        self._loop = _new_loop()
        self._thread = threading.Thread(target=self._run_loop, name="p2pdl-loop", daemon=True)
        self._thread.start()
        self._closed = False
        try:
            self.node: Node = self._call(self._start(node_factory), None)
        except BaseException:
            self._stop_loop()
            raise

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    @staticmethod
    async def _start(node_factory: Callable[[], Node]) -> Node:
        node = node_factory()
        return await node.start()

    def _call(self, coro: Awaitable[T], timeout: float | None) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def _deadline(self, timeout: float | None) -> float:
        return (timeout or self.node.timeouts.operation) + _GRACE

    def submit(self, coro: Awaitable[T]) -> Future[T]:
        """Start a coroutine on the node's loop without waiting (for overlapping work)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def rank(self) -> int:
        return self.node.rank

    @property
    def world_size(self) -> int:
        return self.node.world_size

    @property
    def address(self) -> tuple[str, int]:
        return self.node.address

    def allreduce(self, array: Any, op: str = "sum", algorithm: str = "auto", **kwargs: Any) -> Any:
        """Blocking `Node.allreduce` (in place; returns `array`)."""
        timeout = kwargs.get("timeout")
        return self._call(
            self.node.allreduce(array, op, algorithm, **kwargs), self._deadline(timeout)
        )

    def reduce_scatter(self, array: Any, op: str = "sum", **kwargs: Any) -> tuple[int, int]:
        return self._call(
            self.node.reduce_scatter(array, op, **kwargs), self._deadline(kwargs.get("timeout"))
        )

    def allgather(self, array: Any, **kwargs: Any) -> Any:
        return self._call(self.node.allgather(array, **kwargs), self._deadline(None))

    def broadcast(self, array: Any, root: int = 0, **kwargs: Any) -> Any:
        return self._call(
            self.node.broadcast(array, root, **kwargs), self._deadline(kwargs.get("timeout"))
        )

    def barrier(self, **kwargs: Any) -> None:
        self._call(self.node.barrier(**kwargs), self._deadline(kwargs.get("timeout")))

    def close(self) -> None:
        """Close the node and stop the loop thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self.node.close(), self.node.timeouts.shutdown + _GRACE)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> SyncNode:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def connect(*args: Any, **kwargs: Any) -> SyncNode:
    """A connected blocking node: `Node(*args, **kwargs)`, or from the environment if empty."""
    if not args and not any(k in kwargs for k in ("peers", "leader", "world_size")):
        return SyncNode(lambda: Node.from_env(**kwargs))
    return SyncNode(lambda: Node(*args, **kwargs))

"""`Work` for the torch backend: a p2pdl call in flight, seen as a torch.distributed Work.

A collective runs on the node's loop thread (`LoopBridge.submit` gives a
`concurrent.futures.Future`). Its torch future is completed from a small thread pool, never
from the loop thread: torch runs a future's `.then` callbacks on the thread that completes
it, and comm hooks such as PowerSGD start another collective inside such a callback and
block on it, which would deadlock the loop (or one completion thread).

`torch._C._distributed_c10d._create_work_from_future` does not raise from `wait()` when its
future fails (torch 2.13), so the Work here is a Python subclass: `wait` raises the
collective's error, typed p2pdl class name first in the message.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["P2PDLWork", "completed_work", "work_of"]

_POOL_THREADS = 8
"""Completion threads: enough for hooks that block on a nested collective in a callback."""

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _completion_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                _POOL_THREADS, thread_name_prefix="p2pdl-torch-done"
            )
        return _pool


def torch_error(exc: BaseException) -> RuntimeError:
    """The error torch sees: a RuntimeError whose message starts with the p2pdl type."""
    return RuntimeError(f"{type(exc).__name__}: {exc}")


class P2PDLWork(dist.Work):
    """One collective: `wait` blocks for it (and raises its error), `get_future` is its
    torch future, `is_completed`/`is_success`/`exception` report on it."""

    def __init__(self, future: torch.futures.Future[Any]) -> None:
        super().__init__()
        self._future = future
        self.source_of: list[int] = []
        """For a receive from any rank: the sender, once known."""

    def wait(self, timeout: timedelta | None = None) -> bool:
        # The collective's own deadline bounds the wait (the node always answers by then).
        self._future.wait()
        return True

    def is_completed(self) -> bool:
        return self._future.done()

    def is_success(self) -> bool:
        if not self._future.done():
            return False
        try:
            self._future.value()
        except Exception:
            return False
        return True

    def exception(self) -> BaseException | None:
        if not self._future.done():
            return None
        try:
            self._future.value()
        except Exception as exc:
            return exc
        return None

    def get_future(self) -> torch.futures.Future[Any]:
        return self._future

    def result(self) -> Any:
        return self._future.value()

    def _source_rank(self) -> int:
        self.wait()
        if not self.source_of:
            raise RuntimeError("this Work is not a receive from any rank")
        return self.source_of[0]

    def synchronize(self) -> None:
        self.wait()


def work_of(running: concurrent.futures.Future[Any], result: Callable[[], Any]) -> P2PDLWork:
    """A Work for `running` (a call on the node's loop): its future gets `result()` once the
    call is done (or the call's error), set from the completion pool."""
    future: torch.futures.Future[Any] = torch.futures.Future()
    pool = _completion_pool()

    def complete(done: concurrent.futures.Future[Any]) -> None:
        try:
            done.result()
            value = result()
        except BaseException as exc:  # the collective's error goes to whoever waits
            future.set_exception(torch_error(exc))
        else:
            future.set_result(value)

    running.add_done_callback(lambda done: pool.submit(complete, done))
    return P2PDLWork(future)


def completed_work(value: Any) -> P2PDLWork:
    """A Work that is already done (a collective with nothing to exchange)."""
    future: torch.futures.Future[Any] = torch.futures.Future()
    future.set_result(value)
    return P2PDLWork(future)

"""`connect()`: the blocking facade. The node's event loop runs in a background thread.

    with p2pdl.connect() as node:        # settings from arguments or P2PDL_* / RANK… env
        node.allreduce(array)            # blocks until the result is in `array`

Every call hands a coroutine to the loop thread (`LoopBridge`, the one sync bridge: the torch
integration uses it too) and waits for it; the call's own deadline bounds the wait, so no
call can block forever. The library does not choose the event loop: the loop comes from
`loop_factory` (default: `asyncio.new_event_loop`, which honours an installed policy such
as `uvloop.install()`).

Leaving: a node closes politely (queued frames first, then a goodbye) on `close()`, at the
end of a `with` block, at interpreter exit, and — when `connect` installed its handler — on
SIGTERM, so a program may end right after its last collective without failing the others.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import signal
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import CancelledError, Future
from typing import Any, TypeVar

from p2pdl.collectives.inline import DONE as INLINE_DONE
from p2pdl.collectives.inline import Finish
from p2pdl.node import Node

__all__ = ["LoopBridge", "SyncGroup", "SyncNode", "bridge_of", "connect"]

T = TypeVar("T")

GRACE = 5.0
"""Seconds a blocking call waits beyond its operation deadline for the loop to answer."""


class LoopBridge:
    """Runs coroutines on an event loop that another thread runs, and waits for them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        """Held while work is handed to the loop, and by a call that runs on its caller's
        thread (`exclusive`): no work reaches the loop meanwhile."""
        self._pending: set[object] = set()
        """Work handed to the loop and not finished (one token each; the loop discards it)."""

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Start `coro` on the loop without waiting (for overlapping work)."""
        token = object()
        with self.lock:
            self._pending.add(token)
            try:
                future = asyncio.run_coroutine_threadsafe(coro, self.loop)
            except BaseException:
                self._pending.discard(token)
                raise
        future.add_done_callback(lambda _future: self._pending.discard(token))
        return future

    @property
    def idle(self) -> bool:
        """Nothing handed to the loop is still running (read it holding `lock`)."""
        return not self._pending

    def call(self, coro: Coroutine[Any, Any, T], wait: float | None, *, locked: bool = False) -> T:
        """Run `coro` on the loop and wait up to `wait` seconds (None: no limit) for it
        (`locked`: the caller holds `lock` already).

        One lock instead of `run_coroutine_threadsafe`'s concurrent future, condition and
        future chaining: the task's done callback releases the caller (measured on the
        development VM: 70-86 µs per round trip instead of 86-122 µs). A wait that ends
        early (timeout, KeyboardInterrupt) cancels the task.
        """
        if threading.current_thread() is getattr(self.loop, "_p2pdl_thread", None):
            coro.close()
            raise RuntimeError("a blocking p2pdl call was made on the node's own loop thread")
        finished = threading.Lock()
        finished.acquire()
        started: list[asyncio.Task[T]] = []
        token = object()
        pending = self._pending

        def done(_task: asyncio.Task[T]) -> None:
            pending.discard(token)
            finished.release()

        def start() -> None:
            try:
                task = self.loop.create_task(coro)
            except BaseException:
                pending.discard(token)
                finished.release()
                raise
            started.append(task)
            task.add_done_callback(done)

        with contextlib.nullcontext() if locked else self.lock:
            pending.add(token)
            try:
                self.loop.call_soon_threadsafe(start)
            except RuntimeError:  # the loop is closed
                pending.discard(token)
                coro.close()
                raise
        try:
            if not finished.acquire(timeout=-1 if wait is None else wait):
                raise TimeoutError(f"the node's loop did not answer within {wait:g}s")
        except BaseException:
            with contextlib.suppress(RuntimeError):  # (a closed loop has nothing to cancel)
                self.loop.call_soon_threadsafe(_cancel, started)
            raise
        if not started:
            coro.close()
            raise RuntimeError("the node's loop could not start the call")
        task = started[0]
        if task.cancelled():  # as a concurrent future says it (an Exception, not a BaseException)
            raise CancelledError()
        return task.result()


def _cancel(started: list[asyncio.Task[Any]]) -> None:
    for task in started:
        task.cancel()


def wait_for(node: Node, timeout: float | None) -> float:
    """How long a blocking call waits: its operation deadline, plus a grace for the loop."""
    return (node.timeouts.operation if timeout is None else max(0.0, timeout)) + GRACE


_PLAIN_DEFAULTS = frozenset({"compression", "premul", "on_slice", "on_chunk"})
"""`allreduce` options that, left at None, keep a call eligible to run on its caller's
thread (`p2pdl.collectives.inline`)."""

_OPEN: weakref.WeakSet[SyncNode] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    """Close every node still open at interpreter exit, politely (see the module docstring)."""
    for node in list(_OPEN):
        with contextlib.suppress(Exception):
            node.close()


class SyncNode:
    """A `Node` driven from synchronous code; the loop lives in a daemon thread."""

    def __init__(
        self,
        node_factory: Callable[[], Node],
        *,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
    ) -> None:
        self._loop = (loop_factory or asyncio.new_event_loop)()
        self._thread = threading.Thread(target=self._run_loop, name="p2pdl-loop", daemon=True)
        self._loop._p2pdl_thread = self._thread  # type: ignore[attr-defined]
        self.bridge = LoopBridge(self._loop)
        self._thread.start()
        self._closed = False
        self._sigterm: Any = None
        try:
            self.node: Node = self.bridge.call(self._start(node_factory), None)
        except BaseException:
            self._stop_loop()
            raise
        _OPEN.add(self)

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    @staticmethod
    async def _start(node_factory: Callable[[], Node]) -> Node:
        node = node_factory()
        return await node.start()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        return self.bridge.call(coro, wait_for(self.node, timeout))

    def submit(self, coro: Awaitable[T]) -> Future[T]:
        """Start a coroutine on the node's loop without waiting (for overlapping work)."""
        return self.bridge.submit(coro)  # type: ignore[arg-type]

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

    @property
    def timeouts(self) -> Any:
        return self.node.timeouts

    def allreduce(self, array: Any, op: str = "sum", algorithm: str = "auto", **kwargs: Any) -> Any:
        """Blocking `Node.allreduce` (in place; returns `array`).

        A small float sum or mean through shared memory runs on this thread while the peers
        keep up (`p2pdl.collectives.inline`): no hop to the loop thread and back.
        """
        timeout = kwargs.get("timeout")
        if not kwargs or (
            kwargs.keys() <= _PLAIN_DEFAULTS | {"timeout"}
            and all(kwargs[k] is None for k in kwargs.keys() & _PLAIN_DEFAULTS)
        ):
            start = self.node.collectives.allreduce_inline
            if self._inline(start, timeout, array, op, algorithm, timeout):
                return array
        return self._call(self.node.allreduce(array, op, algorithm, **kwargs), timeout)

    def _inline(
        self, start: Callable[..., str | Finish | None], timeout: float | None, *args: Any
    ) -> bool:
        """Run a call on this thread (`start(*args, loop_time, on_loop)`, see
        `p2pdl.collectives.inline`) if nothing handed to the loop is running, finishing on
        the loop if it must wait; False if it was not taken (nothing touched)."""
        if self._closed:
            return False
        bridge = self.bridge
        with bridge.lock:
            if not bridge.idle:
                return False
            loop = self._loop
            taken = start(*args, loop.time, loop.call_soon_threadsafe)
            if taken is None:
                return False
            if taken != INLINE_DONE:
                bridge.call(taken(), wait_for(self.node, timeout), locked=True)
            return True

    def reduce_scatter(self, array: Any, op: str = "sum", **kwargs: Any) -> tuple[int, int]:
        return self._call(self.node.reduce_scatter(array, op, **kwargs), kwargs.get("timeout"))

    def allgather(self, array: Any, **kwargs: Any) -> Any:
        return self._call(self.node.allgather(array, **kwargs), kwargs.get("timeout"))

    def broadcast(self, array: Any, root: int = 0, **kwargs: Any) -> Any:
        return self._call(self.node.broadcast(array, root, **kwargs), kwargs.get("timeout"))

    def barrier(self, **kwargs: Any) -> None:
        """Blocking `Node.barrier`; on shared memory it runs on this thread while the peers
        keep up, as `allreduce` does."""
        timeout = kwargs.get("timeout")
        if kwargs.keys() <= {"timeout"} and self._inline(
            self.node.collectives.barrier_inline, timeout, timeout
        ):
            return
        self._call(self.node.barrier(**kwargs), timeout)

    # The rest of the collective set: blocking `Node` methods (same arguments).
    def reduce(self, array: Any, **kwargs: Any) -> Any:
        return self._call(self.node.reduce(array, **kwargs), kwargs.get("timeout"))

    def allgather_into(self, output: Any, input: Any, **kwargs: Any) -> Any:
        return self._call(self.node.allgather_into(output, input, **kwargs), kwargs.get("timeout"))

    def allgather_list(self, outputs: Any, input: Any, **kwargs: Any) -> Any:
        return self._call(self.node.allgather_list(outputs, input, **kwargs), kwargs.get("timeout"))

    def reduce_scatter_into(self, output: Any, input: Any, **kwargs: Any) -> Any:
        coro = self.node.reduce_scatter_into(output, input, **kwargs)
        return self._call(coro, kwargs.get("timeout"))

    def reduce_scatter_list(self, output: Any, inputs: Any, **kwargs: Any) -> Any:
        coro = self.node.reduce_scatter_list(output, inputs, **kwargs)
        return self._call(coro, kwargs.get("timeout"))

    def gather(self, input: Any, outputs: Any = None, **kwargs: Any) -> Any:
        return self._call(self.node.gather(input, outputs, **kwargs), kwargs.get("timeout"))

    def scatter(self, output: Any, inputs: Any = None, **kwargs: Any) -> Any:
        return self._call(self.node.scatter(output, inputs, **kwargs), kwargs.get("timeout"))

    def alltoall(self, output: Any, input: Any, **kwargs: Any) -> Any:
        return self._call(self.node.alltoall(output, input, **kwargs), kwargs.get("timeout"))

    def alltoall_list(self, outputs: Any, inputs: Any, **kwargs: Any) -> Any:
        return self._call(self.node.alltoall_list(outputs, inputs, **kwargs), kwargs.get("timeout"))

    def allreduce_coalesced(self, arrays: Any, **kwargs: Any) -> Any:
        return self._call(self.node.allreduce_coalesced(arrays, **kwargs), kwargs.get("timeout"))

    def allgather_into_coalesced(self, outputs: Any, inputs: Any, **kwargs: Any) -> Any:
        coro = self.node.allgather_into_coalesced(outputs, inputs, **kwargs)
        return self._call(coro, kwargs.get("timeout"))

    def send(self, array: Any, dst: int, **kwargs: Any) -> None:
        self._call(self.node.send(array, dst, **kwargs), kwargs.get("timeout"))

    def recv(self, array: Any, src: int, **kwargs: Any) -> Any:
        return self._call(self.node.recv(array, src, **kwargs), kwargs.get("timeout"))

    def recv_any(self, array: Any, **kwargs: Any) -> int:
        """Blocking `Node.recv_any`: the sender's rank."""
        return self._call(self.node.recv_any(array, **kwargs), kwargs.get("timeout"))

    def subgroup(self, ranks: Any) -> SyncGroup:
        """A blocking view of `Node.subgroup(ranks)` (made on the loop, like every call)."""

        async def make() -> Any:
            return self.node.subgroup(ranks)

        return SyncGroup(self._call(make(), 0.0), self)

    # ---------------------------------------------------------------------- closing
    def close(self) -> None:
        """Close the node politely and stop the loop thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        self._restore_sigterm()
        try:
            if self._thread.is_alive():
                self.bridge.call(self.node.close(), self.node.timeouts.shutdown + GRACE)
        finally:
            self._stop_loop()

    def handle_sigterm(self) -> None:
        """On SIGTERM, raise SystemExit in the main thread so that `with` blocks and the
        exit hook close the node politely (only when SIGTERM has its default action)."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return

        def on_sigterm(signum: int, frame: object) -> None:
            raise SystemExit(128 + signum)

        self._sigterm = signal.signal(signal.SIGTERM, on_sigterm)

    def _restore_sigterm(self) -> None:
        if self._sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None

    def _stop_loop(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> SyncNode:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SyncGroup:
    """A subgroup's collectives driven from synchronous code, through its node's loop.

    Each method is the blocking form of the `Collectives` method of the same name (same
    arguments, in place, returns what that returns)."""

    def __init__(self, group: Any, node: SyncNode) -> None:
        self.group = group
        self._node = node

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def world_size(self) -> int:
        return self.group.world_size

    def _blocking(self, name: str, *args: Any, **kwargs: Any) -> Any:
        coro = getattr(self.group, name)(*args, **kwargs)
        return self._node._call(coro, kwargs.get("timeout"))

    def allreduce(self, arrays: Any, **kwargs: Any) -> None:
        self._blocking("allreduce", arrays, **kwargs)

    def reduce(self, array: Any, **kwargs: Any) -> None:
        self._blocking("reduce", array, **kwargs)

    def broadcast(self, array: Any, **kwargs: Any) -> None:
        self._blocking("broadcast", array, **kwargs)

    def barrier(self, **kwargs: Any) -> None:
        self._blocking("barrier", **kwargs)

    def allgather_into(self, output: Any, input: Any, **kwargs: Any) -> None:
        self._blocking("allgather_into", output, input, **kwargs)

    def allgather_list(self, outputs: Any, input: Any, **kwargs: Any) -> None:
        self._blocking("allgather_list", outputs, input, **kwargs)

    def reduce_scatter_into(self, output: Any, input: Any, **kwargs: Any) -> None:
        self._blocking("reduce_scatter_into", output, input, **kwargs)

    def reduce_scatter_list(self, output: Any, inputs: Any, **kwargs: Any) -> None:
        self._blocking("reduce_scatter_list", output, inputs, **kwargs)

    def gather(self, input: Any, outputs: Any = None, **kwargs: Any) -> None:
        self._blocking("gather", input, outputs, **kwargs)

    def scatter(self, output: Any, inputs: Any = None, **kwargs: Any) -> None:
        self._blocking("scatter", output, inputs, **kwargs)

    def alltoall(self, output: Any, input: Any, **kwargs: Any) -> None:
        self._blocking("alltoall", output, input, **kwargs)

    def alltoall_list(self, outputs: Any, inputs: Any, **kwargs: Any) -> None:
        self._blocking("alltoall_list", outputs, inputs, **kwargs)

    def allreduce_coalesced(self, arrays: Any, **kwargs: Any) -> None:
        self._blocking("allreduce_coalesced", arrays, **kwargs)

    def allgather_into_coalesced(self, outputs: Any, inputs: Any, **kwargs: Any) -> None:
        self._blocking("allgather_into_coalesced", outputs, inputs, **kwargs)

    def send(self, array: Any, dst: int, **kwargs: Any) -> None:
        self._blocking("send", array, dst, **kwargs)

    def recv(self, array: Any, src: int, **kwargs: Any) -> None:
        self._blocking("recv", array, src, **kwargs)

    def recv_any(self, array: Any, **kwargs: Any) -> int:
        return self._blocking("recv_any", array, **kwargs)

    def subgroup(self, ranks: Any) -> SyncGroup:
        async def make() -> Any:
            return self.group.subgroup(ranks)

        return SyncGroup(self._node._call(make(), 0.0), self._node)


def bridge_of(node: Any, loop: asyncio.AbstractEventLoop | None = None) -> LoopBridge | None:
    """The bridge that runs `node`'s coroutines from synchronous code: a `SyncNode`'s own,
    or one onto `loop` for an asyncio `Node` whose loop runs in another thread; None for an
    asyncio `Node` without its loop (then only the async methods work)."""
    if isinstance(node, SyncNode):
        return node.bridge
    if loop is not None:
        return LoopBridge(loop)
    return None


def connect(
    *args: Any,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
    handle_sigterm: bool = True,
    **settings: Any,
) -> SyncNode:
    """A connected blocking node: `Node(*args, **settings)`, from the environment unless the
    arguments say how to find the peers (peers, leader or world_size)."""
    if not args and not any(k in settings for k in ("peers", "leader", "world_size", "config")):
        node = SyncNode(lambda: Node.from_env(**settings), loop_factory=loop_factory)
    else:
        node = SyncNode(lambda: Node(*args, **settings), loop_factory=loop_factory)
    if handle_sigterm:
        node.handle_sigterm()
    return node

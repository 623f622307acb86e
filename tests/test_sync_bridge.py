"""LoopBridge: a blocking call into an event loop that another thread runs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterator

import pytest

from p2pdl.sync import LoopBridge


@pytest.fixture
def bridge() -> Iterator[LoopBridge]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop._p2pdl_thread = thread  # type: ignore[attr-defined]
    thread.start()
    try:
        yield LoopBridge(loop)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_a_call_returns_the_coroutines_result_and_raises_its_error(bridge: LoopBridge) -> None:
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    async def fail() -> None:
        raise ValueError("bad input")

    assert [bridge.call(double(i), 10) for i in range(100)] == [2 * i for i in range(100)]
    with pytest.raises(ValueError, match="bad input"):
        bridge.call(fail(), 10)


def test_a_wait_that_runs_out_cancels_the_call(bridge: LoopBridge) -> None:
    cancelled = threading.Event()
    release = asyncio.Event()

    async def stuck() -> None:
        try:
            await release.wait()  # never set
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError):
        bridge.call(stuck(), 0.2)
    assert cancelled.wait(10)


def test_a_call_cancelled_on_the_loop_raises_a_concurrent_cancelled_error(
    bridge: LoopBridge,
) -> None:
    async def cancelled_by_its_node() -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().call_soon(task.cancel)  # as a node's close() does
        await asyncio.Event().wait()

    with pytest.raises(concurrent.futures.CancelledError):
        bridge.call(cancelled_by_its_node(), 10)


def test_a_blocking_call_from_the_loop_thread_is_refused(bridge: LoopBridge) -> None:
    async def nested() -> str:
        inner = asyncio.sleep(0)
        try:
            bridge.call(inner, 1)
        except RuntimeError as exc:
            return str(exc)
        return "not refused"

    assert "node's own loop thread" in bridge.call(nested(), 10)


def test_a_closed_loop_refuses_the_call_and_closes_the_coroutine() -> None:
    loop = asyncio.new_event_loop()
    loop.close()

    async def never() -> None:
        raise AssertionError("ran on a closed loop")

    coro = never()
    with pytest.raises(RuntimeError):
        LoopBridge(loop).call(coro, 1)
    assert coro.cr_frame is None  # closed, so no "never awaited" warning

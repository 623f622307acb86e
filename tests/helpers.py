"""In-process helpers for the transport and collective tests: clusters in one uvloop loop.

    def test_something():
        async def body():
            async with make_cluster(3) as nodes:
                await on_all(nodes, lambda node: node.barrier())

        run(body())

Every node of a cluster lives in the same event loop (rank 0 leads the rendezvous on port 0,
the others join it), with a fresh random secret per cluster. `run` drives a coroutine on
uvloop under one hard deadline, so a regression shows up as a failure, never as a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from p2pdl.config import Timeouts
from p2pdl.node import Node

T = TypeVar("T")

RUN_TIMEOUT = 120.0
"""Hard ceiling for one test body: generous, because the machine is small and shared."""


def run(coro: Coroutine[Any, Any, T], timeout: float = RUN_TIMEOUT) -> T:
    """Run `coro` on a fresh uvloop event loop, failing (not hanging) after `timeout`."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return uvloop.run(bounded())


ROOT = Path(__file__).resolve().parent.parent
"""The repository (its `p2pdl` is the one the tests import)."""


def launch(
    n: int, *program: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`python -m p2pdl launch -n N program…` from the repository, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "p2pdl", "launch", "-n", str(n), *program],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        cwd=str(ROOT),
    )


def short_timeouts(**overrides: float) -> Timeouts:
    """Timeouts for tests: generous connect/operation deadlines unless overridden."""
    values: dict[str, float] = {"connect": 30.0, "handshake": 5.0, "operation": 30.0}
    values.update(overrides)
    return Timeouts(**values)


test_timeouts = short_timeouts
"""The same, under the name other test modules import."""
test_timeouts.__test__ = False  # type: ignore[attr-defined]  # a helper, not a pytest test


@contextlib.asynccontextmanager
async def make_cluster(
    n: int, *, secret: bytes | None = None, no_secret: bool = False, **kwargs: Any
) -> AsyncIterator[list[Node]]:
    """Start `n` nodes in this loop; yields them in rank order and closes them on exit.

    Each cluster gets a random secret unless one is given, or `no_secret` (insecure mode).
    """
    secret = None if no_secret else (secret if secret is not None else os.urandom(16))
    if no_secret:
        kwargs["insecure"] = True
    kwargs.setdefault("timeouts", short_timeouts())
    leader = Node(0, world_size=n, host="127.0.0.1", port=0, secret=secret, **kwargs)
    lead_task = await start_listening(leader)
    others = [
        Node(r, leader=leader.address, host="127.0.0.1", port=0, secret=secret, **kwargs)
        for r in range(1, n)
    ]
    nodes = [leader, *others]
    try:
        await asyncio.gather(lead_task, *(node.start() for node in others))
        ordered = sorted(nodes, key=lambda node: node.rank)
        assert [node.rank for node in ordered] == list(range(n))
        yield ordered
    finally:
        if not lead_task.done():
            lead_task.cancel()
        await asyncio.gather(*(node.close() for node in nodes), return_exceptions=True)


async def start_listening(node: Node) -> asyncio.Future[Node]:
    """Start `node` in the background; return its task once it listens (address known).

    A node on port 0 must be listening before others can be told where it is.
    """
    listening: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(node.start(on_listening=listening.set_result))
    await asyncio.wait({listening, task}, return_when=asyncio.FIRST_COMPLETED)
    if not listening.done():
        task.result()  # startup failed before listening: raise its error
    return task


async def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Yield to the loop until `predicate()` holds; fail after a generous `timeout`."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def on_all(nodes: list[Node], fn: Callable[[Node], Awaitable[T]]) -> list[T]:
    """Run `fn(node)` on every node at once; results in rank order (first error raised)."""
    return list(await asyncio.gather(*(fn(node) for node in nodes)))


async def on_all_settled(nodes: list[Node], fn: Callable[[Node], Awaitable[Any]]) -> list[Any]:
    """Like `on_all` but returns each node's result or exception."""
    return list(await asyncio.gather(*(fn(node) for node in nodes), return_exceptions=True))


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 where it cannot be read)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


SHM_ROOM = hasattr(os, "memfd_create") and available_memory_bytes() >= 512 << 20
"""Shared segments (memfds) can be made, with memory for the shared-memory tests' explicit
`shm` calls (elsewhere `auto` falls back to TCP, which other tests cover)."""

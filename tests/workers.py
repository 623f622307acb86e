"""Functions that node processes run in tests (`python -m p2pdl node --run tests.workers:…`)."""

from __future__ import annotations

import asyncio
import os
import signal

import numpy as np

from p2pdl.errors import P2PDLError
from p2pdl.node import Node


async def allreduce_ranks(node: Node, size: int = 1000, algorithm: str = "auto") -> list[float]:
    """Allreduce rank-dependent data; return a few values for the test to check."""
    data = np.arange(size, dtype=np.float64) * (node.rank + 1)
    await node.allreduce(data, algorithm=algorithm)
    return [float(data[0]), float(data[1]), float(data[-1])]


async def barrier_until_lost(node: Node, victim: int) -> dict[str, object]:
    """Barrier once, then the victim kills itself; others report the error of the next one."""
    await node.barrier()
    if node.rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        await node.barrier()
        await node.barrier()
    except P2PDLError as exc:
        return {
            "error": type(exc).__name__,
            "message": str(exc),
            "ranks": list(getattr(exc, "ranks", [])),
            "seconds": loop.time() - started,
        }
    return {"error": None}


async def shm_until_lost(node: Node, victim: int, size: int = 1 << 20) -> dict[str, object]:
    """One shared-memory allreduce, then the victim kills itself; the others report the
    error of their next one (and what the first one summed)."""
    data = np.full(size, float(node.rank), np.float32)
    await node.allreduce(data, algorithm="shm")
    first = float(data[0])
    if node.rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        await node.allreduce(np.ones(2 * size, np.float32), algorithm="shm")
    except P2PDLError as exc:
        return {
            "first": first,
            "error": type(exc).__name__,
            "message": str(exc),
            "ranks": list(getattr(exc, "ranks", [])),
            "seconds": loop.time() - started,
        }
    return {"first": first, "error": None}


async def exit_with(node: Node, code: int = 0, rank: int = -1) -> None:
    """Exit the process with `code` when this is `rank` (others serve until stopped)."""
    if node.rank == rank:
        os._exit(code)
    await asyncio.get_running_loop().create_future()


async def environment_secret(node: Node) -> str | None:
    """What this node process still has of P2PDL_SECRET (it should have taken it out)."""
    return os.environ.get("P2PDL_SECRET")

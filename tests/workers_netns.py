"""Functions that node processes on namespace hosts run (`--run tests.workers_netns:…`)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from p2pdl.collectives.api import ALGORITHMS
from p2pdl.errors import P2PDLError
from p2pdl.node import Node
from p2pdl.schedule.runtime import emit


def identity(node: Node) -> dict[str, Any]:
    """Where this rank runs: its host address, and which ranks share that host (local) or not.

    Ranks on one host are local to each other (their phase 1 could sum in memory); ranks on
    other hosts are remote (reached over the shaped link).
    """
    assert node.has_session
    host = node.address[0]
    peers = node.session.membership.peers
    return {
        "rank": node.rank,
        "host": host,
        "port": node.address[1],
        "peer_hosts": [p.host for p in peers],
        "local_ranks": [p.rank for p in peers if p.host == host],
        "remote_ranks": [p.rank for p in peers if p.host != host],
    }


async def collectives(node: Node, size: int = 200_000, root: int = 1) -> dict[str, Any]:
    """Allreduce with every algorithm, a broadcast from `root`, a barrier; return the checks.

    Each allreduce sums `arange(size) * (rank + 1)`, so every element must equal
    `arange(size) * n(n+1)/2` on every rank; the values are exact in float64.
    """
    n = node.world_size
    expected = np.arange(size, dtype=np.float64) * (n * (n + 1) // 2)
    checks: dict[str, Any] = {}
    for algorithm in ("auto", *sorted(ALGORITHMS)):
        data = np.arange(size, dtype=np.float64) * (node.rank + 1)
        await node.allreduce(data, algorithm=algorithm)
        checks[algorithm] = {
            "equal": bool(np.array_equal(data, expected)),
            "sample": [float(data[0]), float(data[1]), float(data[-1])],
        }
    mean = np.full(size, float(node.rank), dtype=np.float32)
    await node.allreduce(mean, op="mean", algorithm="sliced")
    wrong = np.nonzero(mean != (n - 1) / 2)[0]  # count, first and last wrong index
    checks["mean"] = {
        "equal": wrong.size == 0,
        "sample": [float(mean[0])],
        "wrong": [int(wrong.size), *(int(i) for i in wrong[:1]), *(int(i) for i in wrong[-1:])],
        "values": [float(v) for v in mean[wrong[:3]]],
    }
    data = np.full(size, float(node.rank), dtype=np.float32)
    await node.broadcast(data, root=root)
    checks["broadcast"] = {"equal": bool(np.all(data == root)), "sample": [float(data[0])]}
    await node.barrier()
    checks["barrier"] = {"equal": True, "sample": []}
    return {"identity": identity(node), "checks": checks}


async def wait_for_loss(node: Node, victim: int, size: int = 1 << 20) -> dict[str, Any]:
    """Everyone but `victim` blocks in an allreduce the victim never joins; the test SIGKILLs
    the victim once every rank printed `armed`. Survivors report the error they got."""
    await node.barrier()  # every link is up and used once before the kill
    loop = asyncio.get_running_loop()
    if node.rank == victim:
        emit("armed", rank=node.rank)
        await loop.create_future()  # killed from outside
    data = np.ones(size, dtype=np.float32)
    started = loop.time()
    pending = asyncio.ensure_future(node.allreduce(data, algorithm="sliced"))
    emit("armed", rank=node.rank)
    try:
        await pending
    except P2PDLError as exc:
        return {
            "error": type(exc).__name__,
            "message": str(exc),
            "ranks": list(getattr(exc, "ranks", [])),
            "seconds": loop.time() - started,
            "identity": identity(node),
        }
    return {"error": None, "identity": identity(node)}

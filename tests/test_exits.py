"""Leaving: a rank that has returned from its last collective may close (or exit) at once,
in any order, with any delay, and that never fails a collective another rank is finishing.

Every collective is tried as the last call, with 2 to 8 ranks leaving in random order after
random delays. `P2PDL_EXIT_REPEATS` raises the repetitions for a stress run (the closing
note of the one-node-stack issue reports one, with a CPU hog beside it).
"""

from __future__ import annotations

import asyncio
import os
import random
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import launch, make_cluster, run

from p2pdl.errors import PeerLostError
from p2pdl.node import Node

REPEATS = int(os.environ.get("P2PDL_EXIT_REPEATS", "2"))


def _allreduce(size: int) -> Callable[[Node], Any]:
    return lambda node: node.allreduce(np.ones(size, np.float32))


def _p2p_ring(node: Node) -> Any:
    """Each rank sends to the next and receives from the previous one."""
    n, r = node.world_size, node.rank
    outgoing, incoming = np.full(1000, r, np.int32), np.empty(1000, np.int32)

    async def both() -> None:
        await asyncio.gather(
            node.collectives.send(outgoing, (r + 1) % n),
            node.collectives.recv(incoming, (r - 1) % n),
        )
        assert np.all(incoming == (r - 1) % n)

    return both()


def _p2p_to_root(node: Node) -> Any:
    """Everyone sends to rank 0, which leaves last or first: the senders need nothing back."""
    if node.rank == 0:

        async def gather() -> None:
            buf = np.empty(10, np.int64)
            for peer in range(1, node.world_size):
                await node.collectives.recv(buf, peer)
                assert np.all(buf == peer)

        return gather()
    return node.collectives.send(np.full(10, node.rank, np.int64), 0)


LAST_CALLS: dict[str, Callable[[Node], Any]] = {
    "allreduce-small": _allreduce(100),
    "allreduce-large": _allreduce(300_000),
    "broadcast-small-root0": lambda node: node.broadcast(np.ones(100, np.float32), root=0),
    "broadcast-large-root-last": lambda node: node.broadcast(
        np.ones(400_000, np.float32), root=node.world_size - 1
    ),
    "barrier": lambda node: node.barrier(),
    "reduce_scatter": lambda node: node.reduce_scatter(np.ones(50_000, np.float32)),
    "allgather": lambda node: node.allgather(np.ones(50_000, np.float32)),
    "send-recv-ring": _p2p_ring,
    "send-to-root": _p2p_to_root,
}


async def _live_then_leave(
    node: Node, last: Callable[[Node], Any], before: float, after: float
) -> None:
    await node.barrier()  # everyone is in before the last call (what a program does first)
    await asyncio.sleep(before)  # ranks reach their last call at different moments...
    await last(node)
    await asyncio.sleep(after)  # ...and have different work left before they end
    await node.close()


@pytest.mark.parametrize("n", range(2, 9))
@pytest.mark.parametrize("last", sorted(LAST_CALLS))
def test_leaving_after_the_last_call_never_fails_the_others(n: int, last: str) -> None:
    rng = random.Random(f"{n}-{last}")

    async def body() -> None:
        for _ in range(REPEATS):
            async with make_cluster(n) as nodes:

                def delay() -> float:
                    return rng.choice([0.0, 0.0, rng.uniform(0, 0.03)])

                results = await asyncio.gather(
                    *(_live_then_leave(node, LAST_CALLS[last], delay(), delay()) for node in nodes),
                    return_exceptions=True,
                )
                failed = {r: x for r, x in enumerate(results) if x is not None}
                assert not failed, failed

    run(body(), timeout=300)


def test_a_rank_that_leaves_before_serving_its_part_is_named() -> None:
    """The other side of the rule: leaving *before* sending what others wait for fails
    them, naming the departed rank, within the call's deadline."""

    async def body() -> None:
        async with make_cluster(3) as nodes:
            await nodes[2].close()  # left without calling
            results = await asyncio.gather(
                *(node.allreduce(np.ones(10, np.float32), timeout=20) for node in nodes[:2]),
                return_exceptions=True,
            )
            for result in results:
                assert isinstance(result, PeerLostError), result
                assert result.ranks == (2,) and "closed its node" in str(result)

    run(body())


SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import p2pdl

    node = p2pdl.connect()
    node.allreduce(np.ones(1000, np.float32))
    buf = np.full(200_000, float(node.rank), np.float32)
    node.broadcast(buf, root=node.world_size - 1)
    assert buf[0] == node.world_size - 1
    print("done", node.rank, flush=True)
    # no close(): the program just ends (the exit hook closes the node politely)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("n", [3, 4])
def test_programs_that_end_right_after_their_last_collective_exit_cleanly(
    tmp_path: Path, n: int
) -> None:
    script = tmp_path / "last_call.py"
    script.write_text(SCRIPT)
    for _ in range(REPEATS + 1):
        done = launch(n, str(script))
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.count("done") == n, done.stdout

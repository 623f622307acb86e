"""The blocking facade's allreduce on the caller's thread (`p2pdl.collectives.inline`).

Real processes for the path itself (two threads of one process share the GIL, so their spins
rarely meet); threads of one process where a test must choose who waits for whom.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from helpers import launch, short_timeouts

import p2pdl
from p2pdl.errors import CollectiveTimeoutError, PeerLostError
from p2pdl.kernels.shmcall import CURRENT
from p2pdl.launch import free_port
from p2pdl.sync import SyncNode


@pytest.mark.parametrize("python_ranks", ["", "1"], ids=["compiled", "rank-1-in-python"])
def test_blocking_allreduces_run_inline_and_match_the_loop_bit_for_bit(python_ranks: str) -> None:
    """Two processes, 300 allreduces (1 to 70,000 elements, float32/float64, sum/mean):
    most finish on the caller's thread, every result equals `sliced`'s over TCP bit for bit,
    a mismatched call fails on both ranks as a mismatch, and the next call works — with
    both ranks running the compiled small call, and with one of them in Python."""
    done = launch(2, "tests/inline_worker.py", "300", *([python_ranks] if python_ranks else []))
    assert done.returncode == 0, done.stdout + done.stderr
    reports = [
        json.loads(line.split("] ", 1)[1])
        for line in done.stdout.splitlines()
        if line.startswith("[rank") and "{" in line
    ]
    assert sorted(r["rank"] for r in reports) == [0, 1], done.stdout
    for report in reports:
        assert report["differ"] == 0, report
        counts = report["counts"]
        assert sum(counts.values()) == 300, report  # (the first: not)
        assert counts["compiled"] + counts["finished"] > 0, report  # (a loaded machine: fewer)
        if str(report["rank"]) in python_ranks.split(","):
            assert counts["compiled"] == 0, report
        assert "rank 1 called allreduce(shm, sum, float32[11]" in report["mismatch"] or (
            "rank 0 called allreduce(shm, sum, float32[10]" in report["mismatch"]
        ), report
        assert report["after"] == 3.0, report


@contextmanager
def blocking_pair(**timeouts: float) -> Iterator[list[SyncNode]]:
    """Two blocking nodes of one process (rank order); closed on exit."""
    port, secret = free_port(), np.random.default_rng().bytes(16)
    common: dict[str, Any] = {
        "secret": secret,
        "timeouts": short_timeouts(**timeouts),
        "host": "127.0.0.1",
        "handle_sigterm": False,
    }

    def make(rank: int) -> SyncNode:
        if rank == 0:
            return p2pdl.connect(0, world_size=2, port=port, **common)
        return p2pdl.connect(leader=("127.0.0.1", port), port=0, **common)

    with ThreadPoolExecutor(2) as pool:
        nodes = [f.result(60) for f in [pool.submit(make, r) for r in range(2)]]
    try:
        nodes.sort(key=lambda node: node.rank)
        with ThreadPoolExecutor(2) as pool:  # segments made and mapped by both
            for f in [pool.submit(n.allreduce, np.ones(64, np.float32)) for n in nodes]:
                f.result(60)
        yield nodes
    finally:
        for node in nodes:
            node.close()


def on_both(nodes: list[SyncNode], fn: Callable[[SyncNode], Any]) -> list[Any]:
    with ThreadPoolExecutor(2) as pool:
        return [f.result(60) for f in [pool.submit(fn, node) for node in nodes]]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Until `condition()` (another thread's progress, read from shared state) or fail."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def test_work_in_flight_on_the_loop_keeps_blocking_calls_off_the_inline_path() -> None:
    """An overlapping call handed to the loop and not finished: the next blocking call
    goes after it (the same order on both ranks: different sizes would mismatch)."""
    with blocking_pair() as nodes:

        def calls(node: SyncNode) -> tuple[float, float]:
            first = np.full(1000, node.rank + 1.0, np.float32)
            second = np.full(10, node.rank + 1.0, np.float32)
            pending = node.submit(node.node.allreduce(first))
            node.allreduce(second)
            pending.result(30)
            return float(first[0]), float(second[0])

        for _ in range(20):
            assert on_both(nodes, calls) == [(3.0, 3.0), (3.0, 3.0)]


def test_a_silent_peer_times_out_and_is_named() -> None:
    """Rank 1 does not call: rank 0's blocking allreduce hands its wait to the loop and
    fails within its timeout, naming rank 1."""
    with blocking_pair() as nodes:
        collectives = nodes[0].node.collectives
        handed = collectives.inline_calls["handed_off"]
        started = time.monotonic()
        with pytest.raises(CollectiveTimeoutError) as failed:
            nodes[0].allreduce(np.ones(16, np.float32), timeout=0.5)
        assert time.monotonic() - started < 10
        assert failed.value.missing == (1,), failed.value
        assert collectives.inline_calls["handed_off"] == handed + 1


def test_a_peer_that_leaves_mid_call_is_named() -> None:
    """Rank 0's blocking allreduce has started (its control block says so) when rank 1
    closes its node: rank 0 fails with PeerLostError naming rank 1, not a timeout."""
    with blocking_pair(operation=60.0) as nodes:
        theirs = nodes[1].node.collectives.shm.controls[0][1]
        before = theirs[CURRENT]
        errors: list[BaseException] = []

        def call() -> None:
            try:
                nodes[0].allreduce(np.ones(16, np.float32))
            except BaseException as exc:
                errors.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        wait_for(lambda: theirs[CURRENT] > before, "rank 0's call to start")
        started = time.monotonic()
        nodes[1].close()
        caller.join(30)
        assert not caller.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], PeerLostError), errors
        assert tuple(errors[0].ranks) == (1,), errors[0]
        assert time.monotonic() - started < 30


def test_calls_that_cannot_run_inline_take_the_normal_path_with_its_errors() -> None:
    """Other element types and reductions run (and are right) on the normal path; bad
    arguments get the normal path's errors, with nothing touched; the next plain call runs
    inline again. Twice each: the second time from what `inline` kept of the shape."""
    from helpers import make_cluster, on_all, run

    async def body() -> None:
        async with make_cluster(2) as nodes:
            warm = [np.ones(64, np.float32) for _ in nodes]
            await on_all(nodes, lambda node: node.allreduce(warm[node.rank]))
            counts = [dict(node.collectives.inline_calls) for node in nodes]
            for _ in range(2):
                half = [np.full(8, node.rank + 1, np.float16) for node in nodes]
                await on_all(nodes, lambda node, h=half: node.allreduce(h[node.rank]))
                assert all(np.all(h == 3) for h in half)
                most = [np.full(8, node.rank + 1.0, np.float32) for node in nodes]
                await on_all(nodes, lambda node, m=most: node.allreduce(m[node.rank], "max"))
                assert all(np.all(m == 2.0) for m in most)
                assert [dict(node.collectives.inline_calls) for node in nodes] == counts
                strided = np.ones((8, 2), np.float32)[:, 0]
                with pytest.raises(ValueError, match="C-contiguous"):
                    await nodes[0].allreduce(strided)
                with pytest.raises(ValueError, match="timeout"):
                    await nodes[0].allreduce(np.ones(8, np.float32), timeout=-1)
            plain = [np.full(8, node.rank + 1.0, np.float32) for node in nodes]
            await on_all(nodes, lambda node: node.allreduce(plain[node.rank]))
            assert all(np.all(p == 3.0) for p in plain)
            after = [node.collectives.inline_calls for node in nodes]
            assert all(
                sum(a.values()) == sum(c.values()) + 1 for a, c in zip(after, counts, strict=True)
            ), (after, counts)

    run(body())


def test_blocking_barriers_run_on_shared_memory_and_a_skipped_one_times_out() -> None:
    """`SyncNode.barrier` on ranks that use shared memory: inline or handed to the loop (the
    same steps), every call accounted for; one that rank 1 skips names it."""
    with blocking_pair() as nodes:
        before = [dict(node.node.collectives.inline_calls) for node in nodes]
        for _ in range(20):
            on_both(nodes, lambda node: node.barrier(timeout=30))
        after = [node.node.collectives.inline_calls for node in nodes]
        for a, b in zip(after, before, strict=True):
            assert sum(a.values()) == sum(b.values()) + 20
        with pytest.raises(CollectiveTimeoutError) as failed:
            nodes[0].barrier(timeout=0.5)
        assert failed.value.missing == (1,), failed.value
        assert "barrier" in str(failed.value)


def test_blocking_calls_on_tensors_and_shaped_arrays_run_inline_in_place() -> None:
    """A CPU tensor and a 2-D array are reduced in place through the same inline path."""
    import torch

    with blocking_pair() as nodes:
        before = [dict(node.node.collectives.inline_calls) for node in nodes]

        def calls(node: SyncNode) -> tuple[float, float]:
            tensor = torch.full((3, 5), float(node.rank + 1))
            grid = np.full((4, 8), node.rank + 1.0, np.float64)
            for _ in range(3):
                node.allreduce(tensor, op="mean")
                node.allreduce(grid)
            return float(tensor[2, 4]), float(grid[3, 7])

        assert on_both(nodes, calls) == [(1.5, 12.0)] * 2  # the sum doubles each time
        after = [node.node.collectives.inline_calls for node in nodes]
        for a, b in zip(after, before, strict=True):
            assert sum(a.values()) == sum(b.values()) + 6

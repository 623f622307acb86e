"""Host-aware allreduce: ranks on one host sum locally first, host leaders run sliced."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import numpy as np
import pytest
from helpers import SHM_ROOM, make_cluster, run

from p2pdl.collectives.api import choose_algorithm
from p2pdl.collectives.hierarchical import PHASE_STRIDE, host_groups, worth_it
from p2pdl.errors import SharedMemoryError

LAYOUTS = [
    ["a", "a", "b", "b"],
    ["a", "b", "b", "c"],
    ["b", "a", "b", "a"],
    ["a", "a", "a"],
    ["a", "b"],
]


def test_host_groups_and_policy() -> None:
    assert host_groups(["x", "y", "x", "z"]) == [[0, 2], [1], [3]]
    assert worth_it(["a", "a", "b"]) and not worth_it(["a", "b"]) and not worth_it(["a", "a"])
    assert not worth_it(None)
    big = 64 << 20
    assert choose_algorithm(big, 4, ["a", "a", "b", "b"]) == "hierarchical"
    assert choose_algorithm(big, 4, ["a", "b", "c", "d"]) == "sliced"
    assert choose_algorithm(4096, 4, ["a", "a", "b", "b"]) == "direct"


def _inputs(n: int, size: int, dtype: type, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(size).astype(dtype) for _ in range(n)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["-".join(x) for x in LAYOUTS])
@pytest.mark.parametrize("size", [0, 1, 7, 100_003, 1_500_000])
@pytest.mark.parametrize("op", ["sum", "mean"])
def test_hierarchical_matches_numpy_and_is_bit_identical(
    layout: list[str], size: int, op: str
) -> None:
    n = len(layout)
    dtype = np.float64 if size % 2 else np.float32

    async def body() -> list[np.ndarray]:
        async with make_cluster(n, chunk_bytes=256 * 1024) as nodes:
            for node in nodes:
                node.collectives.host_ids = list(layout)
            arrays = _inputs(n, size, dtype, size)
            await asyncio.gather(
                *(
                    node.allreduce(a, op=op, algorithm="hierarchical")
                    for node, a in zip(nodes, arrays, strict=True)
                )
            )
            return arrays

    arrays = run(body())
    exact = np.sum([a.astype(np.float64) for a in _inputs(n, size, dtype, size)], axis=0)
    if op == "mean":
        exact /= n
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert np.allclose(arrays[0], exact, rtol=tol, atol=tol)
    assert all(a.tobytes() == arrays[0].tobytes() for a in arrays)


def test_hierarchical_on_slice_runs_once_per_slice_and_everyone_gets_its_writes() -> None:
    layout = ["a", "a", "b", "b", "c"]
    n, size = len(layout), 300_001
    calls: list[tuple[int, int, int]] = []

    async def body() -> list[np.ndarray]:
        async with make_cluster(n) as nodes:
            for node in nodes:
                node.collectives.host_ids = list(layout)

            def hook(rank: int) -> Any:
                def on_slice(start: int, stop: int, reduced: np.ndarray) -> None:
                    calls.append((rank, start, stop))
                    assert np.all(reduced == n)  # the fully reduced sum of ones
                    reduced[:] = -start

                return on_slice

            arrays = [np.ones(size, np.float32) for _ in nodes]
            await asyncio.gather(
                *(
                    node.allreduce(a, algorithm="hierarchical", on_slice=hook(node.rank))
                    for node, a in zip(nodes, arrays, strict=True)
                )
            )
            return arrays

    arrays = run(body())
    assert sorted(rank for rank, _, _ in calls) == [0, 2, 4]  # the host leaders own slices
    covered = sorted((start, stop) for _, start, stop in calls)
    assert covered[0][0] == 0 and covered[-1][1] == size
    assert all(a == b for (_, a), (b, _) in itertools.pairwise(covered))
    for start, stop in covered:
        assert all(np.all(a[start:stop] == -start) for a in arrays)


def test_hierarchical_with_bf16_between_hosts() -> None:
    layout = ["a", "a", "b", "b"]

    async def body() -> list[np.ndarray]:
        async with make_cluster(4) as nodes:
            for node in nodes:
                node.collectives.host_ids = list(layout)
            arrays = [np.full(500_000, r + 1.0, np.float32) for r in range(4)]
            await asyncio.gather(
                *(
                    node.allreduce(a, algorithm="hierarchical", compression="bf16")
                    for node, a in zip(nodes, arrays, strict=True)
                )
            )
            return arrays

    arrays = run(body())
    assert all(np.all(a == 10.0) for a in arrays)


def test_phases_do_not_overlap_in_frame_numbers() -> None:
    assert 3 * PHASE_STRIDE < (1 << 24) - 1  # the abort frame number stays outside


# ------------------------------------------------------------- phases 1 and 3 in shared memory
def _run_twice(layout: list[str], size: int, host_memory: bool) -> tuple[list[np.ndarray], list]:
    """Two hierarchical calls (so halves alternate), with or without the hosts' shared memory;
    returns the second call's results and each rank's `host_usable`."""
    n = len(layout)

    async def body() -> tuple[list[np.ndarray], list]:
        async with make_cluster(n) as nodes:
            for node in nodes:
                node.collectives.host_ids = list(layout)
                if not host_memory:
                    node.collectives.shm.host_usable = False
            for seed in (1, 2):
                arrays = _inputs(n, size, np.float32, seed)
                await asyncio.gather(
                    *(
                        node.allreduce(a, algorithm="hierarchical")
                        for node, a in zip(nodes, arrays, strict=True)
                    )
                )
            return arrays, [node.collectives.shm.host_usable for node in nodes]

    return run(body())


@pytest.mark.skipif(not SHM_ROOM, reason="no memfd_create, or under 512 MiB of memory free")
def test_shared_memory_within_hosts_gives_the_same_bits_as_loopback() -> None:
    layout = ["a", "a", "b", "b", "b"]
    shared, usable = _run_twice(layout, 300_001, host_memory=True)
    assert usable == [True] * len(layout)
    loopback, usable = _run_twice(layout, 300_001, host_memory=False)
    assert usable == [False] * len(layout)
    for a, b in zip(shared, loopback, strict=True):
        assert a.tobytes() == b.tobytes()
    assert all(a.tobytes() == shared[0].tobytes() for a in shared)


@pytest.mark.skipif(not SHM_ROOM, reason="no memfd_create, or under 512 MiB of memory free")
def test_a_host_that_cannot_reserve_redoes_the_call_over_loopback_with_nothing_summed_twice() -> (
    None
):
    layout = ["a", "a", "b", "b"]
    n, size = len(layout), 200_000

    async def body() -> None:
        async with make_cluster(n) as nodes:
            for node in nodes:
                node.collectives.host_ids = list(layout)
            warm = [np.ones(size, np.float32) for _ in nodes]
            await asyncio.gather(*(nd.allreduce(a) for nd, a in zip(nodes, warm, strict=True)))
            assert all(np.all(a == n) for a in warm)
            assert [nd.collectives.last_algorithm for nd in nodes] == ["hierarchical"] * n

            def full(nbytes: int) -> Any:
                raise SharedMemoryError("cannot reserve: /dev/shm is full")

            nodes[3].collectives.shm.own_segment = full  # type: ignore[method-assign]
            big = [np.full(2 * size, float(r + 1), np.float32) for r in range(n)]
            await asyncio.gather(*(nd.allreduce(a) for nd, a in zip(nodes, big, strict=True)))
            assert all(np.all(a == n * (n + 1) / 2) for a in big)  # each input summed once
            assert [nd.collectives.shm.host_usable for nd in nodes] == [False] * n  # all hosts

    run(body())

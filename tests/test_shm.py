"""The shared-memory allreduce: when `auto` takes it, its bits, its segments' lifetime."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import itertools
import os
import threading
from typing import Any

import numpy as np
import pytest
from helpers import make_cluster, on_all, on_all_settled, run

from p2pdl.collectives import shm, shmfd
from p2pdl.collectives.api import SHM_MIN_BYTES, choose_algorithm
from p2pdl.errors import (
    CollectiveMismatchError,
    CollectiveTimeoutError,
    P2PDLError,
    PeerLostError,
    SharedMemoryError,
)
from p2pdl.kernels import shmcall

pytestmark = pytest.mark.skipif(
    not hasattr(os, "memfd_create"), reason="no memfd_create on this system"
)


def segment_fds() -> list[int]:
    """This process's descriptors of p2pdl segments (every rank of a test cluster's).

    Collects garbage first: an earlier test's mapping that an array in a reference cycle
    still viewed (an error's traceback) holds a duplicate descriptor until the GC frees it.
    """
    gc.collect()
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith(f"/memfd:{shmfd.MEMFD_NAME}"):
            fds.append(int(name))
    return fds


def test_auto_policy_takes_shm_on_one_host_from_the_measured_crossover() -> None:
    assert SHM_MIN_BYTES == 1  # every non-empty buffer (measured: shm ahead from 8 bytes)
    assert choose_algorithm(8, 2, shared_memory=True) == "shm"
    assert choose_algorithm(4096, 4, shared_memory=True) == "shm"
    assert choose_algorithm(0, 2, shared_memory=True) == "direct"
    assert choose_algorithm(4096, 2, shared_memory=False) == "direct"
    assert choose_algorithm(64 << 20, 4, shared_memory=False) == "sliced"
    assert choose_algorithm(64 << 20, 1, shared_memory=True) == "direct"


def test_shm_matches_sliced_bit_for_bit_and_auto_uses_it() -> None:
    n, size = 3, 200_003

    async def body() -> None:
        async with make_cluster(n) as nodes:
            rng = np.random.default_rng(5)
            inputs = [rng.standard_normal(size).astype(np.float32) for _ in nodes]
            results = {}
            for algorithm in ("sliced", "shm", "auto"):
                arrays = [x.copy() for x in inputs]
                await on_all(
                    nodes,
                    lambda node, a=arrays, alg=algorithm: node.allreduce(
                        a[node.rank], algorithm=alg
                    ),
                )
                for a in arrays[1:]:
                    assert a.tobytes() == arrays[0].tobytes()
                results[algorithm] = arrays[0]
            assert [node.collectives.last_algorithm for node in nodes] == ["shm"] * n
            assert results["shm"].tobytes() == results["sliced"].tobytes()
            assert results["auto"].tobytes() == results["sliced"].tobytes()
            small = [np.ones(10, np.float32) for _ in nodes]
            await on_all(nodes, lambda node: node.allreduce(small[node.rank]))
            assert [node.collectives.last_algorithm for node in nodes] == ["shm"] * n
            assert all(np.all(a == n) for a in small)
            empty = [np.ones(0, np.float32) for _ in nodes]
            await on_all(nodes, lambda node: node.allreduce(empty[node.rank]))
            assert [node.collectives.last_algorithm for node in nodes] == ["direct"] * n

    run(body())


def test_ranks_of_one_loop_resume_each_others_compiled_calls_and_stay_exact() -> None:
    """Nodes of one process share a loop and its thread, so no compiled call ever meets a
    running peer: each rings the peers asleep on the loop, stops at a wait, and the Python
    steps resume it from there — at "enter" on the first rank of a call, at "out" on later
    ones (with the halves its peers named). Every result is exact, sums and means, float32
    and float64. (Threads that race a peer moving on to its next call:
    tests/test_inline.py.)"""
    n = 3
    if shmcall.available():
        shmcall.compiled("f"), shmcall.compiled("d")  # (not on a thread of its own)

    async def body() -> None:
        async with make_cluster(n) as nodes:
            warm = [np.ones(4096, np.float64) for _ in nodes]
            await on_all(nodes, lambda node: node.allreduce(warm[node.rank]))

            async def calls(node: Any) -> None:
                for i in range(60):
                    size, dtype = ((1000, np.float32), (37, np.float64), (4096, np.float32))[i % 3]
                    op = "mean" if i % 4 == 0 else "sum"
                    data = np.full(size, float(node.rank * 10 + i), dtype)
                    await node.allreduce(data, op=op)
                    total = sum(r * 10 + i for r in range(n))
                    expected = dtype(total) * dtype(1 / n) if op == "mean" else total
                    assert np.all(data == expected), (node.rank, i, data[:3], expected)

            await asyncio.gather(*(calls(node) for node in nodes))
            resumed = [node.collectives.shm.resumed for node in nodes]
            if shmcall.available():
                assert sum(r[shmcall.AT_OUT] for r in resumed) > 0, resumed
                assert sum(r[shmcall.AT_ENTER] for r in resumed) > 0, resumed

    run(body())


def test_segments_grow_shrink_and_alternate_halves_between_other_collectives() -> None:
    """Sizes go up and down (segments grow; halves alternate) with broadcasts and sliced
    calls in between; every result is exact (small integers), and no segment's descriptor
    outlives its arena."""
    n = 3
    sizes = [70_000, 1_000_003, 5, 2_500_000, 300_000, 2_500_000, 1]
    before = segment_fds()

    async def body() -> None:
        async with make_cluster(n) as nodes:
            for step, size in enumerate(sizes):
                arrays = [np.full(size, float(node.rank + step), np.float64) for node in nodes]
                await on_all(
                    nodes, lambda node, a=arrays: node.allreduce(a[node.rank], algorithm="shm")
                )
                expected = sum(r + step for r in range(n))
                assert all(np.all(a == expected) for a in arrays), (step, size)
                other = [np.full(1000, float(node.rank), np.float32) for node in nodes]
                await on_all(nodes, lambda node, o=other: node.broadcast(o[node.rank], root=1))
                assert all(np.all(a == 1.0) for a in other)
            mean = [np.full(400_000, float(node.rank), np.float32) for node in nodes]
            await on_all(nodes, lambda node: node.allreduce(mean[node.rank], op="mean"))
            assert all(np.all(a == 1.0) for a in mean)
            # Withdrawn from the servers once every peer mapped them.
            assert not any(node.collectives.shm.own.offered for node in nodes)
        assert segment_fds() == before

    run(body())


@pytest.mark.parametrize("style", ["on_slice", "async on_slice", "on_chunk"])
def test_on_slice_runs_on_each_owner_and_its_writes_reach_everyone(style: str) -> None:
    """The owner's hook sees its reduced slice and its writes reach every rank: on the
    first call (probe, segments made) and on the next ones, which run inline (a hook that
    returns an awaitable is awaited there too)."""
    n, size = 4, 100_001

    def hook(rank: int, round_: int, seen: dict[int, tuple[int, int]]) -> Any:
        def on_slice(start: int, stop: int, reduced: np.ndarray) -> Any:
            seen[rank] = (start, stop)
            assert np.all(reduced == n)
            reduced[:] = -rank - 10 * round_
            return asyncio.sleep(0) if style == "async on_slice" else None

        return {("on_chunk" if style == "on_chunk" else "on_slice"): on_slice}

    async def body() -> None:
        async with make_cluster(n) as nodes:
            for round_ in range(3):
                seen: dict[int, tuple[int, int]] = {}
                arrays = [np.ones(size, np.float32) for _ in nodes]
                await on_all(
                    nodes,
                    lambda node, a=arrays, r=round_, s=seen: node.allreduce(
                        a[node.rank], algorithm="shm", **hook(node.rank, r, s)
                    ),
                )
                spans = sorted(seen.values())
                assert spans[0][0] == 0 and spans[-1][1] == size
                assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
                for a in arrays[1:]:
                    assert a.tobytes() == arrays[0].tobytes()
                for rank, (start, stop) in seen.items():
                    assert np.all(arrays[0][start:stop] == -rank - 10 * round_)
            inline = [node.collectives.inline_calls for node in nodes]
            assert all(sum(c.values()) == 2 and not c["compiled"] for c in inline), (
                inline
            )  # (Python runs the hook and finishes)

    run(body())


def test_a_rank_that_cannot_map_makes_everyone_fall_back() -> None:
    """Ranks that share an address but cannot map each other's segments: `auto` agrees on
    sliced everywhere, an explicit `shm` fails everywhere with a clear error."""
    n, size = 3, 300_000

    async def body() -> None:
        async with make_cluster(n) as nodes:

            async def cannot_map(rank: int, offer: bytes, deadline: float) -> None:
                raise ConnectionRefusedError(111, "cannot reach its fd server")

            assert all(node.collectives.shm.usable for node in nodes)  # probed at start
            nodes[2].collectives.shm.peer_control = cannot_map  # type: ignore[method-assign]
            for node in nodes:
                node.collectives.shm.usable = None  # probe again, as a new group would
            arrays = [np.full(size, 1.0, np.float32) for _ in nodes]
            await on_all(nodes, lambda node: node.allreduce(arrays[node.rank]))
            assert all(np.all(a == n) for a in arrays)
            assert [node.collectives.last_algorithm for node in nodes] == ["sliced"] * n
            results = await on_all_settled(
                nodes, lambda node: node.allreduce(arrays[node.rank], algorithm="shm")
            )
            for result in results:
                assert isinstance(result, P2PDLError), result
                assert "shared memory is not usable" in str(result)

    run(body())


def test_bad_shm_requests_are_refused_before_anything_is_sent() -> None:
    async def body() -> None:
        async with make_cluster(2) as nodes:
            node = nodes[0]
            with pytest.raises(ValueError, match="nothing to compress"):
                await node.allreduce(np.ones(10, np.float32), algorithm="shm", compression="bf16")
            node.collectives.host_ids = ["198.18.0.1", "198.18.0.2"]
            with pytest.raises(ValueError, match="every rank on this host"):
                await node.allreduce(np.ones(10, np.float32), algorithm="shm")
            node.collectives.host_ids = ["127.0.0.1", "127.0.0.1"]
            arrays = [np.ones(10, np.float32), np.ones(10, np.float32)]
            await on_all(nodes, lambda n: n.allreduce(arrays[n.rank], algorithm="shm"))
            assert all(np.all(a == 2) for a in arrays)

    run(body())


def test_offers_that_are_not_offers_are_refused_before_anything_is_opened() -> None:
    async def body() -> None:
        arena = shm.ShmArena()
        deadline = asyncio.get_running_loop().time() + 5.0
        for bad in (b"../../etc/passwd", b"p2pdl-1-" + b"ab" * 8, b"", bytes(shmfd.OFFER_BYTES)):
            with pytest.raises(ValueError, match="segment offer"):
                await arena.peer_segment(1, bad, deadline)
        assert arena.peers == {}

    run(body())


CLONE_NEWNET = 0x40000000


def _server_in_another_network_namespace() -> shmfd.FdServer:
    """An fd server whose socket lives in a new network namespace (made by a thread of its
    own: a thread's namespace is its own), as a rank in another container's would."""
    made: list[shmfd.FdServer | BaseException] = []

    def make() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            made.append(OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)"))
            return
        made.append(shmfd.FdServer())

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        pytest.skip(f"cannot make a network namespace here: {made[0]}")
    return made[0]


def test_ranks_in_different_network_namespaces_cannot_reach_each_other_and_agree_on_tcp() -> None:
    """Rank 2 serves its segments in another network namespace (a container sharing the
    host's address and memory): the others cannot reach its socket, so every rank's probe
    says no, `auto` runs sliced everywhere and an explicit `shm` fails everywhere."""
    n, size = 3, 300_000

    async def body() -> None:
        async with make_cluster(n) as nodes:
            assert all(node.collectives.shm.usable for node in nodes)
            arena = nodes[2].collectives.shm
            arena.close()
            arena.server = _server_in_another_network_namespace()
            for node in nodes:
                node.collectives.shm.usable = None  # probe again, as a new group would
            arrays = [np.full(size, 1.0, np.float32) for _ in nodes]
            await on_all(nodes, lambda node: node.allreduce(arrays[node.rank]))
            assert all(np.all(a == n) for a in arrays)
            assert [node.collectives.shm.usable for node in nodes] == [False] * n
            assert [node.collectives.last_algorithm for node in nodes] == ["sliced"] * n
            assert arena.control_segment is not None
            offer = shmfd.Offer.parse(arena.control_segment.offer)
            deadline = asyncio.get_running_loop().time() + 5.0
            with pytest.raises(ConnectionRefusedError, match="cannot reach its fd server"):
                await shmfd.fetch(offer, deadline)
            results = await on_all_settled(
                nodes, lambda node: node.allreduce(arrays[node.rank], algorithm="shm")
            )
            for result in results:
                assert isinstance(result, P2PDLError), result
                assert "shared memory is not usable" in str(result)

    run(body())


def test_calls_in_flight_together_take_turns() -> None:
    """DDP launches its buckets without waiting for the previous one: several shm calls (and
    small direct ones between them) in flight at once on every rank, all exact."""
    n = 3
    sizes = [300_000, 90_000, 2_000_000, 10, 700_000]

    async def body() -> None:
        async with make_cluster(n) as nodes:
            buffers = {
                node.rank: [
                    np.full(size, float(node.rank + i), np.float32) for i, size in enumerate(sizes)
                ]
                for node in nodes
            }

            async def launch_all(node):
                await asyncio.gather(*(node.allreduce(b) for b in buffers[node.rank]))

            await on_all(nodes, launch_all)
            for i, _size in enumerate(sizes):
                expected = sum(r + i for r in range(n))
                for node in nodes:
                    assert np.all(buffers[node.rank][i] == expected), (node.rank, i)

    run(body())


def test_a_full_dev_shm_fails_the_call_everywhere_and_auto_redoes_it_over_the_network() -> None:
    """One rank cannot reserve its segment (its memory cgroup is full): every rank learns it
    on that call; `auto` redoes the call over TCP and stays there, `shm` raises."""
    n, size = 3, 1 << 20

    async def body() -> None:
        async with make_cluster(n) as nodes:

            def full(nbytes: int) -> shm.Segment:
                raise SharedMemoryError(f"cannot reserve {2 * nbytes} bytes of shared memory")

            nodes[1].collectives.shm.own_segment = full  # type: ignore[method-assign]
            arrays = [np.full(size, float(node.rank), np.float32) for node in nodes]
            await on_all(nodes, lambda node: node.allreduce(arrays[node.rank]))
            assert all(np.all(a == 3.0) for a in arrays)
            assert [node.collectives.last_algorithm for node in nodes] == ["sliced"] * n
            assert [node.collectives.shm.usable for node in nodes] == [False] * n
            again = [np.full(size, 1.0, np.float32) for _ in nodes]
            await on_all(nodes, lambda node: node.allreduce(again[node.rank]))
            assert all(np.all(a == n) for a in again)
            results = await on_all_settled(
                nodes, lambda node: node.allreduce(again[node.rank], algorithm="shm")
            )
            assert all(isinstance(r, P2PDLError) for r in results), results

    run(body())


def test_an_explicit_shm_call_that_cannot_allocate_fails_everywhere_with_the_reason() -> None:
    async def body() -> None:
        async with make_cluster(3) as nodes:

            def full(nbytes: int) -> shm.Segment:
                raise SharedMemoryError("cannot reserve 2097152 bytes of shared memory")

            nodes[2].collectives.shm.own_segment = full  # type: ignore[method-assign]
            arrays = [np.ones(1 << 18, np.float32) for _ in nodes]
            results = await on_all_settled(
                nodes, lambda node: node.allreduce(arrays[node.rank], algorithm="shm")
            )
            for rank, result in enumerate(results):
                assert isinstance(result, SharedMemoryError), (rank, result)
                assert "cannot reserve" in str(result)
            assert all(np.all(a == 1.0) for a in arrays)  # nobody's input was touched

    run(body())


def test_a_rank_that_fails_mid_call_tells_the_others_instead_of_letting_them_time_out() -> None:
    async def body() -> None:
        async with make_cluster(3) as nodes:

            async def gone(rank: int, offer: bytes, deadline: float) -> shm.Segment:
                raise ConnectionRefusedError(111, "cannot reach its fd server")

            nodes[0].collectives.shm.peer_segment = gone  # type: ignore[method-assign]
            arrays = [np.ones(1 << 18, np.float32) for _ in nodes]
            results = await on_all_settled(
                nodes,
                lambda node: node.allreduce(arrays[node.rank], algorithm="shm", timeout=60.0),
            )
            assert "rank 0 cannot map" in str(results[0])
            for result in results[1:]:
                assert type(result) is P2PDLError, result  # not a CollectiveTimeoutError
                assert "rank 0 failed: rank 0 cannot map" in str(result)

    run(body())


def test_a_silent_or_departing_rank_is_named_once_segments_are_set_up() -> None:
    """With shared memory probed and every segment mapped, a call needs no frame at all: its
    waits still have the call's deadline (a rank that never calls is named when it runs out)
    and still see lost links (a rank that closes mid-call is named at once)."""

    async def body() -> None:
        async with make_cluster(3) as nodes:
            warm = [np.ones(64, np.float32) for _ in nodes]
            await on_all(nodes, lambda node: node.allreduce(warm[node.rank]))
            assert [node.collectives.last_algorithm for node in nodes] == ["shm"] * 3
            loop = asyncio.get_running_loop()
            started = loop.time()
            results = await asyncio.gather(
                *(node.allreduce(np.ones(64, np.float32), timeout=0.5) for node in nodes[:2]),
                return_exceptions=True,
            )
            assert loop.time() - started < 5
            for result in results:
                assert isinstance(result, CollectiveTimeoutError), result
                assert result.missing == (2,), result
        async with make_cluster(3) as nodes:
            warm = [np.ones(64, np.float32) for _ in nodes]
            await on_all(nodes, lambda node: node.allreduce(warm[node.rank]))
            calls = [
                asyncio.ensure_future(node.allreduce(np.ones(64, np.float32), timeout=60))
                for node in nodes[:2]
            ]
            control = nodes[2].collectives.shm.controls
            before = [control[r][1][shmcall.CURRENT] for r in (0, 1)]
            while not all(control[r][1][shmcall.CURRENT] > before[r] for r in (0, 1)):
                await asyncio.sleep(0)  # (until both have started: read from their blocks)
            started = loop.time()
            await nodes[2].close()
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert loop.time() - started < 30
            for result in results:
                assert isinstance(result, PeerLostError), result
                assert tuple(result.ranks) == (2,), result

    run(body())


def test_barriers_go_through_shared_memory_once_it_is_in_use() -> None:
    """A barrier on ranks that use shared memory needs no frame: each rank's control block
    moves on; one that meets an allreduce fails as a mismatch on both sides; one that a
    rank skips times out naming it."""

    async def body() -> None:
        async with make_cluster(3) as nodes:
            await on_all(nodes, lambda node: node.barrier())  # over TCP: not probed yet
            warm = [np.ones(64, np.float32) for _ in nodes]
            await on_all(nodes, lambda node: node.allreduce(warm[node.rank]))
            control = nodes[0].collectives.shm.controls
            before = [control[r][1][shmcall.DONE] for r in (1, 2)]
            for _ in range(5):
                await on_all(nodes, lambda node: node.barrier())
            after = [control[r][1][shmcall.DONE] for r in (1, 2)]
            assert all(a >= b + 5 for a, b in zip(after, before, strict=True)), (after, before)
            results = await asyncio.gather(
                nodes[0].barrier(timeout=20),
                nodes[1].allreduce(np.zeros(1), timeout=20),
                nodes[2].barrier(timeout=20),
                return_exceptions=True,
            )
            for result in results:
                assert isinstance(result, CollectiveMismatchError), result
            assert "barrier(shm" in str(results[1]), results[1]
            results = await asyncio.gather(
                *(node.barrier(timeout=0.5) for node in nodes[:2]), return_exceptions=True
            )
            for result in results:
                assert isinstance(result, CollectiveTimeoutError), result
                assert result.missing == (2,), result

    run(body())

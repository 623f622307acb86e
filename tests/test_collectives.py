"""Collectives between in-process nodes: sums against NumPy, bits, hooks, misuse and failures."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from helpers import SHM_ROOM, make_cluster, on_all, on_all_settled, run, short_timeouts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pdl.errors import CollectiveMismatchError, CollectiveTimeoutError, PeerLostError
from p2pdl.node import Node

ALGORITHMS = ("direct", "sliced", "ring", *(("shm",) if SHM_ROOM else ()), "driver", "tree")
DTYPES = (np.float32, np.float64)
PRIMES = (2, 3, 5, 7, 13, 31, 101, 1009, 65537, 262147)

EPS = {np.dtype(np.float32): 2.0**-24, np.dtype(np.float64): 2.0**-53}
"""Unit roundoff of the buffer's own arithmetic."""

SHORT = 20.0
"""Operation timeout where a regression would otherwise hang: generous for a busy machine,
short enough that a missing error shows up as a failure of the test, not of the suite."""

PROPERTY = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def inputs(world_size: int, size: int, dtype: Any, seed: int, k: int = 1) -> list[list[np.ndarray]]:
    """Per rank, `k` buffers of random values (mixed magnitudes, signs, exact zeros)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(world_size):
        buffers = []
        for _ in range(k):
            values = rng.standard_normal(size) * rng.choice([1e-3, 1.0, 1e3], size)
            values[rng.random(size) < 0.05] = 0.0
            buffers.append(values.astype(dtype))
        out.append(buffers)
    return out


def reference(per_rank: list[list[np.ndarray]], mean: bool) -> tuple[np.ndarray, np.ndarray]:
    """float64 sum (or mean) of every buffer, and the elementwise sum of magnitudes."""
    flat = [b.astype(np.float64) for buffers in per_rank for b in buffers]
    exact = np.sum(flat, axis=0)
    magnitude = np.sum(np.abs(flat), axis=0)
    n = len(per_rank)
    return (exact / n, magnitude / n) if mean else (exact, magnitude)


def assert_close_to_sum(result: np.ndarray, exact: np.ndarray, magnitude: np.ndarray, terms: int):
    """Float summation of `terms` values in any order: |error| ≤ (terms + 1)·u·Σ|x_i|.

    Each of the (terms − 1) additions and the final mean scaling rounds once, with relative
    error at most u (the unit roundoff) of a partial sum bounded by Σ|x_i|.
    """
    u = EPS[result.dtype]
    bound = (terms + 1) * u * magnitude + np.finfo(result.dtype).tiny
    error = np.abs(result.astype(np.float64) - exact)
    worst = int(np.argmax(error - bound)) if error.size else 0
    assert np.all(error <= bound), (
        f"element {worst}: got {result[worst]!r}, exact {exact[worst]!r}, bound {bound[worst]!r}"
    )


def assert_same_bits(arrays: list[np.ndarray]) -> None:
    first = arrays[0].tobytes()
    for rank, array in enumerate(arrays[1:], start=1):
        assert array.tobytes() == first, f"rank {rank} ends with different bits than rank 0"


async def allreduce_all(nodes: list[Node], arrays: list[Any], **kwargs: Any) -> None:
    await asyncio.gather(*(n.allreduce(a, **kwargs) for n, a in zip(nodes, arrays, strict=True)))


def copies(per_rank: list[list[np.ndarray]]) -> list[np.ndarray]:
    return [buffers[0].copy() for buffers in per_rank]


# ---------------------------------------------------------------------- sums, bits, determinism
sizes = st.one_of(
    st.sampled_from([0, 1]),
    st.integers(0, 5),  # around the world size: some slices are empty
    st.sampled_from(PRIMES),
    st.integers(0, 200_000),
)


def check_allreduce(n: int, size: int, dtype: Any, algorithm: str, op: str, seed: int) -> None:
    per_rank = inputs(n, size, dtype, seed)
    exact, magnitude = reference(per_rank, op == "mean")

    async def body() -> tuple[list[np.ndarray], list[np.ndarray]]:
        async with make_cluster(n) as nodes:
            first = copies(per_rank)
            await allreduce_all(nodes, first, op=op, algorithm=algorithm)
            again = copies(per_rank)
            await allreduce_all(nodes, again, op=op, algorithm=algorithm)
            return first, again

    first, again = run(body())
    assert_same_bits(first)
    assert first[0].tobytes() == again[0].tobytes(), "the same inputs gave different bits"
    assert all(a.dtype == dtype and a.shape == (size,) for a in first)
    assert_close_to_sum(first[0], exact, magnitude, n)


@PROPERTY
@given(
    n=st.integers(1, 5),
    size=sizes,
    dtype=st.sampled_from(DTYPES),
    algorithm=st.sampled_from(ALGORITHMS),
    op=st.sampled_from(["sum", "mean"]),
    seed=st.integers(0, 2**32),
)
def test_allreduce_matches_numpy_and_is_bit_identical(
    n: int, size: int, dtype: Any, algorithm: str, op: str, seed: int
) -> None:
    check_allreduce(n, size, dtype, algorithm, op, seed)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("n", [2, 3, 5])
def test_allreduce_edge_sizes(algorithm: str, n: int) -> None:
    """Sizes 0, 1, just below/at/above the world size, for every algorithm (not left to luck)."""

    async def body() -> None:
        async with make_cluster(n) as nodes:
            for size in (0, 1, n - 1, n, n + 1, 2 * n + 1):
                for dtype in DTYPES:
                    per_rank = inputs(n, size, dtype, seed=size)
                    exact, magnitude = reference(per_rank, False)
                    arrays = copies(per_rank)
                    await allreduce_all(nodes, arrays, algorithm=algorithm)
                    assert_same_bits(arrays)
                    assert_close_to_sum(arrays[0], exact, magnitude, n)

    run(body())


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    n=st.integers(2, 5),
    size=st.integers(1_000_000, 3_000_000),
    dtype=st.sampled_from(DTYPES),
    algorithm=st.sampled_from(ALGORITHMS),
    op=st.sampled_from(["sum", "mean"]),
    seed=st.integers(0, 2**32),
)
def test_large_allreduce(n: int, size: int, dtype: Any, algorithm: str, op: str, seed: int) -> None:
    check_allreduce(n, size, dtype, algorithm, op, seed)


def test_large_allreduce_every_algorithm() -> None:
    """One multi-chunk buffer (several MiB per rank) through each algorithm, not left to luck."""
    n, size = 4, 1_500_007
    per_rank = inputs(n, size, np.float32, seed=11)
    exact, magnitude = reference(per_rank, False)

    async def body() -> None:
        async with make_cluster(n) as nodes:
            results = {}
            for algorithm in ALGORITHMS:
                arrays = copies(per_rank)
                await allreduce_all(nodes, arrays, algorithm=algorithm)
                assert_same_bits(arrays)
                assert_close_to_sum(arrays[0], exact, magnitude, n)
                results[algorithm] = arrays[0]

    run(body())


# ----------------------------------------------------------------------------- compression
U16 = {"bf16": 2.0**-8, "fp16": 2.0**-11}
"""Unit roundoff of the wire format, round to nearest: bf16 keeps 8 significant bits, fp16 11."""


def compression_bound(compression: str, n: int, magnitude: np.ndarray, mean: bool) -> np.ndarray:
    """How far a compressed allreduce may land from the exact sum, elementwise.

    Derivation. Let M = Σ_i |x_i| (per element); every partial sum and every contribution is
    at most M in magnitude. A 16-bit encode rounds a value v to v(1 + δ), |δ| ≤ u16. The
    algorithms round at most n times on any element's path:
      * direct: each of the n contributions once (the owner's own share too)   → ≤ n·u16·M;
      * sliced: the n − 1 peers' contributions, then the owner's result once   → ≤ n·u16·M;
      * ring:   the partial sum sent at each of the n − 1 steps, then the
                owner's result once before the all-gather                      → ≤ n·u16·M.
    The float32 additions and the mean's scaling add at most (n + 1)·2^-24·M, well under one
    more u16·M. So |result − exact| ≤ (n + 1)·u16·M (divided by n for the mean, as M is).
    fp16 also flushes to subnormals: each rounding may add up to 2^-25 absolute; allow
    (n + 1)·2^-24 for that.
    """
    bound = (n + 1) * U16[compression] * magnitude
    if compression == "fp16":
        bound = bound + (n + 1) * 2.0**-24
    return bound


@PROPERTY
@given(
    n=st.integers(2, 5),
    size=st.one_of(st.integers(0, 9), st.sampled_from(PRIMES), st.integers(0, 300_000)),
    algorithm=st.sampled_from(["direct", "sliced", "ring"]),
    compression=st.sampled_from(["bf16", "fp16"]),
    op=st.sampled_from(["sum", "mean"]),
    seed=st.integers(0, 2**32),
)
def test_compressed_allreduce_within_format_rounding(
    n: int, size: int, algorithm: str, compression: str, op: str, seed: int
) -> None:
    check_compressed(n, size, algorithm, compression, op, seed)


@pytest.mark.parametrize("compression", ["bf16", "fp16"])
@pytest.mark.parametrize("algorithm", ["direct", "sliced", "ring"])
def test_compressed_allreduce_large(algorithm: str, compression: str) -> None:
    """Several chunks per slice (not left to the property test's luck)."""
    check_compressed(4, 700_001, algorithm, compression, "sum", seed=3)


def check_compressed(n: int, size: int, algorithm: str, compression: str, op: str, seed: int):
    per_rank = inputs(n, size, np.float32, seed)
    for buffers in per_rank:  # keep fp16 in range: |values| ≤ 1e3·~5 ≪ 65504
        np.clip(buffers[0], -5e3, 5e3, out=buffers[0])
    exact, magnitude = reference(per_rank, op == "mean")

    async def body() -> tuple[list[np.ndarray], list[np.ndarray]]:
        async with make_cluster(n) as nodes:
            kwargs = {"op": op, "algorithm": algorithm, "compression": compression}
            first = copies(per_rank)
            await allreduce_all(nodes, first, **kwargs)
            again = copies(per_rank)
            await allreduce_all(nodes, again, **kwargs)
            return first, again

    first, again = run(body())
    assert_same_bits(first)
    assert first[0].tobytes() == again[0].tobytes()
    bound = compression_bound(compression, n, magnitude, op == "mean")
    error = np.abs(first[0].astype(np.float64) - exact)
    assert np.all(error <= bound), float(np.max(error - bound))


# ------------------------------------------------------------------------ on_slice (optimizer)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(("n", "size"), [(1, 10), (2, 1), (3, 2), (3, 100_003), (4, 700_001)])
def test_on_slice_sees_the_reduced_slice_and_its_writes_reach_everyone(
    algorithm: str, n: int, size: int
) -> None:
    per_rank = inputs(n, size, np.float32, seed=size)
    exact, magnitude = reference(per_rank, False)

    async def body() -> tuple[list[np.ndarray], dict[int, list[tuple[int, int, np.ndarray]]]]:
        calls: dict[int, list[tuple[int, int, np.ndarray]]] = {r: [] for r in range(n)}

        def hook(rank: int) -> Callable[[int, int, np.ndarray], None]:
            def on_slice(start: int, stop: int, reduced: np.ndarray) -> None:
                calls[rank].append((start, stop, reduced.copy()))
                # A deterministic "optimizer step" on the owner's slice only.
                reduced *= np.float32(-0.5)
                reduced += np.float32(3.0)

            return on_slice

        async with make_cluster(n) as nodes:
            arrays = copies(per_rank)
            await asyncio.gather(
                *(
                    node.allreduce(a, algorithm=algorithm, on_slice=hook(node.rank))
                    for node, a in zip(nodes, arrays, strict=True)
                )
            )
        return arrays, calls

    arrays, calls = run(body())
    assert all(len(c) <= 1 for c in calls.values()), "on_slice ran twice on one rank"
    ranges = sorted((start, stop) for c in calls.values() for start, stop, _ in c)
    if ranges and all(r == (0, size) for r in ranges):
        pass  # direct: every rank owns everything; driver/tree: only the root runs it
    else:
        covered = [stop - start for start, stop in ranges]
        assert sum(covered) == size and ranges[0][0] == 0
        for (_, stop), (start, _) in itertools.pairwise(ranges):
            assert stop == start, "owners' slices must tile the buffer"
    assert ranges, "on_slice never ran"
    for c in calls.values():
        for start, stop, reduced in c:
            assert_close_to_sum(reduced, exact[start:stop], magnitude[start:stop], n)
    assert_same_bits(arrays)
    expected = np.zeros(size, dtype=np.float32)
    for c in calls.values():
        for start, stop, reduced in c:
            expected[start:stop] = reduced * np.float32(-0.5) + np.float32(3.0)
    assert arrays[0].tobytes() == expected.tobytes()


# ------------------------------------------------------- reduce_scatter, allgather, broadcast
@pytest.mark.parametrize(("n", "size"), [(1, 7), (2, 1), (3, 2), (3, 1009), (5, 300_007)])
def test_reduce_scatter_and_allgather(n: int, size: int) -> None:
    per_rank = inputs(n, size, np.float32, seed=n)
    exact, magnitude = reference(per_rank, False)

    async def body() -> None:
        async with make_cluster(n) as nodes:
            arrays = copies(per_rank)
            owned = await asyncio.gather(
                *(node.reduce_scatter(a) for node, a in zip(nodes, arrays, strict=True))
            )
            starts = sorted(owned)
            assert starts[0][0] == 0 and starts[-1][1] == size
            for (_, stop), (start, _) in itertools.pairwise(starts):
                assert stop == start
            for node, array, (start, stop) in zip(nodes, arrays, owned, strict=True):
                assert (start, stop) == node.collectives.plan(size).slices[node.rank]
                assert_close_to_sum(array[start:stop], exact[start:stop], magnitude[start:stop], n)
            # Gather: every rank ends with every owner's slice, bit for bit.
            expected = np.empty(size, dtype=np.float32)
            for array, (start, stop) in zip(arrays, owned, strict=True):
                expected[start:stop] = array[start:stop]
            await asyncio.gather(
                *(node.allgather(a) for node, a in zip(nodes, arrays, strict=True))
            )
            for array in arrays:
                assert array.tobytes() == expected.tobytes()

    run(body())


@pytest.mark.parametrize(
    ("n", "shape", "dtype"),
    [
        (1, (5,), np.float32),
        (2, (0,), np.float32),
        (3, (1000,), np.float64),
        (4, (1000, 3), np.float32),  # small, two-dimensional
        (4, (300_001,), np.float32),  # > 256 KiB: the binomial tree, several chunks
        (5, (70_001,), np.float64),  # > 256 KiB
    ],
)
def test_broadcast_from_every_root(n: int, shape: tuple[int, ...], dtype: Any) -> None:
    rng = np.random.default_rng(n)
    sources = [rng.standard_normal(shape).astype(dtype) for _ in range(n)]

    async def body() -> None:
        async with make_cluster(n, chunk_bytes=256 * 1024) as nodes:
            for root in range(n):
                arrays = [
                    sources[root].copy() if r == root else np.full(shape, np.nan, dtype=dtype)
                    for r in range(n)
                ]
                await asyncio.gather(
                    *(node.broadcast(a, root=root) for node, a in zip(nodes, arrays, strict=True))
                )
                for array in arrays:
                    assert array.tobytes() == sources[root].tobytes()

    run(body())


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_barrier(n: int) -> None:
    async def body() -> None:
        async with make_cluster(n) as nodes:
            for _ in range(3):
                await on_all(nodes, lambda node: node.barrier())
            if n > 1:
                # A barrier does not complete while one rank has not entered it.
                waiting = asyncio.gather(*(node.barrier() for node in nodes[1:]))
                await asyncio.sleep(0.05)  # give it the chance to (wrongly) finish
                assert not waiting.done()
                await nodes[0].barrier()
                await waiting

    run(body())


# --------------------------------------------------------------------------- phase 1 (local)
@pytest.mark.parametrize("algorithm", ["auto", "direct", "sliced", "ring"])
@pytest.mark.parametrize(("n", "k", "size"), [(1, 3, 100), (2, 2, 1), (3, 4, 100_003)])
def test_local_buffers_are_summed_before_the_network(
    algorithm: str, n: int, k: int, size: int
) -> None:
    per_rank = inputs(n, size, np.float32, seed=k, k=k)
    exact, magnitude = reference(per_rank, False)

    async def body() -> list[list[np.ndarray]]:
        async with make_cluster(n) as nodes:
            local = [[b.copy() for b in buffers] for buffers in per_rank]
            await allreduce_all(nodes, local, algorithm=algorithm)
            return local

    local = run(body())
    assert_same_bits([b for buffers in local for b in buffers])
    assert_close_to_sum(local[0][0], exact, magnitude, n * k)


# --------------------------------------------------------------------------------- torch
def test_torch_cpu_tensors_in_place() -> None:
    torch = pytest.importorskip("torch")
    n = 3

    async def body() -> None:
        async with make_cluster(n) as nodes:
            tensors = [torch.full((4, 250), float(r + 1)) for r in range(n)]
            pointers = [t.data_ptr() for t in tensors]
            results = await asyncio.gather(
                *(node.allreduce(t) for node, t in zip(nodes, tensors, strict=True))
            )
            for tensor, result, pointer in zip(tensors, results, pointers, strict=True):
                assert result is tensor and tensor.data_ptr() == pointer
                assert bool((tensor == 6.0).all())
            # A list of local tensors (phase 1), float64 and mean.
            local = [[torch.full((33,), 1.0, dtype=torch.float64) for _ in range(2)] for _ in nodes]
            await asyncio.gather(
                *(node.allreduce(b, op="mean") for node, b in zip(nodes, local, strict=True))
            )
            assert all(bool((t == 2.0).all()) for buffers in local for t in buffers)
            grads = [torch.ones(10, requires_grad=True).grad for _ in nodes]
            assert grads[0] is None  # the no-grad case is the caller's; tensors with grad:
            params = [torch.ones(10, requires_grad=True) for _ in nodes]
            await allreduce_all(nodes, [p.detach() for p in params])
            assert all(bool((p.detach() == 3.0).all()) for p in params)
            roots = [torch.arange(7, dtype=torch.float32) * (r == 1) for r in range(n)]
            await asyncio.gather(
                *(node.broadcast(t, root=1) for node, t in zip(nodes, roots, strict=True))
            )
            assert all(bool((t == torch.arange(7)).all()) for t in roots)

    run(body())


def test_torch_bad_tensors_are_refused() -> None:
    torch = pytest.importorskip("torch")

    async def body() -> None:
        async with make_cluster(1) as nodes:
            node = nodes[0]
            with pytest.raises(ValueError, match="contiguous"):
                await node.allreduce(torch.ones(4, 4).t())
            with pytest.raises(TypeError, match="needs a float dtype"):
                await node.allreduce(torch.ones(4, dtype=torch.int64), op="mean")
            with pytest.raises(TypeError, match="cannot reduce complex64"):
                await node.allreduce(torch.ones(4, dtype=torch.complex64))
            if hasattr(torch, "float8_e4m3fn"):
                with pytest.raises(TypeError, match="cannot reduce float8"):
                    await node.allreduce(torch.ones(4).to(torch.float8_e4m3fn))

    run(body())


# ------------------------------------------------------------------------------- bad input
BAD_CALLS: list[tuple[str, Callable[[Node], Any], type[Exception]]] = [
    ("int mean", lambda node: node.allreduce(np.ones(8, dtype=np.int32), op="mean"), TypeError),
    ("uint16", lambda node: node.allreduce(np.ones(8, dtype=np.uint16)), TypeError),
    ("bool premul", lambda node: node.allreduce(np.ones(8, bool), premul=2.0), TypeError),
    ("premul max", lambda node: node.allreduce(np.ones(8), op="max", premul=2.0), ValueError),
    ("non-contiguous", lambda node: node.allreduce(np.ones((4, 4), np.float32).T), ValueError),
    ("strided", lambda node: node.allreduce(np.ones(16, np.float32)[::2]), ValueError),
    ("read-only", lambda node: node.allreduce(_read_only()), ValueError),
    ("list", lambda node: node.allreduce([1.0, 2.0]), TypeError),
    ("empty list", lambda node: node.allreduce([]), ValueError),
    (
        "local buffers differ",
        lambda node: node.allreduce([np.ones(4, np.float32), np.ones(5, np.float32)]),
        ValueError,
    ),
    ("unknown op", lambda node: node.allreduce(np.ones(8, np.float32), op="bxor"), ValueError),
    (
        "max compressed",
        lambda node: node.allreduce(np.ones(8, np.float32), op="max", compression="bf16"),
        ValueError,
    ),
    (
        "unknown algorithm",
        lambda node: node.allreduce(np.ones(8, np.float32), algorithm="bogus"),
        ValueError,
    ),
    (
        "unknown compression",
        lambda node: node.allreduce(np.ones(8, np.float32), compression="int8"),
        ValueError,
    ),
    (
        "float64 compressed",
        lambda node: node.allreduce(np.ones(8, np.float64), compression="bf16"),
        TypeError,
    ),
    (
        "baseline compressed",
        lambda node: node.allreduce(np.ones(8, np.float32), algorithm="tree", compression="fp16"),
        ValueError,
    ),
    ("reduce_scatter op", lambda node: node.reduce_scatter(np.ones(8), op="band"), ValueError),
    ("allgather object", lambda node: node.allgather(np.ones(8, dtype=object)), TypeError),
    ("broadcast root", lambda node: node.broadcast(np.ones(8), root=3), ValueError),
    ("broadcast read-only", lambda node: node.broadcast(_read_only()), ValueError),
]


def _read_only() -> np.ndarray:
    array = np.ones(8, np.float32)
    array.flags.writeable = False
    return array


def test_bad_input_raises_before_anything_is_sent() -> None:
    async def body() -> None:
        async with make_cluster(3) as nodes:
            for what, call, error in BAD_CALLS:
                counter = nodes[0].session.mesh._op_counter
                with pytest.raises(error):
                    await call(nodes[0])
                # Nothing was numbered or sent: the ranks are still aligned.
                assert nodes[0].session.mesh._op_counter == counter, what
            arrays = [np.full(10, 1.0 + r, np.float32) for r in range(3)]
            await allreduce_all(nodes, arrays)
            assert all(np.all(a == 6.0) for a in arrays)

    run(body())


# ------------------------------------------------------------------------------ mismatches
def _call(size: int = 1000, dtype: Any = np.float32, **kwargs: Any) -> Callable[[Node], Any]:
    def call(node: Node) -> Any:
        return node.allreduce(np.ones(size, dtype=dtype), timeout=SHORT, **kwargs)

    return call


MISMATCHES: dict[str, tuple[Callable[[Node], Any], Callable[[Node], Any]]] = {
    "size": (_call(1000), _call(1001)),
    "size-large": (_call(300_000, algorithm="sliced"), _call(300_001, algorithm="sliced")),
    "size-empty": (_call(0, algorithm="direct"), _call(5, algorithm="direct")),
    "dtype": (_call(dtype=np.float32), _call(dtype=np.float64)),
    "op": (_call(op="sum"), _call(op="mean")),
    "algorithm": (_call(algorithm="sliced"), _call(algorithm="ring")),
    "algorithm-shm": (_call(algorithm="shm"), _call(algorithm="sliced")),
    "size-shm": (_call(300_000, algorithm="shm"), _call(300_001, algorithm="shm")),
    "size-auto-shm": (_call(300_000), _call(10)),
    "algorithm-direct": (_call(algorithm="direct"), _call(algorithm="tree")),
    "compression": (_call(algorithm="sliced"), _call(algorithm="sliced", compression="bf16")),
    "kind": (_call(), lambda node: node.broadcast(np.ones(1000, np.float32), timeout=SHORT)),
}


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("kind", sorted(MISMATCHES))
def test_mismatch_fails_on_every_rank_and_the_ranks_stay_aligned(kind: str, n: int) -> None:
    agree, odd = MISMATCHES[kind]
    odd_rank = n - 1

    async def body() -> None:
        async with make_cluster(n, timeouts=short_timeouts(operation=SHORT)) as nodes:
            results = await on_all_settled(
                nodes, lambda node: (odd if node.rank == odd_rank else agree)(node)
            )
            for rank, result in enumerate(results):
                assert isinstance(result, CollectiveMismatchError), (rank, result)
                assert odd_rank in result.ranks, (rank, result)
                assert len(result.ranks) >= 2
            # The op counter stayed aligned: the next collective is correct everywhere.
            arrays = [np.full(1000, 1.0 + r, np.float32) for r in range(n)]
            await allreduce_all(nodes, arrays, timeout=SHORT)
            total = n * (n + 1) / 2
            assert all(np.all(a == total) for a in arrays)
            await on_all(nodes, lambda node: node.barrier(timeout=SHORT))

    run(body())


# A rank whose call moves no bytes must still be seen: empty buffers exchange one empty frame.
def test_mismatch_empty_against_non_empty_sliced() -> None:
    async def body() -> list[Any]:
        async with make_cluster(2) as nodes:
            return await on_all_settled(
                nodes,
                lambda node: node.allreduce(
                    np.ones(5 * node.rank, np.float32), algorithm="sliced", timeout=2.0
                ),
            )

    results = run(body())
    assert all(isinstance(r, CollectiveMismatchError) for r in results), results


# Ranks that each believe they are the root must not return with diverged buffers.
def test_mismatch_broadcast_roots() -> None:
    async def body() -> list[Any]:
        async with make_cluster(2) as nodes:
            return await on_all_settled(
                nodes,
                lambda node: node.broadcast(np.ones(10), root=node.rank, timeout=2.0),
            )

    results = run(body())
    assert all(isinstance(r, CollectiveMismatchError) for r in results), results


# ------------------------------------------------------------------------ many in flight
def test_many_collectives_in_flight_never_cross() -> None:
    n = 3
    plan = [
        (10, "direct", np.float32),
        (200_003, "sliced", np.float32),
        (1, "ring", np.float64),
        (50_000, "ring", np.float32),
        (0, "sliced", np.float32),
        (70_001, "tree", np.float64),
        (999, "driver", np.float32),
        (300_000, "auto", np.float64),
        (17, "auto", np.float32),
    ]

    async def body() -> None:
        async with make_cluster(n) as nodes:
            arrays = {
                node.rank: [
                    np.full(size, (index + 1) * 10.0 + node.rank, dtype=dtype)
                    for index, (size, _a, dtype) in enumerate(plan)
                ]
                for node in nodes
            }

            async def issue(node: Node) -> None:
                await asyncio.gather(
                    *(
                        node.allreduce(arrays[node.rank][index], algorithm=algorithm)
                        for index, (_size, algorithm, _dtype) in enumerate(plan)
                    ),
                    node.barrier(),
                )

            await on_all(nodes, issue)
            for index, (size, _algorithm, dtype) in enumerate(plan):
                expected = np.full(size, n * (index + 1) * 10.0 + sum(range(n)), dtype=dtype)
                for node in nodes:
                    assert arrays[node.rank][index].tobytes() == expected.tobytes(), index

    run(body())


# --------------------------------------------------------------------------- lost peers
def test_peer_closed_mid_collective_fails_survivors_with_peer_lost() -> None:
    n, size = 3, 4_000_000  # 16 MiB per rank: many chunks, still running when rank 2 goes

    async def body() -> None:
        async with make_cluster(n, timeouts=short_timeouts(operation=SHORT)) as nodes:
            reached, release = asyncio.Event(), asyncio.Event()

            def stall(start: int, stop: int, reduced: np.ndarray) -> Any:
                # Rank 2 has reduced its slice (frames are flowing) and holds on to it until
                # it has been closed; then it tries to share it.
                async def hold() -> None:
                    reached.set()
                    await release.wait()

                return hold()

            arrays = [np.ones(size, np.float32) for _ in nodes]
            tasks = [
                asyncio.ensure_future(
                    node.allreduce(
                        a, algorithm="sliced", on_slice=stall if node.rank == 2 else None
                    )
                )
                for node, a in zip(nodes, arrays, strict=True)
            ]
            await reached.wait()
            assert not any(task.done() for task in tasks[:2])
            await nodes[2].close()
            results = await asyncio.gather(*tasks[:2], return_exceptions=True)
            for rank in (0, 1):
                assert isinstance(results[rank], PeerLostError), (rank, results[rank])
                assert results[rank].ranks == (2,), results[rank]
                assert "rank 2" in str(results[rank])
            # The closed rank itself fails too once it tries to use its links.
            release.set()
            with pytest.raises(PeerLostError):
                await tasks[2]
            # The survivors still serve each other... but a collective needs every rank.
            with pytest.raises(PeerLostError):
                await nodes[0].allreduce(np.ones(4, np.float32), timeout=SHORT)
        # The same process (and event loop) goes on to form a new cluster without rank 2.
        async with make_cluster(n - 1, timeouts=short_timeouts(operation=SHORT)) as fresh:
            arrays = [np.full(size, node.rank + 1.0, np.float32) for node in fresh]
            await asyncio.gather(
                *(node.allreduce(a) for node, a in zip(fresh, arrays, strict=True))
            )
            assert all(np.all(a == 3.0) for a in arrays)

    run(body())


@pytest.mark.parametrize(
    "algorithm", ["direct", "sliced", "ring", "tree", "shm"][: 5 if SHM_ROOM else 4]
)
def test_link_closed_mid_collective(algorithm: str) -> None:
    n, size = 3, 2_000_000

    async def body() -> None:
        async with make_cluster(n, timeouts=short_timeouts(operation=SHORT)) as nodes:
            arrays = [np.ones(size, np.float32) for _ in nodes]
            # Ranks 0 and 1 start; rank 2 has not called yet, so nothing can finish.
            tasks = [
                asyncio.ensure_future(node.allreduce(a, algorithm=algorithm))
                for node, a in zip(nodes[:2], arrays[:2], strict=True)
            ]
            for _ in range(5):
                await asyncio.sleep(0)
            nodes[2].session.mesh.links[0].close()
            nodes[2].session.mesh.links[1].close()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for rank, result in enumerate(results):
                assert isinstance(result, PeerLostError), (rank, result)
                assert 2 in result.ranks, result

    run(body())


def test_timeout_names_the_missing_rank() -> None:
    async def body() -> None:
        async with make_cluster(3) as nodes:
            results = await asyncio.gather(
                *(node.allreduce(np.ones(10, np.float32), timeout=0.5) for node in nodes[:2]),
                return_exceptions=True,
            )
            for result in results:
                assert isinstance(result, CollectiveTimeoutError), result
                assert 2 in result.missing

    run(body())


@pytest.mark.parametrize("algorithm", ["sliced", "ring", "direct", "tree"])
def test_on_chunk_covers_each_owned_slice_once_and_its_writes_reach_everyone(
    algorithm: str,
) -> None:
    """`on_chunk` (an elementwise owner hook) may run piece by piece: the pieces of all
    owners tile the buffer exactly once, each sees fully reduced values, and what it writes
    is what every rank ends with."""
    n, size = 3, 1_000_003
    calls: list[tuple[int, int, int]] = []

    async def body() -> list[np.ndarray]:
        async with make_cluster(n, chunk_bytes=256 * 1024) as nodes:

            def hook(rank: int) -> Any:
                def on_chunk(start: int, stop: int, reduced: np.ndarray) -> None:
                    calls.append((rank, start, stop))
                    assert reduced.shape == (stop - start,)
                    assert np.all(reduced == n)
                    reduced[:] = np.arange(start, stop) % 1000

                return on_chunk

            arrays = [np.ones(size, np.float32) for _ in nodes]
            await asyncio.gather(
                *(
                    node.allreduce(a, algorithm=algorithm, on_chunk=hook(node.rank))
                    for node, a in zip(nodes, arrays, strict=True)
                )
            )
            return arrays

    arrays = run(body())
    # `direct` reduces the whole buffer on every rank, so every rank runs the hook on all of
    # it (a replicated update); the others give each element one owner.
    tilings = (
        [[c for c in calls if c[0] == r] for r in range(n)] if algorithm == "direct" else [calls]
    )
    for tiling in tilings:
        pieces = sorted((start, stop) for _, start, stop in tiling)
        assert pieces[0][0] == 0 and pieces[-1][1] == size
        assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))
    if algorithm == "sliced":
        assert len(calls) > n  # really piece by piece (several chunks per slice)
    expected = (np.arange(size) % 1000).astype(np.float32)
    assert all(np.array_equal(a, expected) for a in arrays)


def test_on_slice_and_on_chunk_together_are_refused() -> None:
    async def body() -> None:
        async with make_cluster(1) as (node,):
            with pytest.raises(ValueError, match="not both"):
                await node.allreduce(
                    np.ones(4, np.float32), on_slice=lambda *a: None, on_chunk=lambda *a: None
                )

    run(body())


# -------------------------------------------------------------------- owned ranges
OWNER_LAYOUTS = {
    "one-host": None,
    "two-hosts": ["h0", "h0", "h1", "h1"],
    "every-rank-its-host": ["h0", "h1", "h2", "h3"],
}


@pytest.mark.parametrize("layout", sorted(OWNER_LAYOUTS))
@pytest.mark.parametrize("size", [3, 40_000, 1_000_003])
def test_owned_range_is_where_on_chunk_runs(layout: str, size: int) -> None:
    """A sharded optimizer keeps state for `owned_range`: it must be exactly the range the
    `on_chunk` calls of `auto`'s allreduce cover on each rank."""
    n = 4
    calls: dict[int, list[tuple[int, int]]] = {r: [] for r in range(n)}

    async def body() -> list[tuple[int, int]]:
        async with make_cluster(n) as nodes:
            if OWNER_LAYOUTS[layout] is not None:
                for node in nodes:
                    node.collectives.host_ids = list(OWNER_LAYOUTS[layout])
            owned = [node.collectives.owned_range(size, 4) for node in nodes]
            assert owned == [
                nodes[0].collectives.owned_range(size, 4, rank=r) for r in range(n)
            ]  # any rank can say what another owns

            def hook(rank: int) -> Any:
                return lambda start, stop, reduced: calls[rank].append((start, stop))

            arrays = [np.ones(size, np.float32) for _ in nodes]
            await asyncio.gather(
                *(
                    node.allreduce(a, on_chunk=hook(node.rank))
                    for node, a in zip(nodes, arrays, strict=True)
                )
            )
            return owned

    owned = run(body())
    for rank in range(n):
        pieces = sorted(calls[rank])
        start, stop = owned[rank]
        if stop == start:
            assert not pieces or all(a == b for a, b in pieces), (rank, pieces)
            continue
        assert pieces[0][0] == start and pieces[-1][1] == stop, (rank, pieces, owned[rank])
        assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))


# ----------------------------------------------------------------------- deadlines
def test_timeout_zero_means_zero_and_none_means_the_default() -> None:
    async def body() -> None:
        async with make_cluster(2, timeouts=short_timeouts(operation=30.0)) as nodes:
            loop = asyncio.get_running_loop()
            start = loop.time()
            results = await asyncio.gather(
                *(node.allreduce(np.ones(1000, np.float32), timeout=0) for node in nodes),
                return_exceptions=True,
            )
            assert loop.time() - start < 5.0  # not the 30 s default
            assert all(isinstance(r, CollectiveTimeoutError) for r in results), results
            assert not any(isinstance(r, TimeoutError) for r in results)  # its own type
            with pytest.raises(ValueError, match="timeout"):
                await nodes[0].allreduce(np.ones(4, np.float32), timeout=-1)
            # The ranks stay usable: the next call (default deadline) works everywhere.
            arrays = [np.ones(10, np.float32) for _ in nodes]
            await allreduce_all(nodes, arrays)
            assert all(np.all(a == 2) for a in arrays)

    run(body())


def test_one_deadline_covers_the_shared_memory_probe_and_the_call() -> None:
    """A rank that never calls: the caller's probe and its call share one deadline, so the
    error comes after `timeout`, not after a timeout per stage."""

    async def body() -> None:
        async with make_cluster(2) as nodes:
            for node in nodes:
                node.collectives.shm.usable = None  # the next large auto call probes first
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(CollectiveTimeoutError) as caught:
                await nodes[0].allreduce(np.ones(1 << 20, np.float32), timeout=1.0)
            assert loop.time() - start < 1.9
            assert caught.value.missing == (1,)

    run(body())


def test_bad_arguments_leave_the_local_buffers_untouched() -> None:
    async def body() -> None:
        async with make_cluster(1) as (node,):
            first, second = np.ones(8, np.float32), np.full(8, 2.0, np.float32)
            for kwargs in (
                {"op": "max", "premul": 2.0},
                {"algorithm": "tree", "compression": "bf16"},
                {"compression": "zip"},
                {"timeout": -3},
            ):
                with pytest.raises(ValueError):
                    await node.allreduce([first, second], **kwargs)
                assert np.all(first == 1.0) and np.all(second == 2.0), kwargs

    run(body())


# -------------------------------------------------------------------- point to point
def test_send_recv_in_order_any_dtype_and_mismatches_fail() -> None:
    async def body() -> None:
        async with make_cluster(3, chunk_bytes=64 * 1024) as nodes:
            c0, c1, c2 = (node.collectives for node in nodes)
            small, got = np.arange(10, dtype=np.int64), np.zeros(10, np.int64)
            big, landed = np.arange(1_000_003, dtype=np.float32), np.zeros(1_000_003, np.float32)
            second, got2 = np.full(3, 7, np.uint8), np.zeros(3, np.uint8)
            # Two messages 0→2 are received in the order sent; 1→0 crosses them.
            await asyncio.gather(
                c0.send(small, 2, tag=3),
                c0.send(second, 2, tag=4),
                c2.recv(got, 0, tag=3),
                c2.recv(got2, 0, tag=4),
                c1.send(big, 0),
                c0.recv(landed, 1),
            )
            assert np.array_equal(got, small) and np.array_equal(got2, second)
            assert np.array_equal(landed, big)
            results = await asyncio.gather(
                c0.send(small, 2, tag=3), c2.recv(got, 0, tag=5), return_exceptions=True
            )
            assert isinstance(results[1], CollectiveMismatchError), results
            with pytest.raises(ValueError, match="this rank"):
                await c0.send(small, 0)
            with pytest.raises(ValueError, match=r"rank in 0\.\.2"):
                await c0.recv(got, 3)
            # The pair is still in step: the next message goes through.
            await asyncio.gather(c0.send(small, 2), c2.recv(got, 0))
            assert np.array_equal(got, small)

    run(body())


def test_recv_any_takes_whichever_rank_sends_first_and_keeps_each_ranks_order() -> None:
    async def body() -> None:
        async with make_cluster(3, chunk_bytes=64 * 1024) as nodes:
            c0, c1, c2 = (node.collectives for node in nodes)
            one, two = np.full(5, 1.0, np.float32), np.full(5, 2.0, np.float32)
            got = np.zeros(5, np.float32)
            # Only rank 2 sends: the receive from any rank takes its message.
            src, _ = await asyncio.gather(c0.recv_any(got), c2.send(two, 0))
            assert src == 2 and np.all(got == 2.0)
            # Rank 1's message is already here (kept early) before the receive is posted.
            await c1.send(one, 0)
            assert await c0.recv_any(got) == 1 and np.all(got == 1.0)
            # A large message (read paused, not kept early) is found too, and each rank's
            # messages still come in its order: 2's first, then 2's second.
            big = np.arange(300_000, dtype=np.float32)
            landed = np.zeros_like(big)
            sends = asyncio.gather(c2.send(big, 0), c2.send(big + 1, 0))
            assert await c0.recv_any(landed) == 2 and np.array_equal(landed, big)
            assert await c0.recv_any(landed) == 2 and np.array_equal(landed, big + 1)
            await sends
            # Another tag at the head of a rank's messages keeps that rank out: rank 1's
            # tag-7 message waits for a receive with tag 7, rank 2's tag 0 is taken.
            await c1.send(one, 0, tag=7)
            src, _ = await asyncio.gather(c0.recv_any(got), c2.send(two, 0))
            assert src == 2 and np.all(got == 2.0)
            assert await c0.recv_any(got, tag=7) == 1 and np.all(got == 1.0)
            # Nobody sends: the deadline names the ranks it waited for.
            with pytest.raises(CollectiveTimeoutError) as info:
                await c0.recv_any(got, timeout=0.2)
            assert set(info.value.missing) == {1, 2}

    run(body())

"""The int8-ef sharded step: bit-identical weights everywhere, convergence like uncompressed,
an exact accounting tail, and mismatches with uncompressed calls caught."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_cluster, on_all, on_all_settled, run

from p2pdl.collectives.sharded import OptimizerConfig, ShardedUpdate, sharded_step
from p2pdl.errors import CollectiveMismatchError

SGD = OptimizerConfig(kind="sgd", lr=0.1, momentum=0.9)


async def _steps(nodes, weights, grads_of, steps, compression, tail=0):
    """`steps` sharded steps on every node; grads_of(rank, step, weights) -> gradient."""
    updates = [ShardedUpdate(SGD, w[: w.size - tail]) for w in weights]

    async def one(node, step):
        r = node.rank
        g = grads_of(r, step, weights[r])
        await sharded_step(
            node.collectives, [g], weights[r], updates[r], lr=0.1, steps_done=step, op="mean",
            compression=compression,
        )  # fmt: skip

    for step in range(steps):
        await on_all(nodes, lambda node, step=step: one(node, step))
    return updates


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_weights_stay_bit_identical_and_track_the_uncompressed_step(n: int) -> None:
    size = 10_007
    rng = np.random.default_rng(n)
    start = rng.standard_normal(size).astype(np.float32)
    noise = [rng.standard_normal((5, size)).astype(np.float32) for _ in range(n)]

    def grads_of(rank, step, _w):
        return noise[rank][step].copy()

    async def body():
        async with make_cluster(n) as nodes:
            plain = [start.copy() for _ in nodes]
            await _steps(nodes, plain, grads_of, 5, None)
            packed = [start.copy() for _ in nodes]
            updates = await _steps(nodes, packed, grads_of, 5, "int8-ef")
        for w in packed[1:]:
            assert np.array_equal(w, packed[0])  # the same bits on every rank
        # Off by at most a few quantisation steps of the last deltas, not drifting away.
        assert np.abs(packed[0] - plain[0]).max() < 0.05 * np.abs(plain[0] - start).max()
        if n > 1:
            assert all(u.feedback is not None and u.feedback.master is not None for u in updates)

    run(body())


def test_error_feedback_converges_where_uncompressed_does() -> None:
    """A least-squares problem split over 3 ranks: int8-ef reaches the same optimum."""
    n, size = 3, 4096
    rng = np.random.default_rng(7)
    targets = [rng.standard_normal(size).astype(np.float32) for _ in range(n)]
    optimum = np.mean(targets, axis=0)

    def grads_of(rank, _step, w):
        return (w[:size] - targets[rank]).astype(np.float32)

    async def body():
        async with make_cluster(n) as nodes:
            plain = [np.zeros(size, np.float32) for _ in nodes]
            await _steps(nodes, plain, grads_of, 150, None)
            packed = [np.zeros(size, np.float32) for _ in nodes]
            await _steps(nodes, packed, grads_of, 150, "int8-ef")
        err_plain = np.abs(plain[0] - optimum).max()
        err_packed = np.abs(packed[0] - optimum).max()
        assert err_plain < 1e-3
        assert err_packed < 5e-3

    run(body())


def test_the_accounting_tail_is_summed_exactly() -> None:
    n, size = 3, 2000

    def grads_of(rank, step, _w):
        g = np.zeros(size + 2, np.float32)
        g[:size] = 0.5
        g[size:] = [1000.0 + rank, 7.0]  # counts: must not be quantised
        return g

    async def body():
        async with make_cluster(n) as nodes:
            weights = [np.zeros(size + 2, np.float32) for _ in nodes]
            await _steps(nodes, weights, grads_of, 1, "int8-ef", tail=2)
        for w in weights:
            assert list(w[size:]) == [3000.0 + 0 + 1 + 2, 21.0]

    run(body())


def test_a_rank_stepping_uncompressed_meets_a_mismatch_not_a_wrong_sum() -> None:
    n, size = 2, 300_000

    async def body():
        async with make_cluster(n) as nodes:
            weights = [np.zeros(size, np.float32) for _ in nodes]
            updates = [ShardedUpdate(SGD, w) for w in weights]

            async def one(node):
                r = node.rank
                await sharded_step(
                    node.collectives, [np.ones(size, np.float32)], weights[r], updates[r],
                    lr=0.1, steps_done=0, algorithm="sliced",
                    compression="int8-ef" if r == 0 else None,
                )  # fmt: skip

            results = await on_all_settled(nodes, one)
        assert all(isinstance(r, CollectiveMismatchError) for r in results), results

    run(body())


def test_unknown_compressions_and_dtypes_are_refused() -> None:
    async def body():
        async with make_cluster(1) as nodes:
            w = np.zeros(8, np.float32)
            update = ShardedUpdate(SGD, w)
            with pytest.raises(ValueError, match="compresses with 'int8-ef'"):
                await sharded_step(nodes[0].collectives, [w.copy()], w, update, lr=0.1,
                                   steps_done=0, compression="int4")  # fmt: skip
            w64 = np.zeros(8, np.float64)
            with pytest.raises(TypeError, match="float32"):
                await sharded_step(nodes[0].collectives, [w64.copy()], w64,
                                   ShardedUpdate(SGD, w64), lr=0.1, steps_done=0,
                                   compression="int8-ef")  # fmt: skip

    run(body())

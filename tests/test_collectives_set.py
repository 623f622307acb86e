# ruff: noqa: B023  (every lambda here runs at once, inside the loop iteration that made it)
"""The whole collective set between in-process nodes: every dtype and op against NumPy
(tests/naive.py), uneven and empty parts, one-rank groups, and mismatches seen on every rank.

One cluster per world size runs every case of a test, so the many small calls cost
milliseconds each and the clusters' start-up is paid a few times only.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import naive
import numpy as np
import pytest
from helpers import make_cluster, on_all, on_all_settled, run, short_timeouts

from p2pdl.collectives.alltoall import pair_labels, plan_alltoall
from p2pdl.collectives.api import Collectives
from p2pdl.collectives.dtypes import bf16_words
from p2pdl.collectives.groups import GroupKey, GroupTags
from p2pdl.collectives.op import SUB_BITS
from p2pdl.collectives.p2p import p2p_base
from p2pdl.errors import CollectiveMismatchError, CollectiveTimeoutError, PeerLostError

torch = pytest.importorskip("torch")

NUMPY_KINDS = ("float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")
KINDS = (*NUMPY_KINDS, "bfloat16")
FLOATS = ("float16", "bfloat16", "float32", "float64")
OPS = ("sum", "mean", "min", "max", "prod")
SHORT = 20.0


def values(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random values of `kind` (bf16 as uint16 words), moderate so products stay finite."""
    if kind == "bool":
        return rng.random(size) < 0.5
    if kind == "bfloat16":
        return naive.encode_bf16(rng.uniform(0.5, 1.5, size).astype(np.float32))
    if kind in FLOATS:
        return (rng.uniform(0.5, 1.5, size) * rng.choice([-1.0, 1.0], size)).astype(kind)
    info = np.iinfo(kind)
    return rng.integers(max(info.min, -50), min(info.max, 50), size, endpoint=True).astype(kind)


def expected(per_rank: list[np.ndarray], kind: str, op: str, premul: float | None) -> np.ndarray:
    """The reduction as the contract defines it: inputs scaled by `premul`, reduced left to
    right in rank order, the mean's 1/n applied once at the end."""
    n = len(per_rank)
    if kind == "bfloat16":
        srcs = [naive.scale_bf16(x, premul) for x in per_rank] if premul else per_rank
        out = naive.reduce_into_bf16(srcs, "sum" if op == "mean" else op)
        return naive.scale_bf16(out, 1.0 / n) if op == "mean" else out
    srcs = [naive.scale(x, premul) for x in per_rank] if premul else per_rank
    out = naive.reduce_into(srcs, "sum" if op == "mean" else op)
    return naive.scale(out, 1.0 / n) if op == "mean" else out


def wrap(array: np.ndarray, kind: str, as_tensor: bool) -> Any:
    """What the caller passes: a numpy array, bf16 words, or a CPU tensor of the same memory."""
    if kind == "bfloat16":
        return torch.from_numpy(array).view(torch.bfloat16) if as_tensor else bf16_words(array)
    return torch.from_numpy(array) if as_tensor else array


def cases() -> list[tuple[str, str, float | None]]:
    out = []
    for kind in KINDS:
        for op in OPS:
            if op == "mean" and kind not in FLOATS:
                continue
            out.append((kind, op, None))
        if kind in FLOATS:
            out.append((kind, "sum", 0.25))
    return out


async def on_each(cs: list[Any], fn: Callable[[int, Any], Awaitable[Any]]) -> list[Any]:
    return list(await asyncio.gather(*(fn(r, c) for r, c in enumerate(cs))))


def same_bits(results: list[np.ndarray], what: str) -> None:
    for rank, result in enumerate(results[1:], start=1):
        assert result.tobytes() == results[0].tobytes(), f"{what}: rank {rank} differs"


# --------------------------------------------------------------------------- reductions
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_reductions_match_numpy_for_every_dtype_and_op(n: int) -> None:
    """allreduce (direct, sliced), reduce, reduce_scatter_into/list and the coalesced form,
    for every dtype x op (+ premul), numpy and torch callers alternating."""
    rng = np.random.default_rng(n)

    async def body() -> None:
        async with make_cluster(n, chunk_bytes=64) as nodes:
            cs = [node.collectives for node in nodes]
            for index, (kind, op, premul) in enumerate(cases()):
                tensor = index % 2 == 1
                what = f"{kind} {op} premul={premul} n={n}"
                extra = {} if premul is None else {"premul": premul}
                for algorithm, size in (("direct", 7), ("sliced", 37)):
                    inputs = [values(kind, size, rng) for _ in range(n)]
                    want = expected(inputs, kind, op, premul)
                    bufs = [x.copy() for x in inputs]
                    await on_each(
                        cs,
                        lambda r, c, a=algorithm: c.allreduce(
                            wrap(bufs[r], kind, tensor), op=op, algorithm=a, **extra
                        ),
                    )
                    for r in range(n):
                        assert bufs[r].tobytes() == want.tobytes(), (what, algorithm, r)
                # reduce to the last rank: the others' buffers stay as they were
                root = n - 1
                inputs = [values(kind, 9, rng) for _ in range(n)]
                bufs = [x.copy() for x in inputs]
                await on_each(
                    cs,
                    lambda r, c: c.reduce(wrap(bufs[r], kind, tensor), root=root, op=op, **extra),
                )
                want = expected(inputs, kind, op, premul)
                assert bufs[root].tobytes() == want.tobytes(), what
                for r in range(n - 1):
                    assert bufs[r].tobytes() == inputs[r].tobytes(), (what, r)
                # reduce_scatter_into: 3 elements per rank
                m = 3
                inputs = [values(kind, n * m, rng) for _ in range(n)]
                outs = [np.zeros(m, inputs[0].dtype) for _ in range(n)]
                keep = [x.copy() for x in inputs]
                await on_each(
                    cs,
                    lambda r, c: c.reduce_scatter_into(
                        wrap(outs[r], kind, tensor), wrap(inputs[r], kind, tensor), op=op, **extra
                    ),
                )
                for r in range(n):
                    part = [x[r * m : (r + 1) * m] for x in keep]
                    assert outs[r].tobytes() == expected(part, kind, op, premul).tobytes(), what
                    assert inputs[r].tobytes() == keep[r].tobytes(), (what, "input changed")
                # reduce_scatter_list: rank i's part has i elements (rank 0's is empty)
                parts = [[values(kind, i, rng) for i in range(n)] for _ in range(n)]
                outs = [np.zeros(r, parts[0][0].dtype) for r in range(n)]
                await on_each(
                    cs,
                    lambda r, c: c.reduce_scatter_list(
                        wrap(outs[r], kind, tensor),
                        [wrap(p, kind, tensor) for p in parts[r]],
                        op=op,
                        **extra,
                    ),
                )
                for r in range(n):
                    want = expected([parts[s][r] for s in range(n)], kind, op, premul)
                    assert outs[r].tobytes() == want.tobytes(), what
                # allreduce_coalesced: sizes 2, 0, 5 in one call
                groups = [[values(kind, s, rng) for s in (2, 0, 5)] for _ in range(n)]
                bufs = [[x.copy() for x in g] for g in groups]
                await on_each(
                    cs,
                    lambda r, c: c.allreduce_coalesced(
                        [wrap(x, kind, tensor) for x in bufs[r]], op=op, **extra
                    ),
                )
                for i in range(3):
                    want = expected([g[i] for g in groups], kind, op, premul)
                    for r in range(n):
                        assert bufs[r][i].tobytes() == want.tobytes(), (what, "coalesced", i)

    run(body())


PATHS = ("ring", "tree", "driver", "sliced", "hierarchical", "shm")


@pytest.mark.parametrize("n", [2, 3])
def test_every_allreduce_path_gives_the_same_bits_on_every_rank(n: int) -> None:
    """min/max/prod and 16-bit floats through every path (the hierarchy with ranks 0 and 1
    on one host): every rank ends with the same bits; exact ops also equal NumPy's."""
    rng = np.random.default_rng(10 + n)

    async def body() -> None:
        async with make_cluster(n, chunk_bytes=256) as nodes:
            cs = [node.collectives for node in nodes]
            for algorithm in PATHS:
                for c in cs:  # shm needs every rank on one host
                    c.host_ids = ["a"] * n if algorithm == "shm" else ["a", "a", "b"][:n]
                for kind in ("float16", "bfloat16", "float64", "int32", "bool"):
                    for op in ("prod", "min", "max", "sum"):
                        inputs = [values(kind, 301, rng) for _ in range(n)]
                        bufs = [x.copy() for x in inputs]
                        await on_each(
                            cs,
                            lambda r, c, a=algorithm: c.allreduce(
                                wrap(bufs[r], kind, True), op=op, algorithm=a
                            ),
                        )
                        what = f"{algorithm} {kind} {op}"
                        same_bits(bufs, what)
                        if kind in ("int32", "bool") or op in ("min", "max"):
                            assert bufs[0].tobytes() == expected(inputs, kind, op, None).tobytes()

    run(body())


# ------------------------------------------------------------------------ data movement
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_data_movement_for_every_dtype(n: int) -> None:
    """broadcast, allgather_into/list, gather, scatter, alltoall (equal, uneven, empty
    parts), alltoall_list and allgather_into_coalesced."""
    rng = np.random.default_rng(100 + n)

    async def body() -> None:
        async with make_cluster(n, chunk_bytes=64) as nodes:
            cs = [node.collectives for node in nodes]
            for index, kind in enumerate(KINDS):
                tensor = index % 2 == 0
                w = lambda a, t=tensor: wrap(a, kind, t)  # noqa: E731
                root = index % n
                # broadcast
                bufs = [values(kind, 11, rng) for _ in range(n)]
                sent = bufs[root].copy()
                await on_each(cs, lambda r, c: c.broadcast(w(bufs[r]), root=root))
                assert all(b.tobytes() == sent.tobytes() for b in bufs), kind
                # allgather_into, 4 elements each
                ins = [values(kind, 4, rng) for _ in range(n)]
                outs = [np.zeros(4 * n, ins[0].dtype) for _ in range(n)]
                await on_each(cs, lambda r, c: c.allgather_into(w(outs[r]), w(ins[r])))
                whole = np.concatenate(ins)
                assert all(o.tobytes() == whole.tobytes() for o in outs), kind
                # allgather_into in place: the input is this rank's part of the output
                outs = [np.zeros_like(whole) for _ in range(n)]
                for r in range(n):
                    outs[r][4 * r : 4 * r + 4] = ins[r]
                await on_each(
                    cs, lambda r, c: c.allgather_into(w(outs[r]), w(outs[r][4 * r : 4 * r + 4]))
                )
                assert all(o.tobytes() == whole.tobytes() for o in outs), kind
                # allgather_list, rank i sends 2 * i elements
                ins = [values(kind, 2 * r, rng) for r in range(n)]
                outs = [[np.zeros(2 * i, ins[0].dtype) for i in range(n)] for _ in range(n)]
                await on_each(cs, lambda r, c: c.allgather_list([w(o) for o in outs[r]], w(ins[r])))
                for r in range(n):
                    assert all(outs[r][i].tobytes() == ins[i].tobytes() for i in range(n)), kind
                # gather and scatter, uneven, to and from `root`
                ins = [values(kind, r + 1, rng) for r in range(n)]
                got = [np.zeros(i + 1, ins[0].dtype) for i in range(n)]
                await on_each(
                    cs,
                    lambda r, c: c.gather(
                        w(ins[r]), [w(g) for g in got] if r == root else None, root=root
                    ),
                )
                assert all(got[i].tobytes() == ins[i].tobytes() for i in range(n)), kind
                outs = [np.zeros(r + 1, ins[0].dtype) for r in range(n)]
                await on_each(
                    cs,
                    lambda r, c: c.scatter(
                        w(outs[r]), [w(x) for x in ins] if r == root else None, root=root
                    ),
                )
                assert all(outs[i].tobytes() == ins[i].tobytes() for i in range(n)), kind
                # alltoall: equal parts, then uneven ones with empty parts
                ins = [values(kind, 3 * n, rng) for _ in range(n)]
                outs = [np.zeros(3 * n, ins[0].dtype) for _ in range(n)]
                await on_each(cs, lambda r, c: c.alltoall(w(outs[r]), w(ins[r])))
                for r in range(n):
                    want = np.concatenate([ins[s][3 * r : 3 * r + 3] for s in range(n)])
                    assert outs[r].tobytes() == want.tobytes(), kind
                splits = [[(r + 2 * j) % 3 for j in range(n)] for r in range(n)]
                ins = [values(kind, sum(s), rng) for s in splits]
                recv = [[splits[s][r] for s in range(n)] for r in range(n)]
                outs = [np.zeros(sum(s), ins[0].dtype) for s in recv]
                await on_each(
                    cs,
                    lambda r, c: c.alltoall(
                        w(outs[r]), w(ins[r]), output_splits=recv[r], input_splits=splits[r]
                    ),
                )
                for r in range(n):
                    pieces = []
                    for s in range(n):
                        start = sum(splits[s][:r])
                        pieces.append(ins[s][start : start + splits[s][r]])
                    assert outs[r].tobytes() == np.concatenate(pieces).tobytes(), kind
                # alltoall_list: rank s sends s + j elements to rank j
                ins = [[values(kind, s + j, rng) for j in range(n)] for s in range(n)]
                outs = [[np.zeros(s + r, ins[0][0].dtype) for s in range(n)] for r in range(n)]
                await on_each(
                    cs,
                    lambda r, c: c.alltoall_list([w(o) for o in outs[r]], [w(x) for x in ins[r]]),
                )
                for r in range(n):
                    assert all(outs[r][s].tobytes() == ins[s][r].tobytes() for s in range(n))
            # allgather_into_coalesced with mixed element types
            ins = [[values("int16", 3, rng), values("float64", 0, rng), values("bool", 5, rng)]
                   for _ in range(n)]  # fmt: skip
            outs = [[np.zeros(n * x.size, x.dtype) for x in ins[0]] for _ in range(n)]
            await on_each(cs, lambda r, c: c.allgather_into_coalesced(outs[r], ins[r]))
            for r in range(n):
                for i in range(3):
                    want = np.concatenate([ins[s][i] for s in range(n)])
                    assert outs[r][i].tobytes() == want.tobytes(), i

    run(body())


def test_plans_are_pure_and_pairs_agree() -> None:
    plan = plan_alltoall([1, 0, 3], [2, 2, 0])
    assert plan.send == ((0, 1), (1, 1), (1, 4)) and plan.recv == ((0, 2), (2, 4), (4, 4))
    # Rank 0 sends 5 to rank 1 and receives 7 from it: rank 1 must see the same pair.
    assert pair_labels("a", 0, [0, 5], [0, 7])[1] == pair_labels("a", 1, [7, 0], [5, 0])[0]
    assert pair_labels("a", 0, [0, 5], [0, 7])[1] != pair_labels("a", 1, [6, 0], [5, 0])[0]


# ------------------------------------------------------------------------------- misuse
def test_bad_calls_raise_before_anything_is_sent() -> None:
    async def body() -> None:
        async with make_cluster(2) as nodes:
            c = nodes[0].collectives
            f32 = np.ones(4, np.float32)
            bad: list[tuple[Callable[[], Awaitable[Any]], type[Exception]]] = [
                (lambda: c.allreduce(np.ones(4, np.uint32)), TypeError),
                (lambda: c.reduce(np.ones(4, np.int8), op="avg"), TypeError),
                (lambda: c.reduce(f32, root=2), ValueError),
                (lambda: c.reduce_scatter_into(np.ones(3, np.float32), f32), ValueError),
                (lambda: c.reduce_scatter_into(np.ones(2), f32), TypeError),
                (lambda: c.reduce_scatter_list(f32, [f32]), ValueError),
                (lambda: c.reduce_scatter_list(np.ones(3, np.float32), [f32, f32]), ValueError),
                (lambda: c.allgather_into(np.ones(7, np.float32), f32), ValueError),
                (lambda: c.allgather_into(f32, f32[2:]), ValueError),  # overlaps, not own part
                (lambda: c.allgather_list([f32, f32.astype(np.int32)], f32), TypeError),
                (lambda: c.allgather_list([np.ones(3, np.float32), f32], f32), ValueError),
                (lambda: c.gather(f32, None, root=0), ValueError),
                (lambda: c.gather(f32, [f32, f32], root=1), ValueError),
                (lambda: c.scatter(f32, None, root=0), ValueError),
                (lambda: c.alltoall(np.ones(3, np.float32), np.ones(3, np.float32)), ValueError),
                (lambda: c.alltoall(f32, f32.copy(), input_splits=[1, 2]), ValueError),
                (lambda: c.alltoall(f32, f32), ValueError),
                (lambda: c.alltoall_list([f32], [f32]), ValueError),
                (lambda: c.allreduce_coalesced([f32, np.ones(2)]), TypeError),
                (lambda: c.allreduce(torch.ones(3, dtype=torch.int64), premul=0.5), TypeError),
                (lambda: c.allreduce(f32, premul=True), TypeError),
                (lambda: c.send(f32, 1, tag=-1), ValueError),
            ]
            for index, (call, error) in enumerate(bad):
                counter = nodes[0].session.mesh._op_counter
                with pytest.raises(error):
                    await call()
                assert nodes[0].session.mesh._op_counter == counter, index
            # still aligned with rank 1
            bufs = [np.full(3, 2.0 + r) for r in range(2)]
            await on_all(nodes, lambda node: node.allreduce(bufs[node.rank], op="prod"))
            assert np.all(bufs[0] == 6.0) and np.all(bufs[1] == 6.0)

    run(body())


def _pairs(n: int) -> dict[str, Callable[[Collectives, int], Awaitable[Any]]]:
    """Calls that disagree across ranks: rank n-1 (or every rank) does something else."""
    odd = n - 1
    f = np.float32

    def ones(size: int, dtype: Any = f) -> np.ndarray:
        return np.ones(size, dtype)

    return {
        "reduce root": lambda c, r: c.reduce(ones(5), root=0 if r != odd else 1, timeout=SHORT),
        "reduce self-rooted": lambda c, r: c.reduce(ones(5), root=r, timeout=SHORT),
        "reduce op": lambda c, r: c.reduce(ones(5), op="max" if r == odd else "min"),
        "reduce dtype": lambda c, r: c.reduce(ones(5, np.float64 if r == odd else f)),
        "allreduce premul": lambda c, r: c.allreduce(ones(5), premul=2.0 if r == odd else None),
        "gather root": lambda c, r: c.gather(
            ones(2),
            [ones(2) for _ in range(n)] if r in (0, odd) else None,
            root=0 if r != odd else odd,
        ),
        "gather others-rooted": lambda c, r: c.gather(
            ones(2), None if n > 1 else [ones(2)], root=(r + 1) % n, timeout=SHORT
        ),
        "gather size": lambda c, r: c.gather(
            ones(3 if r == odd else 2), [ones(2) for _ in range(n)] if r == 0 else None
        ),
        "scatter others-rooted": lambda c, r: c.scatter(ones(2), None, root=(r + 1) % n),
        "scatter size": lambda c, r: c.scatter(
            ones(3 if r == odd else 2), [ones(2) for _ in range(n)] if r == 0 else None
        ),
        "allgather_into size": lambda c, r: c.allgather_into(
            ones(n * (3 if r == odd else 2)), ones(3 if r == odd else 2)
        ),
        "allgather_list sizes": lambda c, r: c.allgather_list(
            [ones(2 if (i == odd and r != odd) else 1) for i in range(n)], ones(1)
        ),
        "reduce_scatter_list sizes": lambda c, r: c.reduce_scatter_list(
            ones(1), [ones(1 + (r == odd and i != r)) for i in range(n)]
        ),
        "reduce_scatter_into op": lambda c, r: c.reduce_scatter_into(
            ones(2), ones(2 * n), op="prod" if r == odd else "sum"
        ),
        # rank `odd` sends rank 0 two elements where rank 0 expects one
        "alltoall splits": lambda c, r: c.alltoall(
            ones(n),
            ones(n + (r == odd)),
            input_splits=[1 + (r == odd and j == 0) for j in range(n)],
            output_splits=[1] * n,
        ),
        "allreduce_coalesced sizes": lambda c, r: c.allreduce_coalesced(
            [ones(2), ones(3)] if r != odd else [ones(3), ones(2)]
        ),
        "gather vs scatter": lambda c, r: (
            c.gather(ones(2), [ones(2) for _ in range(n)] if r == 0 else None)
            if r != odd
            else c.scatter(ones(2), None)
        ),
    }


@pytest.mark.parametrize("n", [2, 3])
def test_disagreeing_calls_fail_on_every_rank_and_the_ranks_stay_aligned(n: int) -> None:
    async def body() -> None:
        async with make_cluster(n, timeouts=short_timeouts(operation=SHORT)) as nodes:
            cs = [node.collectives for node in nodes]
            for what, call in _pairs(n).items():
                results = await asyncio.gather(
                    *(call(c, r) for r, c in enumerate(cs)), return_exceptions=True
                )
                for rank, result in enumerate(results):
                    assert isinstance(result, CollectiveMismatchError), (what, rank, result)
                bufs = [np.full(2, 1.0 + r) for r in range(n)]
                await on_each(cs, lambda r, c: c.allreduce(bufs[r], timeout=SHORT))
                assert all(np.all(b == n * (n + 1) / 2) for b in bufs), what

    run(body())


# ---------------------------------------------------------------------------- subgroups
def test_subgroups_run_beside_the_world_group_without_crossing() -> None:
    n = 4

    async def body() -> None:
        async with make_cluster(n, chunk_bytes=256) as nodes:
            cs = [node.collectives for node in nodes]
            a_ranks, b_ranks = [2, 0, 3], [3, 1]  # any order: subgroup rank = index
            a = {g: cs[g].subgroup(a_ranks) for g in a_ranks}
            b = {g: cs[g].subgroup(b_ranks) for g in b_ranks}
            again = {g: cs[g].subgroup(b_ranks) for g in b_ranks}  # a second group, same ranks
            outside = cs[1].subgroup(a_ranks)
            assert [a[g].rank for g in a_ranks] == [0, 1, 2] and a[0].world_size == 3
            with pytest.raises(ValueError, match="not a member"):
                await outside.allreduce(np.ones(3))
            size = 1000
            world = [np.full(size, 1.0 + g, np.float32) for g in range(n)]
            in_a = {g: np.full(size, 10.0 * (g + 1), np.float32) for g in a_ranks}
            in_b = {g: np.arange(size, dtype=np.int64) * (g + 1) for g in b_ranks}
            in_again = {g: np.full(5, g + 0.5) for g in b_ranks}
            msg, got = np.arange(7, dtype=np.int32), np.zeros(7, np.int32)
            msg_w, got_w = np.arange(7, dtype=np.int32) + 100, np.zeros(7, np.int32)
            gathered = [np.zeros(1, np.int16) for _ in a_ranks]
            calls = [
                *(cs[g].allreduce(world[g], algorithm="sliced") for g in range(n)),
                *(a[g].allreduce(in_a[g], algorithm="ring") for g in a_ranks),
                *(b[g].allreduce(in_b[g], op="max") for g in b_ranks),
                *(again[g].allreduce(in_again[g], op="min") for g in b_ranks),
                # 3 -> 1 in group b (subgroup ranks 0 -> 1) and in the world group
                b[3].send(msg, 1),
                b[1].recv(got, 0),
                cs[3].send(msg_w, 1),
                cs[1].recv(got_w, 3),
                *(
                    a[g].gather(
                        np.full(1, g, np.int16), gathered if a[g].rank == 2 else None, root=2
                    )
                    for g in a_ranks
                ),
            ]
            await asyncio.gather(*calls)
            assert all(np.all(w == sum(range(1, n + 1))) for w in world)
            assert all(np.all(in_a[g] == 10.0 * (3 + 1 + 4)) for g in a_ranks)
            assert all(np.array_equal(in_b[g], np.arange(size) * 4) for g in b_ranks)
            assert all(np.all(in_again[g] == 1.5) for g in b_ranks)
            assert np.array_equal(got, msg) and np.array_equal(got_w, msg_w)
            assert [int(x[0]) for x in gathered] == a_ranks
            # roots are subgroup ranks; a subgroup of a subgroup maps through both
            bufs = {g: np.full(2, float(g)) for g in a_ranks}
            await asyncio.gather(*(a[g].broadcast(bufs[g], root=2) for g in a_ranks))
            assert all(np.all(bufs[g] == 3.0) for g in a_ranks)
            inner = {g: a[g].subgroup([2, 0]) for g in (3, 2)}  # global ranks 3 and 2
            vals = {3: np.ones(1), 2: np.full(1, 5.0)}
            await asyncio.gather(*(inner[g].allreduce(vals[g], op="prod") for g in (3, 2)))
            assert vals[3][0] == vals[2][0] == 5.0
            assert inner[3].rank == 0 and inner[2].rank == 1

    run(body())


def test_subgroup_mismatch_and_one_rank_subgroup() -> None:
    async def body() -> None:
        async with make_cluster(3, timeouts=short_timeouts(operation=SHORT)) as nodes:
            cs = [node.collectives for node in nodes]
            solo = cs[1].subgroup([1])
            x = np.full(3, 4.0)
            await solo.allreduce(x, op="mean")
            await solo.barrier()
            assert np.all(x == 4.0) and solo.world_size == 1
            g = {r: cs[r].subgroup([0, 2]) for r in (0, 2)}
            results = await asyncio.gather(
                g[0].allreduce(np.ones(3)), g[2].allreduce(np.ones(4)), return_exceptions=True
            )
            assert all(isinstance(e, CollectiveMismatchError) for e in results), results
            bufs = {r: np.full(2, r + 1.0) for r in (0, 2)}
            await asyncio.gather(*(g[r].allreduce(bufs[r]) for r in (0, 2)))
            assert np.all(bufs[0] == 4.0) and np.all(bufs[2] == 4.0)

    run(body())


def test_blocking_subgroups_and_collectives() -> None:
    from concurrent.futures import ThreadPoolExecutor

    import p2pdl
    from p2pdl.launch import free_port

    n, port, secret = 2, free_port(), np.random.default_rng().bytes(16)

    def one(rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        common = {"secret": secret, "timeouts": short_timeouts(), "host": "127.0.0.1"}
        if rank == 0:
            node = p2pdl.connect(0, world_size=n, port=port, **common)
        else:
            node = p2pdl.connect(leader=("127.0.0.1", port), port=0, **common)
        with node:
            rank = node.rank
            out = np.zeros(2 * n, np.float32)
            node.allgather_into(out, np.full(2, rank, np.float32))
            group = node.subgroup([1, 0])
            mine = np.full(3, 1.0 + rank)
            group.reduce(mine, root=0, op="max")  # subgroup rank 0 is global rank 1
            red = torch.tensor([1.0 + rank], dtype=torch.bfloat16)
            group.allreduce(red, op="sum")
            return out, mine, red.float().numpy()

    with ThreadPoolExecutor(n) as pool:
        results = [f.result(120) for f in [pool.submit(one, r) for r in range(n)]]
    assert all(np.array_equal(r[0], [0, 0, 1, 1]) for r in results)
    assert np.all(results[1][1] == 2.0) and np.all(results[0][1] == 1.0)
    assert all(float(r[2][0]) == 3.0 for r in results)


def test_one_rank_world_and_empty_buffers() -> None:
    async def body() -> None:
        async with make_cluster(1) as (node,):
            c = node.collectives
            x = np.full(4, 3.0, np.float16)
            await c.allreduce(x, op="mean")
            await c.reduce(x, premul=2.0)
            assert np.all(x == 6.0)
            out = np.zeros(4, np.float16)
            await c.reduce_scatter_into(out, x, op="max")
            await c.alltoall(out, x.copy())
            await c.gather(x, [out])
            await c.scatter(out, [x])
            assert np.all(out == 6.0)
        async with make_cluster(3) as nodes:
            cs = [node.collectives for node in nodes]
            empty = np.zeros(0, np.int8)
            await on_each(cs, lambda r, c: c.reduce(empty.copy(), op="prod"))
            await on_each(cs, lambda r, c: c.allgather_into(np.zeros(0, np.int8), empty))
            await on_each(cs, lambda r, c: c.alltoall(np.zeros(0, np.int8), empty.copy()))
            await on_each(cs, lambda r, c: c.reduce_scatter_into(np.zeros(0, np.int8), empty))
            results = await on_all_settled(
                nodes,
                lambda node: node.allgather_into(
                    np.zeros(3 * node.rank, np.int8), np.zeros(node.rank, np.int8), timeout=SHORT
                ),
            )
            assert all(isinstance(r, CollectiveMismatchError) for r in results), results

    run(body())


# ------------------------------------------------------------------- failures and tags
def test_a_missing_or_lost_rank_is_named() -> None:
    async def body() -> None:
        async with make_cluster(3, timeouts=short_timeouts(operation=SHORT)) as nodes:
            cs = [node.collectives for node in nodes]
            # rank 2 never calls: the root names it when the call's deadline passes
            results = await asyncio.gather(
                cs[0].reduce(np.ones(4), root=0, timeout=2.0),
                cs[1].reduce(np.ones(4), root=0, timeout=2.0),
                return_exceptions=True,
            )
            assert isinstance(results[0], CollectiveTimeoutError), results
            assert results[0].missing == (2,)
            assert isinstance(results[1], CollectiveTimeoutError), results  # waits for 0
            # rank 2 leaves before its part of a gather: the root names it
            await nodes[2].close()
            got = [np.zeros(2) for _ in range(3)]
            results = await asyncio.gather(
                cs[0].gather(np.ones(2), got, root=0),
                cs[1].gather(np.ones(2), root=0),
                return_exceptions=True,
            )
            assert isinstance(results[0], PeerLostError) and 2 in results[0].ranks, results

    run(body())


def test_group_tags_never_meet_the_world_tags_or_each_other() -> None:
    world_ops = [(k << SUB_BITS, (k + 1) << SUB_BITS) for k in (1, 2, (1 << 38) - 1)]
    world_p2p = [(p2p_base(0, 1, s), p2p_base(0, 1, s) + (1 << SUB_BITS)) for s in (0, 9)]
    ranges = {"world": world_ops + world_p2p}
    for gid in (0, 1, (1 << 20) - 1):
        tags = GroupTags(gid)
        ops = [tags.next_op_id() << SUB_BITS for _ in range(3)]
        msgs = [tags.p2p_base(s, d, q) for s, d, q in ((0, 1, 0), (1, 0, 0), (0, 1, 5))]
        ranges[f"group {gid}"] = [(b, b + (1 << SUB_BITS)) for b in ops + msgs]
    spans = sorted((lo, hi, name) for name, rs in ranges.items() for lo, hi in rs)
    for (_lo, hi, name), (lo2, _hi2, name2) in itertools.pairwise(spans):
        assert hi <= lo2, (name, name2)
    assert all(hi <= 1 << 64 for _lo, hi, _n in spans)
    assert GroupKey((0, 2), 0).gid != GroupKey((0, 2), 1).gid

"""A sharded step that starts before backward ends: readiness bookkeeping, the same bits as
the step after backward, and a backward that raises failing the step on every rank."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from p2pdl.collectives.readiness import GradientReadiness, tensors_overlapping
from p2pdl.errors import P2PDLError
from p2pdl.torch import ShardedOptimizer, TorchTask, train

sys.path.insert(0, str(Path(__file__).parent))
from test_torch import _threads


@given(st.lists(st.integers(0, 5), min_size=1, max_size=8), st.integers(0, 30), st.integers(0, 30))
def test_overlapping_tensors_are_exactly_those_meeting_the_range(
    sizes: list[int], a: int, b: int
) -> None:
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    ends = [o + n for o, n in zip(offsets, sizes, strict=True)]
    got = list(tensors_overlapping(offsets, ends, a, b))
    expect = [i for i in range(len(sizes)) if a < b and offsets[i] < b and ends[i] > a]
    assert got == expect


def test_waits_end_when_their_tensors_are_written_or_backward_fails() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        ready = GradientReadiness([0, 10, 20], [10, 10, 10], loop)
        tail = asyncio.ensure_future(ready.wait(15, 30))
        head = asyncio.ensure_future(ready.wait(0, 5))
        await asyncio.sleep(0)
        ready.mark(2)
        await asyncio.sleep(0)
        assert not tail.done()
        ready.mark_threadsafe(1)
        await tail
        assert not head.done()
        ready.fail(P2PDLError("backward failed"))
        with pytest.raises(P2PDLError, match="backward failed"):
            await head
        with pytest.raises(P2PDLError, match="backward failed"):
            await ready.wait(0, 1)

    asyncio.run(body())


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.Tanh(), torch.nn.Linear(300, 10))


_rng = np.random.default_rng(0)
_X = torch.from_numpy(_rng.standard_normal((256, 64)).astype(np.float32))
_Y = torch.from_numpy(_rng.integers(0, 10, 256))


def _task(loss_fn: Any = torch.nn.functional.cross_entropy) -> TorchTask:
    return TorchTask(
        model_fn=_model,
        loss_fn=loss_fn,
        dataset=(_X, _Y),
        optimizer={"kind": "adam", "lr": 1e-2},
        compression="int8-ef",
        global_batch=32,
    )


def _train(steps: int) -> Any:
    def fn(node: Any) -> np.ndarray:
        job = _task()
        train(job, node, steps=steps, global_batch=32)
        job.close()
        return job.flats[0].weights_np.copy()

    return fn


def test_the_overlapped_step_gives_the_same_bits_as_the_step_after_backward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    overlapped = _threads(2, _train(4))
    assert np.array_equal(overlapped[0], overlapped[1])
    monkeypatch.setattr(ShardedOptimizer, "overlaps", property(lambda self: False))
    after = _threads(2, _train(4))
    assert np.array_equal(after[0], overlapped[0])


def test_a_backward_that_raises_fails_the_step_on_every_rank() -> None:
    def fn(node: Any) -> str:
        calls = {"n": 0}

        def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            if node.rank == 1 and calls["n"] == 2:
                raise RuntimeError("a bad batch")
            return torch.nn.functional.cross_entropy(out, target)

        job = _task(loss)
        try:
            train(job, node, steps=3, global_batch=32)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            job.close()
        return "finished"

    rank0, rank1 = _threads(2, fn)
    assert "a bad batch" in rank1
    assert rank0 != "finished" and "rank 1" in rank0, rank0

"""Which ranges of a gradient buffer backward has finished, for collectives that start early.

Backward fills a flat gradient buffer tensor by tensor, last layer first. A collective that
starts before backward ends (so the first slices travel while later layers still compute)
waits on `GradientReadiness.wait(a, b)` before it reads elements `a:b`; the integration marks
each tensor's range done from autograd's hooks, on whatever thread runs backward
(`mark_threadsafe`). `fail` ends every wait with the given error (backward raised), so the
collective fails — on every rank, through its operation — instead of sending half a gradient.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Sequence


def tensors_overlapping(offsets: Sequence[int], ends: Sequence[int], a: int, b: int) -> range:
    """Indices of the tensors (sorted, disjoint `offsets[i]:ends[i]`) that meet `a:b`. Pure."""
    if a >= b:
        return range(0)
    first = bisect.bisect_right(ends, a)
    last = bisect.bisect_left(offsets, b)
    return range(first, last)


class GradientReadiness:
    """Per tensor of a flat buffer: has backward written its gradient yet?"""

    def __init__(
        self, offsets: Sequence[int], sizes: Sequence[int], loop: asyncio.AbstractEventLoop
    ) -> None:
        self.offsets = list(offsets)
        self.ends = [o + n for o, n in zip(offsets, sizes, strict=True)]
        if any(b < a for a, b in zip(self.ends, self.offsets[1:], strict=False)):
            raise ValueError("tensor ranges must be sorted and disjoint")
        self.loop = loop
        self._done = [False] * len(self.offsets)
        self._waiters: list[tuple[range, asyncio.Future[None]]] = []
        self._error: BaseException | None = None

    def mark(self, index: int) -> None:
        """Tensor `index` is done (on the loop's thread)."""
        self._done[index] = True
        still = []
        for tensors, future in self._waiters:
            if future.done():
                continue
            if all(self._done[i] for i in tensors):
                future.set_result(None)
            else:
                still.append((tensors, future))
        self._waiters = still

    def mark_threadsafe(self, index: int) -> None:
        """`mark` from another thread (autograd's)."""
        self.loop.call_soon_threadsafe(self.mark, index)

    def fail(self, error: BaseException) -> None:
        """End every wait, now and later, with `error` (on the loop's thread)."""
        self._error = error
        for _tensors, future in self._waiters:
            if not future.done():
                future.set_exception(error)
        self._waiters = []

    def fail_threadsafe(self, error: BaseException) -> None:
        self.loop.call_soon_threadsafe(self.fail, error)

    async def wait(self, a: int, b: int) -> None:
        """Return once every tensor meeting elements `a:b` is done."""
        if self._error is not None:
            raise self._error
        tensors = tensors_overlapping(self.offsets, self.ends, a, b)
        if all(self._done[i] for i in tensors):
            return
        future = self.loop.create_future()
        self._waiters.append((tensors, future))
        await future

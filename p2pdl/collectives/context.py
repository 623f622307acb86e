"""What every allreduce executor gets: the operation, the buffer, and how to reduce into it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from p2pdl import kernels
from p2pdl.collectives.compute import Compute, ScratchPool
from p2pdl.collectives.op import Operation

OnSlice = Callable[[int, int, np.ndarray], Any]
"""`on_slice(start, stop, reduced)`: runs on the owner of each slice before it is shared."""


def as_bytes(array: np.ndarray) -> memoryview:
    """A flat byte view of a contiguous array (no copy)."""
    return memoryview(array).cast("B")


@dataclass
class ReduceContext:
    """One allreduce on one rank: its operation, flat buffer, and reduction settings."""

    op: Operation
    buf: np.ndarray
    compute: Compute
    scratch: ScratchPool
    chunk_elems: int
    mean: bool
    compression: str | None
    on_slice: OnSlice | None

    @property
    def rank(self) -> int:
        return self.op.rank

    @property
    def world_size(self) -> int:
        return self.op.world_size

    @property
    def peers(self) -> list[int]:
        return [p for p in range(self.op.world_size) if p != self.op.rank]

    def wire_dtype(self) -> np.dtype:
        return np.dtype(np.uint16) if self.compression else self.buf.dtype

    async def reduce_chunk(
        self, dst: np.ndarray, sources: list[np.ndarray], *, final: bool = True
    ) -> None:
        """dst = sum of `sources` in rank order; the rank's own data is `dst` itself.

        Uncompressed sources are summed in one pass; compressed (uint16) ones are decoded
        and accumulated in turn. The mean's scale is applied once, on the `final` reduction.
        """
        nbytes = dst.nbytes * max(1, len(sources))
        compression = self.compression
        scale = 1.0 / self.world_size if self.mean and final else None

        def work() -> None:
            if compression is None:
                kernels.sum_into(dst, sources)
            else:
                decode_add = (
                    kernels.decode_add_bf16 if compression == "bf16" else (kernels.decode_add_fp16)
                )
                for source in sources:
                    if source is not dst:
                        decode_add(dst, source)
            if scale is not None:
                kernels.scale_(dst, scale)

        await self.compute.run(nbytes, work)

    async def finish_slice(self, start: int, stop: int) -> None:
        """Run the owner's `on_slice` on its reduced slice (the sharded optimizer goes here)."""
        if self.on_slice is None or stop <= start:
            return
        view = self.buf[start:stop]
        result = await self.compute.run(view.nbytes, lambda: self.on_slice(start, stop, view))
        if isinstance(result, Awaitable):
            await result

    def encode(self, src: np.ndarray, out: np.ndarray) -> None:
        if self.compression == "bf16":
            kernels.encode_bf16(src, out)
        else:
            kernels.encode_fp16(src, out)

    def decode(self, src16: np.ndarray, out: np.ndarray) -> None:
        if self.compression == "bf16":
            kernels.decode_bf16(src16, out)
        else:
            kernels.decode_fp16(src16, out)


async def gather_all(*aws: Awaitable[Any]) -> None:
    """Await everything; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()

"""What every allreduce executor gets: the operation, the buffer, and how to reduce into it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from p2pdl import kernels
from p2pdl.collectives.compute import Compute, ScratchPool
from p2pdl.collectives.dtypes import reduce_sources, scale_buffer
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
    scale: float | None = None
    """Factor for the final reduction, instead of the mean's 1/world_size (sub-groups)."""
    chunkwise: bool = False
    """`on_slice` is elementwise: `sliced` may call it per reduced chunk of the owned slice,
    so sharing a chunk does not wait for the whole slice (the all-gather overlaps)."""
    reduce_op: str = "sum"
    """"sum" (also for the mean), "min", "max" or "prod"."""
    kind: str = ""
    """The element type's name ("bfloat16" for uint16 words of bf16 bits); "" means the
    buffer's own dtype."""

    @property
    def element(self) -> str:
        return self.kind or self.buf.dtype.name

    @property
    def plain_sum(self) -> bool:
        """A float32/float64 sum (or mean) on the wire as it is: the only reduction that
        NumPy's `add` or `kernels.sum_into` may do; every other goes through `reduce_chunk`."""
        return (
            self.reduce_op == "sum"
            and self.compression is None
            and self.element in ("float32", "float64")
        )

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
        self,
        dst: np.ndarray,
        sources: list[np.ndarray],
        *,
        final: bool = True,
        inline: bool = False,
    ) -> None:
        """dst = sources[0] op sources[1] op ... in rank order (`dst` may be one of them).

        Uncompressed sources are reduced in one pass; compressed (uint16) ones are decoded
        and accumulated in turn. The mean's scale is applied once, on the `final` reduction.
        `inline` runs it on the calling thread whatever its size (a caller that has nothing
        else for the loop to do meanwhile).
        """
        if inline:
            self.reduce_now(dst, sources, final=final)
        else:
            nbytes = dst.nbytes * max(1, len(sources))
            await self.compute.run(nbytes, lambda: self.reduce_now(dst, sources, final=final))

    def reduce_now(self, dst: np.ndarray, sources: list[np.ndarray], *, final: bool = True) -> None:
        """`reduce_chunk`'s reduction, on the calling thread."""
        compression = self.compression
        parallel = self._parallel(dst.size)
        kind = self.element
        if self.plain_sum:
            sum_in_rank_order(dst, sources, parallel)
        elif compression is None:
            reduce_sources(dst, sources, self.reduce_op, kind, parallel)
        else:
            decode_add = (
                kernels.decode_add_bf16 if compression == "bf16" else kernels.decode_add_fp16
            )
            for source in sources:
                if source is not dst:
                    decode_add(dst, source, parallel=parallel)
        scale = self.final_scale() if final else None
        if scale is not None:
            scale_buffer(dst, kind, scale, parallel)

    def final_scale(self) -> float | None:
        """The factor of the final reduction: the mean's 1/world_size, a sub-group's own."""
        if self.scale is not None:
            return self.scale
        return 1.0 / self.world_size if self.mean else None

    async def reduce_chunk_encode_bf16(
        self, dst: np.ndarray, sources: list[np.ndarray], out16: np.ndarray
    ) -> None:
        """`reduce_chunk` of bf16 sources, then `encode_round` into `out16`: the last source
        is added, scaled and rounded in the same pass (same bits, two passes fewer).

        Runs where `reduce_chunk` would, so on large chunks the loop thread does no codec work.
        """
        others = [source for source in sources if source is not dst]
        last = others.pop()
        alpha = self.final_scale()
        parallel = self._parallel(dst.size)

        def work() -> None:
            for source in others:
                kernels.decode_add_bf16(dst, source, parallel=parallel)
            kernels.decode_add_encode_round_bf16(
                dst, last, out16, alpha=1.0 if alpha is None else alpha, parallel=parallel
            )

        await self.compute.run(dst.nbytes * max(1, len(sources)), work)

    async def finish_slice(self, start: int, stop: int) -> None:
        """Run the owner's `on_slice` on its reduced slice (the sharded optimizer goes here)."""
        if self.on_slice is None or stop <= start:
            return
        view = self.buf[start:stop]
        result = await self.compute.run(view.nbytes, lambda: self.on_slice(start, stop, view))
        if isinstance(result, Awaitable):
            await result

    def _parallel(self, elems: int) -> bool | None:
        """Pipelined chunks use the single-threaded kernels; whole buffers may use more.

        A chunk's arithmetic overlaps the transfer of the next chunks, so extra kernel threads
        buy little there and cost a lot when the cores are shared (measured: 4 MiB chunks
        with the multi-threaded kernels took ~40% more CPU per allreduce than 1-2 MiB ones;
        see docs/benchmarks.md). Unchunked work (`direct`) keeps the kernels' own choice.
        """
        return False if elems <= self.chunk_elems else None

    def encode(self, src: np.ndarray, out: np.ndarray) -> None:
        parallel = self._parallel(src.size)
        if self.compression == "bf16":
            kernels.encode_bf16(src, out, parallel=parallel)
        else:
            kernels.encode_fp16(src, out, parallel=parallel)

    def encode_round(self, buf: np.ndarray, out: np.ndarray) -> None:
        """Encode `buf` into `out` and leave `buf` holding exactly what `out` decodes to, so
        the rank that sends a value keeps the same bits as the ranks that receive it."""
        if self.compression == "bf16":
            kernels.encode_round_bf16(buf, out, parallel=self._parallel(buf.size))
        else:
            self.encode(buf, out)
            self.decode(out, buf)

    def decode(self, src16: np.ndarray, out: np.ndarray) -> None:
        parallel = self._parallel(src16.size)
        if self.compression == "bf16":
            kernels.decode_bf16(src16, out, parallel=parallel)
        else:
            kernels.decode_fp16(src16, out, parallel=parallel)


SMALL_TEMP_ELEMS = 64 * 1024
"""Up to this size a temporary partial sum is cheaper than the kernels' general k-way path."""


def sum_in_rank_order(dst: np.ndarray, sources: list[np.ndarray], parallel: bool | None) -> None:
    """dst = ((s0 + s1) + s2) + ... where `dst` is itself one of `sources` (this rank's own).

    `kernels.sum_into` takes its fast fixed-arity kernels only when `dst` is the first source;
    when it is source r > 0 it builds a typed list per call (~30 µs, most of a 4 KiB direct
    allreduce on rank 1). IEEE addition is commutative, so the same bits come out of
    dst += (s0 + ... + s_{r-1}) followed by dst = dst + s_{r+1} + ...: both steps are fast
    kernels for up to 4 sources on either side.
    """
    r = next((i for i, source in enumerate(sources) if source is dst), 0)
    rest = sources[r + 1 :]
    if r == 0 or r > 4 or len(rest) > 3 or (r > 1 and dst.size > SMALL_TEMP_ELEMS):
        kernels.sum_into(dst, sources, parallel=parallel)
        return
    if r == 1:
        kernels.add_(dst, sources[0], parallel=parallel)
    else:
        head = np.empty_like(dst)
        kernels.sum_into(head, sources[:r], parallel=parallel)
        kernels.add_(dst, head, parallel=parallel)
    if rest:
        kernels.sum_into(dst, [dst, *rest], parallel=parallel)


async def gather_all(*aws: Awaitable[Any]) -> None:
    """Await everything; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()

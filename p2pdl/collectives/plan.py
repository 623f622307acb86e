"""Pure plans for the collectives: who owns which slice, how slices are chunked, ring order.

Nothing here touches sockets or buffers; the executors carry out what these functions
return, and the property tests check them on their own.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pdl.kernels import slice_bounds

CACHE_LINE_ELEMS = 16
"""Slices start on 64-byte boundaries for float32 (alignment helps the kernels)."""


@dataclass(frozen=True, slots=True)
class SlicePlan:
    """A buffer of `n` elements cut into one slice per rank, each cut into chunks."""

    n: int
    world_size: int
    slices: tuple[tuple[int, int], ...]
    chunks: tuple[tuple[tuple[int, int], ...], ...]
    """`chunks[owner]` are the (start, stop) pieces of that owner's slice, in order."""

    def owned(self, rank: int) -> tuple[int, int]:
        return self.slices[rank]


def chunk_ranges(start: int, stop: int, chunk: int) -> tuple[tuple[int, int], ...]:
    """Split [start, stop) into pieces of at most `chunk` elements (none for an empty range)."""
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    return tuple((a, min(a + chunk, stop)) for a in range(start, stop, chunk))


MIN_PIPELINE_CHUNKS = 4
"""A slice is cut into at least this many chunks (down to MIN_CHUNK_ELEMS each), so that an
owner starts sharing its first chunk while the last one is still arriving."""
MIN_CHUNK_ELEMS = 16 * 1024


def pipeline_chunk(slice_len: int, chunk_elems: int) -> int:
    """Chunk length for one slice: at most `chunk_elems`, small enough to pipeline."""
    per_slice = -(-slice_len // MIN_PIPELINE_CHUNKS)
    return max(1, min(chunk_elems, max(MIN_CHUNK_ELEMS, per_slice)))


def owner_slices(n: int, world_size: int) -> tuple[tuple[int, int], ...]:
    """The [start, stop) slice of `n` elements each of `world_size` owners reduces: the slices
    of `plan_slices`, without planning its chunks."""
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    align = CACHE_LINE_ELEMS if n >= CACHE_LINE_ELEMS * world_size * 4 else 1
    return tuple(slice_bounds(n, world_size, align=align))


def plan_slices(n: int, world_size: int, chunk_elems: int) -> SlicePlan:
    """BigDL's balanced slicing of `n` elements over `world_size` owners, chunked.

    With many ranks a slice can be no bigger than one chunk; then an owner could share
    nothing until its whole slice had arrived from everyone (measured: sliced at 8 hosts,
    16 MiB, 1 Gbit/s links took 1.29x the bandwidth bound with 2 MiB chunks), so chunks
    shrink to give every slice a few.
    """
    slices = owner_slices(n, world_size)
    longest = max(b - a for a, b in slices)
    chunk = pipeline_chunk(longest, chunk_elems)
    chunks = tuple(chunk_ranges(a, b, chunk) for a, b in slices)
    return SlicePlan(n=n, world_size=world_size, slices=slices, chunks=chunks)


def ring_neighbours(rank: int, world_size: int) -> tuple[int, int]:
    """(left, right): the ring receives from the left and sends to the right."""
    return (rank - 1) % world_size, (rank + 1) % world_size


def ring_reduce_scatter_order(rank: int, world_size: int) -> tuple[tuple[int, int], ...]:
    """For each reduce-scatter step: (slice sent to the right, slice received from the left).

    After the last step rank r holds the full sum of slice (r + 1) % world_size.
    """
    return tuple(
        ((rank - step) % world_size, (rank - step - 1) % world_size)
        for step in range(world_size - 1)
    )


def ring_allgather_order(rank: int, world_size: int) -> tuple[tuple[int, int], ...]:
    """For each all-gather step: (slice sent to the right, slice received from the left)."""
    return tuple(
        ((rank + 1 - step) % world_size, (rank - step) % world_size)
        for step in range(world_size - 1)
    )


def binomial_children(rank: int, world_size: int, root: int = 0) -> tuple[int, ...]:
    """Children of `rank` in a binomial tree rooted at `root` (treeAggregate's shape)."""
    relative = (rank - root) % world_size
    children = []
    mask = 1
    while mask < world_size:
        if relative & mask:
            break
        child = relative | mask
        if child < world_size:
            children.append((child + root) % world_size)
        mask <<= 1
    return tuple(children)


def binomial_parent(rank: int, world_size: int, root: int = 0) -> int | None:
    """Parent of `rank` in the binomial tree rooted at `root` (None for the root)."""
    relative = (rank - root) % world_size
    if relative == 0:
        return None
    lowest = relative & -relative
    return ((relative ^ lowest) + root) % world_size

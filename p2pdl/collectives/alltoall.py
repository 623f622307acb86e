"""Pure plans for the personalised exchanges: all-to-all splits and per-pair agreements.

`plan_alltoall` turns one rank's split sizes into the element ranges it sends to and
receives from every rank; `pair_labels` names, for each peer, what the two ranks of that
link must agree on (how much goes each way), so a rank that splits differently from its
peer fails with `CollectiveMismatchError` on both sides. Nothing here touches a buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Range = tuple[int, int]


@dataclass(frozen=True, slots=True)
class AlltoallPlan:
    """Where each rank's part lies: `send[j]` in the input, `recv[j]` in the output."""

    send: tuple[Range, ...]
    recv: tuple[Range, ...]


def equal_splits(size: int, world_size: int, what: str) -> tuple[int, ...]:
    """`size` cut into `world_size` equal parts, or ValueError."""
    if size % world_size:
        raise ValueError(f"{what} of {size} elements does not split into {world_size} parts")
    return (size // world_size,) * world_size


def check_splits(splits: object, size: int, world_size: int, what: str) -> tuple[int, ...]:
    """Explicit splits: `world_size` integers >= 0 adding up to `size`, or ValueError."""
    if splits is None:
        return equal_splits(size, world_size, what)
    if isinstance(splits, (str, bytes)) or not isinstance(splits, Sequence):
        raise ValueError(f"{what} splits must be a sequence of {world_size} integers")
    out = tuple(splits)
    if len(out) != world_size:
        raise ValueError(f"{what} splits have {len(out)} entries, not {world_size}")
    for s in out:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"{what} splits must be integers >= 0, got {list(out)}")
    if sum(out) != size:
        raise ValueError(f"{what} splits add up to {sum(out)}, the buffer holds {size}")
    return out


def ranges(splits: Sequence[int]) -> tuple[Range, ...]:
    """Consecutive ranges of the given lengths, from 0."""
    out, start = [], 0
    for length in splits:
        out.append((start, start + length))
        start += length
    return tuple(out)


def plan_alltoall(input_splits: Sequence[int], output_splits: Sequence[int]) -> AlltoallPlan:
    """Part j of the input goes to rank j; what rank j sends lands at output part j."""
    if len(input_splits) != len(output_splits):
        raise ValueError("input and output splits name different numbers of ranks")
    return AlltoallPlan(send=ranges(input_splits), recv=ranges(output_splits))


def pair_labels(name: str, rank: int, sends: Sequence[int], receives: Sequence[int]) -> dict:
    """Per peer j: "`name`(lo->hi x, hi->lo y)", the same string on both ranks of the pair
    when `sends[j]` here is what j receives from here and `receives[j]` what j sends."""
    labels = {}
    for peer, (out, back) in enumerate(zip(sends, receives, strict=True)):
        if peer == rank:
            continue
        lo, hi = min(rank, peer), max(rank, peer)
        up, down = (out, back) if rank == lo else (back, out)
        labels[peer] = f"{name}({lo}->{hi} {up}, {hi}->{lo} {down})"
    return labels

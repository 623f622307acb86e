"""Slice accumulation without I/O: which contributions to each chunk of an owned slice landed.

The owner of a slice receives one contribution per peer for every chunk, in whatever order
the network delivers them. `SliceReducer` only keeps the books: `arrived(peer, chunk)` says
when a chunk has all its contributions, exactly once per chunk, so the executor reduces it
then — in rank order, whatever the arrival order was, which keeps the result bit-identical
on every rank and in every run (hivemind's `TensorPartReducer` plays this part there).
"""

from __future__ import annotations

from collections.abc import Iterable

from p2pdl.errors import ProtocolError

__all__ = ["SliceReducer"]


class SliceReducer:
    """Counts the contributions of `contributors` to `chunks` chunks (see the module)."""

    __slots__ = ("_contributors", "_missing", "_seen", "released")

    def __init__(self, chunks: int, contributors: Iterable[int]) -> None:
        if chunks < 0:
            raise ValueError(f"chunks must be >= 0, got {chunks}")
        self._contributors = frozenset(contributors)
        self._missing = [len(self._contributors)] * chunks
        self._seen: set[tuple[int, int]] = set()
        self.released = 0
        """How many chunks have all their contributions."""

    @property
    def chunks(self) -> int:
        return len(self._missing)

    @property
    def complete(self) -> bool:
        return self.released == len(self._missing)

    def ready_at_start(self) -> list[int]:
        """Chunks that need no contribution at all (a slice owned with no peers)."""
        if self._contributors:
            return []
        self.released = len(self._missing)
        return list(range(len(self._missing)))

    def arrived(self, contributor: int, chunk: int) -> bool:
        """Record `contributor`'s part of `chunk`; True iff it was the chunk's last one."""
        if contributor not in self._contributors:
            raise ProtocolError(f"rank {contributor} does not contribute to this slice")
        if not 0 <= chunk < len(self._missing):
            raise ProtocolError(f"chunk {chunk} is outside 0..{len(self._missing) - 1}")
        key = (contributor, chunk)
        if key in self._seen:
            raise ProtocolError(f"rank {contributor} contributed chunk {chunk} twice")
        self._seen.add(key)
        self._missing[chunk] -= 1
        if self._missing[chunk] == 0:
            self.released += 1
            return True
        return False

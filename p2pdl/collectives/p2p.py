"""Point-to-point messages: `send` to one rank, `recv` from one rank, matched in order.

The k-th message rank s sends to rank d is received by d's k-th receive from s (MPI's
non-overtaking rule); a receive from any rank takes the next message of whichever rank's
arrives first among those with the same tag, size and dtype. The user's `tag` travels in the
descriptor, so a send and a receive that disagree on the tag, size or dtype fail as a
mismatch on both sides.
Point-to-point messages take no collective operation number: only the two ranks call them.

Tags: message k from s to d owns `[base, base + 2**24)` with
``base = P2P_SPACE | (DIR_BIT if s > d else 0) | k << 24``: the direction bit keeps the two
directions of one link apart, so d's own messages to s never land in s→d's range, and either
side may send an abort into it. A send returns once its frames have left user space.
"""

from __future__ import annotations

import collections

import numpy as np

from p2pdl.collectives.context import gather_all
from p2pdl.collectives.op import SUB_BITS, Operation
from p2pdl.collectives.plan import chunk_ranges

P2P_SPACE = 1 << 62
DIR_BIT = 1 << 61
MAX_SEQUENCE = (1 << (61 - SUB_BITS)) - 1


def p2p_base(src: int, dst: int, seq: int) -> int:
    """First tag of message `seq` from rank `src` to rank `dst`."""
    if not 0 <= seq <= MAX_SEQUENCE:
        raise OverflowError(f"point-to-point sequence {seq} exceeds {MAX_SEQUENCE}")
    return P2P_SPACE | (DIR_BIT if src > dst else 0) | (seq << SUB_BITS)


class Sequences:
    """Per-peer message counters of one rank (one session)."""

    def __init__(self) -> None:
        self._sent: collections.Counter[int] = collections.Counter()
        self._received: collections.Counter[int] = collections.Counter()

    def next_send(self, dst: int) -> int:
        seq = self._sent[dst]
        self._sent[dst] += 1
        return seq

    def next_recv(self, src: int) -> int:
        seq = self._received[src]
        self._received[src] += 1
        return seq

    def peek_recv(self, src: int) -> int:
        """The sequence number `next_recv(src)` will return (a receive from any rank)."""
        return self._received[src]


async def send_bytes(op: Operation, data: np.ndarray, dst: int, chunk_bytes: int) -> None:
    """Send the flat uint8 view `data` to `dst` in frames of at most `chunk_bytes`."""
    chunks = chunk_ranges(0, data.nbytes, chunk_bytes) or ((0, 0),)
    for c, (a, b) in enumerate(chunks):
        await op.send(dst, c, memoryview(data[a:b]))


async def recv_bytes(op: Operation, data: np.ndarray, src: int, chunk_bytes: int) -> None:
    """Receive `src`'s message straight into the flat uint8 view `data`."""
    chunks = chunk_ranges(0, data.nbytes, chunk_bytes) or ((0, 0),)
    await gather_all(*(op.recv(src, c, memoryview(data[a:b])) for c, (a, b) in enumerate(chunks)))

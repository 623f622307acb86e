"""Subgroups: collectives over a subset of the ranks, on the same links, in their own tags.

A subgroup is named by its members' global ranks in subgroup-rank order and by how many
subgroups of that same rank list this rank created before it (`GroupKey`): every member
creates its subgroups of one rank list in one order, so all of them derive the same key
without a message. The key's hash picks the group's tag space (`GroupTags`), disjoint from
the world group's collectives and point-to-point messages:

    bit 63 set | group id (20 bits, from the key) | p2p flag | op or message number | frame

so operations of different groups, and of the world group, can be in flight together without
their frames crossing. Two groups that share a link and hash to the same id (odds 2**-20 per
such pair) do not corrupt each other: every frame carries its group's key in the descriptor,
so they fail with `CollectiveMismatchError`. Numbers wrap around within their field (2**18
collectives, 2**17 messages per pair): a number comes back only long after its operation
ended and the links forgot it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from p2pdl.collectives.op import SUB_BITS, Group, LinkLike
from p2pdl.errors import P2PDLError

GROUP_SPACE = 1 << 63
GROUP_ID_BITS = 20
OP_BITS = 18
SEQ_BITS = 17
_GROUP_SHIFT = SUB_BITS + OP_BITS + 1  # 43: above the op numbers and the p2p flag
_P2P_FLAG = 1 << (SUB_BITS + OP_BITS)
_DIR_BIT = 1 << (SUB_BITS + SEQ_BITS)


@dataclass(frozen=True, slots=True)
class GroupKey:
    """A subgroup's identity: its members (global ranks, subgroup order) and ordinal."""

    ranks: tuple[int, ...]
    ordinal: int

    @property
    def gid(self) -> int:
        """The group's 20-bit id in the tag space (a hash of the key)."""
        digest = hashlib.blake2b(repr((self.ranks, self.ordinal)).encode(), digest_size=8)
        return int.from_bytes(digest.digest(), "big") & ((1 << GROUP_ID_BITS) - 1)

    @property
    def label(self) -> str:
        """How descriptors and errors name the group."""
        return f"group {list(self.ranks)}#{self.ordinal}"


def check_ranks(ranks: object, world_size: int) -> tuple[int, ...]:
    """`ranks` as a tuple of distinct ranks of a group of `world_size`, or ValueError."""
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence):
        raise ValueError(f"a subgroup takes a sequence of ranks, got {ranks!r}")
    out = tuple(ranks)
    for r in out:
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < world_size:
            raise ValueError(f"subgroup rank {r!r} is not a rank in 0..{world_size - 1}")
    if len(set(out)) != len(out):
        raise ValueError(f"subgroup ranks repeat: {list(out)}")
    if not out:
        raise ValueError("a subgroup needs at least one rank")
    return out


class GroupRegistry:
    """How many subgroups of each rank list this rank has created (one per world group)."""

    def __init__(self) -> None:
        self._created: Counter[tuple[int, ...]] = Counter()

    def key(self, ranks: tuple[int, ...]) -> GroupKey:
        ordinal = self._created[ranks]
        self._created[ranks] += 1
        return GroupKey(ranks, ordinal)


class GroupTags:
    """The tag numbers of one subgroup: collective operations and point-to-point messages."""

    def __init__(self, gid: int) -> None:
        self._space = GROUP_SPACE | gid << _GROUP_SHIFT
        self._ops = 0

    def next_op_id(self) -> int:
        """The next collective's number, as `Operation` shifts it (`<< SUB_BITS`)."""
        self._ops = (self._ops + 1) % (1 << OP_BITS)
        return (self._space >> SUB_BITS) | self._ops

    def p2p_base(self, src: int, dst: int, seq: int) -> int:
        """First tag of message `seq` (wrapped) from subgroup rank `src` to `dst`."""
        direction = _DIR_BIT if src > dst else 0
        return self._space | _P2P_FLAG | direction | (seq % (1 << SEQ_BITS)) << SUB_BITS


class SubGroup:
    """A `Group` over `members` (global ranks) of `parent`: subgroup ranks, own tags."""

    def __init__(self, parent: Group, key: GroupKey) -> None:
        self.parent = parent
        self.key = key
        self.members = key.ranks
        self.rank = key.ranks.index(parent.rank)
        self.world_size = len(key.ranks)
        self.tags = GroupTags(key.gid)

    def link(self, rank: int) -> LinkLike:
        return self.parent.link(self.members[rank])

    def watch(self, callback: Callable[[int, P2PDLError], None]) -> Callable[[], None]:
        """Losses of members' links, reported with subgroup ranks."""
        local = {g: i for i, g in enumerate(self.members)}

        def on_lost(rank: int, error: P2PDLError) -> None:
            if rank in local:
                callback(local[rank], error)

        return self.parent.watch(on_lost)

    def next_op_id(self) -> int:
        return self.tags.next_op_id()

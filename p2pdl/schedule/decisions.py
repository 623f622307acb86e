"""The leader's decisions at group boundaries, as pure functions over frozen values.

The async leader only carries out what these return (DESIGN.md's "pure deciders"):

* `plan_members`: who is in the next membership epoch, in rank order;
* `choose_rollback`: the boundary everyone goes back to after a failure (or stays at, for a
  join), and which node contributes which range of the optimizer state to rebuild it;
* `cover`: the exact partition of `[0, size)` into pieces some node holds.

Optimizer state lives only on the ranks that own it (`ShardedUpdate`); at every boundary each
owner also hands a replica of its range to the next rank, so losing one node loses no state.
A node's `Holding` says, for one boundary step, which ranges of the state it can give.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from p2pdl.errors import ProtocolError
from p2pdl.schedule.errors import JobError

__all__ = [
    "Holding",
    "Piece",
    "Rollback",
    "choose_rollback",
    "cover",
    "holdings_from_wire",
    "plan_members",
]

SOURCES = ("own", "replica", "full")
"""Where a node keeps a piece: its own range, the replica it holds of its predecessor's, or
the full state (read from a checkpoint)."""


@dataclass(frozen=True, slots=True)
class Piece:
    """State elements [start, stop) that a node holds as `source`."""

    start: int
    stop: int
    source: str

    def to_wire(self) -> list[Any]:
        return [self.start, self.stop, self.source]


@dataclass(frozen=True, slots=True)
class Holding:
    """What a node holds of the boundary at global step `step`: the weights (always) and
    these pieces of the optimizer state."""

    step: int
    pieces: tuple[Piece, ...]

    def to_wire(self) -> list[Any]:
        return [self.step, [p.to_wire() for p in self.pieces]]


def holdings_from_wire(data: object, *, size: int, sender: str) -> tuple[Holding, ...]:
    """Validate a node's holdings message; ProtocolError naming `sender` if malformed."""

    def bad(why: str) -> ProtocolError:
        return ProtocolError(f"malformed holdings from {sender}: {why}")

    def integer(value: object, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise bad(f"{value!r} is not an integer in [{lo}, {hi}]")
        return value

    if not isinstance(data, list) or len(data) > 16:
        raise bad("expected a short list")
    out = []
    for item in data:
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], list):
            raise bad("each holding is [step, pieces]")
        step = integer(item[0], 0, 2**62)
        pieces = []
        for raw in item[1][:8]:
            if not isinstance(raw, list) or len(raw) != 3 or raw[2] not in SOURCES:
                raise bad(f"piece {raw!r}")
            start, stop = integer(raw[0], 0, size), integer(raw[1], 0, size)
            if start > stop:
                raise bad(f"piece {raw!r} ends before it starts")
            pieces.append(Piece(start, stop, raw[2]))
        out.append(Holding(step, tuple(pieces)))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Rollback:
    """Go (back) to the boundary of `step`; `sources[node]` are the pieces each node gives."""

    step: int
    sources: Mapping[int, tuple[Piece, ...]]


_PREFERENCE = {"full": 0, "own": 1, "replica": 2}


def cover(size: int, offers: Mapping[int, Sequence[Piece]]) -> dict[int, tuple[Piece, ...]]:
    """An exact partition of [0, size) into pieces the nodes offer: every element comes from
    exactly one node. At each point the piece reaching furthest wins (then own copies over
    replicas, then the lowest node id). JobError naming the first gap if there is one."""
    candidates = sorted(
        ((p, node) for node, pieces in offers.items() for p in pieces if p.stop > p.start),
        key=lambda item: (item[0].start, -item[0].stop, _PREFERENCE[item[0].source], item[1]),
    )
    chosen: dict[int, list[Piece]] = {}
    position = 0
    while position < size:
        best: tuple[Piece, int] | None = None
        for piece, node in candidates:
            if piece.start > position:
                break
            if piece.stop > position and (
                best is None
                or (piece.stop, -_PREFERENCE[piece.source], -node)
                > (best[0].stop, -_PREFERENCE[best[0].source], -best[1])
            ):
                best = (piece, node)
        if best is None:
            upcoming = [p.start for p, _ in candidates if p.start > position]
            gap_end = min(upcoming) if upcoming else size
            raise JobError(
                f"the optimizer state of elements [{position}, {gap_end}) was held only by "
                "the nodes that were lost; resume from a checkpoint (--resume)"
            )
        piece, node = best
        chosen.setdefault(node, []).append(Piece(position, piece.stop, piece.source))
        position = piece.stop
    return {node: tuple(pieces) for node, pieces in chosen.items()}


def choose_rollback(
    holdings: Mapping[int, Sequence[Holding]], size: int, *, has_state: bool
) -> Rollback:
    """The latest boundary every node holds and whose optimizer state the nodes can rebuild
    together; JobError when there is none."""
    if not holdings:
        raise JobError("no node holds a boundary to go back to")
    steps = [{h.step for h in held} for held in holdings.values()]
    common = sorted(set.intersection(*steps), reverse=True)
    if not common:
        have = {node: sorted(s) for node, s in zip(holdings, steps, strict=True)}
        raise JobError(f"no common boundary to roll back to: the nodes hold steps {have}")
    error: JobError | None = None
    for step in common:
        if not has_state:
            return Rollback(step, {})
        offers = {
            node: next(h.pieces for h in held if h.step == step) for node, held in holdings.items()
        }
        try:
            return Rollback(step, cover(size, offers))
        except JobError as exc:
            error = error or exc
    assert error is not None
    raise error


def plan_members(
    local: int,
    survivors: Sequence[int],
    joiners: Sequence[int],
    *,
    max_nodes: int,
    min_nodes: int,
) -> tuple[int, ...]:
    """The next epoch's nodes in rank order: the leader's own node first, the surviving
    members in their old order, then joiners while there is room. JobError below
    `min_nodes`."""
    members = [local, *(n for n in survivors if n != local)]
    room = max(0, max_nodes - len(members))
    members += [n for n in joiners if n not in members][:room]
    if len(members) < min_nodes:
        raise JobError(
            f"only {len(members)} node(s) remain, the job needs at least {min_nodes} "
            "(min_nodes); stopping"
        )
    return tuple(members)

"""Control messages between the leader and its workers: their kinds and field types.

Every message is a msgpack map of plain types with a kind `"k"`; `check` validates the kind
and the types of its fields before anything acts on it, so a malformed message is a
`ProtocolError` naming the sender, never a KeyError deep inside the leader.

They travel on the control channel a worker opened when it joined (`p2pdl.rendezvous`: the
join protocol, size-limited decoding); the leader node's own worker talks to the leader
in-process through a `LocalChannel` with the same interface, whose messages are checked
but never encoded nor counted as network traffic. Membership epochs' sessions carry only
collectives, so control messages and collective frames never share a tag space.

Leader → worker: job, welcome, error, epoch, start, group, abort, stop, ping.
Worker → leader: join (the join protocol's first message), hello, setup_done, connected,
started, failed, aborted, report, stall, bye.
"""

from __future__ import annotations

from typing import Any

from p2pdl.errors import ProtocolError

__all__ = ["COUNTED_KINDS", "LOST", "MESSAGES", "check"]

_NUM = (int, float)
_OPT_INT = (int, type(None))
_OPT_STR = (str, type(None))

MESSAGES: dict[str, dict[str, tuple[type, ...] | type]] = {
    # leader -> worker
    "job": {"job": dict, "node_id": int, "digest": str},
    "welcome": {},
    "error": {"reason": str},
    "epoch": {
        "epoch": int,
        "rank": int,
        "peers": list,
        "restore": _OPT_INT,
        "sync": bool,
        "assemble": bool,
        "contribute": list,
        "step": int,
    },
    "start": {"epoch": int},
    "group": {"plan": dict, "checkpoint": bool},
    "abort": {"epoch": int},
    "stop": {},
    "ping": {},
    # worker -> leader
    "join": {"addr": list, "rank": _OPT_INT},
    "hello": {"digest": _OPT_STR, "error": _OPT_STR},
    "setup_done": {"params": int, "optimizer": dict, "error": _OPT_STR},
    "connected": {"epoch": int},
    "started": {"epoch": int},
    "failed": {"epoch": int, "phase": str, "error": str, "lost": list},
    "aborted": {"epoch": int, "holdings": list},
    "report": {
        "epoch": int,
        "group": int,
        "steps": int,
        "t_compute": _NUM,
        "t_reduce": _NUM,
        "t_wait": _NUM,
        "t_boundary": _NUM,
    },
    "stall": {"epoch": int, "step": int, "phase": str, "seconds": _NUM},
    "bye": {"rank": int, "weights_sha256": str, "steps_run": int},
}
"""Every message kind and its required fields with their types (extra fields are ignored)."""

COUNTED_KINDS = frozenset({"group", "report", "ping", "stall"})
"""Steady-state kinds: what `leader messages per iteration` counts (setup and teardown are not)."""

LOST = "_lost"
"""The pseudo-kind the leader's inbox gets once a node's channel is gone."""


def check(message: object, *, sender: int | str | None = None) -> dict[str, Any]:
    """Validate a decoded message; ProtocolError naming `sender` if it is malformed."""
    rank = sender if isinstance(sender, int) else None
    who = f" from {sender}" if isinstance(sender, str) else ""
    if not isinstance(message, dict):
        raise ProtocolError(f"control message{who} is not a map", rank=rank)
    kind = message.get("k")
    fields = MESSAGES.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise ProtocolError(f"unknown control message kind {kind!r}{who}", rank=rank)
    for name, types in fields.items():
        if name not in message:
            raise ProtocolError(f"{kind} message{who} without field {name!r}", rank=rank)
        value = message[name]
        allowed = types if isinstance(types, tuple) else (types,)
        if isinstance(value, bool) and bool not in allowed:
            raise ProtocolError(f"{kind}.{name}{who} must not be a bool", rank=rank)
        if not isinstance(value, allowed):
            raise ProtocolError(
                f"{kind}.{name}{who} has type {type(value).__name__}, expected "
                f"{'/'.join(t.__name__ for t in allowed)}",
                rank=rank,
            )
    return message


def counted(channel: Any) -> int:
    """Steady-state messages both ways on `channel` (see COUNTED_KINDS); 0 in-process."""
    if getattr(channel, "peer_label", "") == "local":
        return 0
    return sum(n for k, n in channel.sent.items() if k in COUNTED_KINDS) + sum(
        n for k, n in channel.received.items() if k in COUNTED_KINDS
    )

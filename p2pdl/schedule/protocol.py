"""Control messages between the leader and its workers, and the channels that carry them.

Every message is a msgpack map of plain types with a kind `"k"`; `decode` checks the kind
and the types of its fields before anything acts on it, so a malformed message is a
`ProtocolError` naming the sender, never a KeyError deep inside the leader.

Control channel (the choice of tag space): a worker's control messages to and from the leader
travel on their **own connection** — the authenticated link the worker opened to join (a
rank -1 join handshake on the leader's listener) and keeps for its whole life. The mesh
links of each membership epoch carry only collectives, so collective tags
(`op_id << 24 | sub`) and control tags can never collide. On the control link frame `i`
(1, 2, 3, …) in each direction has tag `i`: the receiver posts the next number, frames that
arrive early are held by the transport (small ones in memory, large ones pause reading), and
nothing is ever lost to a cancelled receive. The message itself is the frame's payload.

The leader node's own worker talks to the leader in-process through a `LocalChannel` with
the same interface; its messages are never encoded and never counted as network traffic.

Leader → worker: job, welcome, error, epoch, connect, start, group, abort, stop, ping.
Worker → leader: hello, setup_done, prepared, connected, started, failed, aborted, report,
stall, bye.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any

import msgpack

from p2pdl.errors import P2PDLError, PeerLostError, ProtocolError
from p2pdl.transport import Link

__all__ = [
    "COUNTED_KINDS",
    "MESSAGES",
    "Channel",
    "LinkChannel",
    "LocalChannel",
    "decode",
    "encode",
]

_NUM = (int, float)
_OPT_INT = (int, type(None))
_OPT_STR = (str, type(None))

MESSAGES: dict[str, dict[str, tuple[type, ...] | type]] = {
    # leader -> worker
    "job": {"job": dict, "node_id": int},
    "welcome": {},
    "error": {"reason": str},
    "epoch": {
        "epoch": int,
        "rank": int,
        "peers": list,
        "restore": _OPT_INT,
        "sync": bool,
        "step": int,
    },
    "connect": {"epoch": int},
    "start": {"epoch": int},
    "group": {"plan": dict},
    "abort": {"epoch": int},
    "stop": {},
    "ping": {},
    # worker -> leader
    "hello": {"addr": list, "digest": _OPT_STR, "error": _OPT_STR},
    "setup_done": {"params": int, "optimizer": dict, "error": _OPT_STR},
    "prepared": {"epoch": int},
    "connected": {"epoch": int},
    "started": {"epoch": int},
    "failed": {"epoch": int, "phase": str, "error": str, "lost": list},
    "aborted": {"epoch": int, "snapshots": list},
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

_LOST = "_lost"
"""Internal pseudo-kind a channel yields once when its peer is gone."""


def encode(message: dict[str, Any]) -> bytes:
    """msgpack bytes of a message (checked on the way out too: a bug here is ours)."""
    kind = message.get("k")
    if kind not in MESSAGES:
        raise ValueError(f"unknown control message kind {kind!r}")
    return msgpack.packb(message, use_bin_type=True)


def decode(data: bytes | bytearray | memoryview, *, sender: int | None = None) -> dict[str, Any]:
    """Parse and validate one control message; ProtocolError (naming `sender`) if malformed."""
    try:
        message = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable control message: {exc}", rank=sender) from None
    return check(message, sender=sender)


def check(message: object, *, sender: int | None = None) -> dict[str, Any]:
    """Validate an already-decoded message."""
    if not isinstance(message, dict):
        raise ProtocolError("control message is not a map", rank=sender)
    kind = message.get("k")
    fields = MESSAGES.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise ProtocolError(f"unknown control message kind {kind!r}", rank=sender)
    for name, types in fields.items():
        if name not in message:
            raise ProtocolError(f"{kind} message without field {name!r}", rank=sender)
        value = message[name]
        if isinstance(value, bool) and types is not bool and bool not in _as_tuple(types):
            raise ProtocolError(f"{kind}.{name} must not be a bool", rank=sender)
        if not isinstance(value, types):
            raise ProtocolError(
                f"{kind}.{name} has type {type(value).__name__}, expected "
                f"{'/'.join(t.__name__ for t in _as_tuple(types))}",
                rank=sender,
            )
    return message


def _as_tuple(types: tuple[type, ...] | type) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


class Channel:
    """One end of a leader–worker control channel: ordered, reliable, typed messages."""

    peer_label = "peer"

    def __init__(self) -> None:
        self.sent: collections.Counter[str] = collections.Counter()
        self.received: collections.Counter[str] = collections.Counter()
        self.last_sent = 0.0
        self._inbox: asyncio.Queue[dict[str, Any] | P2PDLError] = asyncio.Queue()
        self.lost: P2PDLError | None = None

    async def send(self, message: dict[str, Any]) -> None:
        raise NotImplementedError

    async def recv(self) -> dict[str, Any]:
        """The next message; raises the channel's error once the peer is gone."""
        if self.lost is not None and self._inbox.empty():
            raise self.lost
        item = await self._inbox.get()
        if isinstance(item, P2PDLError):
            self.lost = item
            self._inbox.put_nowait(item)  # every later recv sees the same error
            raise item
        self.received[item["k"]] += 1
        return item

    def close(self) -> None:
        pass

    def counted(self) -> int:
        """Steady-state messages both ways (see COUNTED_KINDS)."""
        return sum(n for k, n in self.sent.items() if k in COUNTED_KINDS) + sum(
            n for k, n in self.received.items() if k in COUNTED_KINDS
        )


class LinkChannel(Channel):
    """A control channel over one authenticated Link (frame i has tag i, both ways)."""

    def __init__(
        self,
        link: Link,
        *,
        peer_rank: int | None = None,
        label: str = "peer",
        first_recv: int = 1,
    ) -> None:
        super().__init__()
        self.link = link
        self.peer_rank = peer_rank
        self.peer_label = label
        self._send_seq = 1
        self._recv_seq = first_recv
        self._loop = asyncio.get_running_loop()
        self._reader = asyncio.ensure_future(self._read())

    async def first(self) -> dict[str, Any]:
        """Nothing to do: the reader task posts from frame 1 on (kept for symmetry)."""
        return await self.recv()

    async def _read(self) -> None:
        try:
            while True:
                _header, payload = await self.link.post(self._recv_seq)
                self._recv_seq += 1
                self._inbox.put_nowait(decode(payload, sender=self.peer_rank))
        except asyncio.CancelledError:
            self._inbox.put_nowait(
                PeerLostError([], f"control channel to {self.peer_label} closed")
            )
            raise
        except PeerLostError as exc:
            self._inbox.put_nowait(
                PeerLostError(exc.ranks, f"control channel to {self.peer_label}: {exc.detail}")
            )
        except P2PDLError as exc:
            self.link.close()
            self._inbox.put_nowait(exc)

    async def send(self, message: dict[str, Any]) -> None:
        if self.lost is not None:
            raise self.lost
        data = encode(message)
        seq = self._send_seq
        self._send_seq += 1
        self.sent[message["k"]] += 1
        self.last_sent = self._loop.time()
        # Link.send writes synchronously before its first await, so frames leave in seq order.
        await self.link.send({"t": seq}, memoryview(data))

    def close(self) -> None:
        self._reader.cancel()
        self.link.close()


class LocalChannel(Channel):
    """The in-process channel between the leader and the worker on the same node."""

    peer_label = "local"

    def __init__(self) -> None:
        super().__init__()
        self.other: LocalChannel | None = None

    @classmethod
    def pair(cls) -> tuple[LocalChannel, LocalChannel]:
        a, b = cls(), cls()
        a.other, b.other = b, a
        return a, b

    async def send(self, message: dict[str, Any]) -> None:
        if self.lost is not None:
            raise self.lost
        assert self.other is not None
        check(message)
        self.sent[message["k"]] += 1
        self.other._inbox.put_nowait(message)

    def close(self) -> None:
        if self.other is not None and self.other.lost is None:
            with contextlib.suppress(Exception):
                self.other._inbox.put_nowait(PeerLostError([], "local channel closed"))

    def counted(self) -> int:
        return 0  # in-process: no network messages

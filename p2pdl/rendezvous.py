"""Finding the cluster through a leader, and the control channels a leader keeps with joiners.

The one join protocol: a node that knows only the leader's address dials the leader's
listener and authenticates with a join handshake (claimed rank -1); the authenticated link
becomes a `ControlChannel` (ordered, size-limited msgpack maps with a kind `"k"`), and the
joiner's first message says where it listens and which rank it must have, if any::

    joiner → leader   {"k": "join", "addr": [host, port], "rank": int | None}

From there the leader decides what the channel carries:

* plain rendezvous (`lead_rendezvous`): once `world_size - 1` nodes have joined, each gets
  ``{"k": "table", "rank": r, "peers": [[host, port], ...]}`` and the channels close; a
  joiner whose rank is taken or out of range gets ``{"k": "refuse", "reason": ...}``;
* a training job (`p2pdl.schedule`): the channel stays open for the job's control messages.

Every node advertises the port it really listens on, so port 0 works everywhere.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from p2pdl.config import Limits, Timeouts
from p2pdl.errors import (
    CollectiveTimeoutError,
    ConfigError,
    P2PDLError,
    PeerLostError,
    ProtocolError,
)
from p2pdl.mesh import Listener, dial_authenticated
from p2pdl.transport import Credentials, Link
from p2pdl.wire import MAX_MESSAGE, unpack_message

log = logging.getLogger("p2pdl.rendezvous")

__all__ = [
    "Channel",
    "ControlChannel",
    "JoinDesk",
    "LocalChannel",
    "assign_ranks",
    "dial_leader",
    "lead_rendezvous",
    "parse_join",
    "parse_table",
]


# ------------------------------------------------------------------------------ channels
class Channel:
    """One end of a control channel: ordered, reliable, typed messages (maps with a "k")."""

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


def _checked(message: object, sender: str) -> dict[str, Any]:
    if not isinstance(message, dict) or not isinstance(message.get("k"), str):
        raise ProtocolError(f"control message from {sender} is not a map with a kind")
    return message


class ControlChannel(Channel):
    """A control channel over one authenticated link (frame i has tag i, both ways).

    Messages are msgpack payloads decoded with explicit limits (`max_message` bytes, no
    extension types); anything else fails the channel with `ProtocolError`.
    """

    def __init__(
        self,
        link: Link,
        *,
        label: str = "peer",
        peer_rank: int | None = None,
        max_message: int = MAX_MESSAGE,
    ) -> None:
        super().__init__()
        self.link = link
        self.peer_rank = peer_rank
        self.peer_label = label
        self.max_message = max_message
        self._send_seq = 1
        self._recv_seq = 1
        self._loop = asyncio.get_running_loop()
        self._reader = asyncio.ensure_future(self._read())

    @property
    def local_host(self) -> str | None:
        """This end's address on the connection (what a wildcard listener is reached at)."""
        return self.link.local_host()

    def _size_check(self, _header: dict[str, Any], size: int) -> None:
        if size > self.max_message:
            raise ProtocolError(
                f"control message of {size} bytes exceeds the limit {self.max_message}",
                rank=self.peer_rank,
            )

    async def _read(self) -> None:
        try:
            while True:
                _header, payload = await self.link.post(
                    self._recv_seq, None, self._size_check, limit=self.max_message
                )
                self._recv_seq += 1
                message = unpack_message(payload, max_bytes=self.max_message)
                self._inbox.put_nowait(_checked(message, self.peer_label))
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
            self._inbox.put_nowait(ProtocolError(str(exc), rank=self.peer_rank))

    async def send(self, message: dict[str, Any]) -> None:
        if self.lost is not None:
            raise self.lost
        import msgpack

        data = msgpack.packb(message, use_bin_type=True)
        if len(data) > self.max_message:
            raise ValueError(f"control message of {len(data)} bytes exceeds {self.max_message}")
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
    """An in-process channel with the same interface (the leader node's own worker)."""

    peer_label = "local"

    def __init__(self, check: Callable[[dict[str, Any]], Any] | None = None) -> None:
        super().__init__()
        self.other: LocalChannel | None = None
        self._check = check

    @classmethod
    def pair(
        cls, check: Callable[[dict[str, Any]], Any] | None = None
    ) -> tuple[LocalChannel, LocalChannel]:
        a, b = cls(check), cls(check)
        a.other, b.other = b, a
        return a, b

    async def send(self, message: dict[str, Any]) -> None:
        if self.lost is not None:
            raise self.lost
        assert self.other is not None
        if self._check is not None:
            self._check(message)
        self.sent[message["k"]] += 1
        self.other._inbox.put_nowait(message)

    def close(self) -> None:
        if self.other is not None and self.other.lost is None:
            with contextlib.suppress(Exception):
                self.other._inbox.put_nowait(PeerLostError([], "local channel closed"))


# --------------------------------------------------------------------------- join desk
class JoinDesk:
    """The leader's side of the join protocol: authenticated join links become channels.

    Attach it to the listener; `accept()` hands out channels in arrival order. A join that
    fails authentication never gets here: it changes nothing (the listener counts it).
    """

    def __init__(self, listener: Listener, *, max_message: int = MAX_MESSAGE) -> None:
        self.listener = listener
        self.max_message = max_message
        self._arrivals: asyncio.Queue[ControlChannel] = asyncio.Queue()
        listener.join_handler = self._on_join

    async def _on_join(self, link: Link, _hello: dict[str, Any]) -> None:
        self._arrivals.put_nowait(
            ControlChannel(link, label="a joining node", max_message=self.max_message)
        )

    async def accept(self) -> ControlChannel:
        """The next joiner's channel (wrap in a deadline)."""
        return await self._arrivals.get()

    def close(self) -> None:
        """Take no more joins; channels not yet accepted are closed."""
        if self.listener.join_handler == self._on_join:
            self.listener.join_handler = None
        while not self._arrivals.empty():
            self._arrivals.get_nowait().close()


def parse_join(message: dict[str, Any]) -> tuple[tuple[str, int], int | None]:
    """(address, required rank) of a `join` message; ProtocolError if malformed."""
    address, rank = message.get("addr"), message.get("rank")
    if (
        message.get("k") != "join"
        or not isinstance(address, list)
        or len(address) != 2
        or not isinstance(address[0], str)
        or not 0 < len(address[0]) <= 255
        or isinstance(address[1], bool)
        or not isinstance(address[1], int)
        or not 0 < address[1] <= 65535
        or (rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)))
    ):
        raise ProtocolError(f"malformed join message: {str(message)[:200]}")
    return (address[0], address[1]), rank


async def dial_leader(
    leader: tuple[str, int],
    listen_address: tuple[str, int],
    rank: int | None,
    creds: Credentials,
    limits: Limits,
    deadline: float,
) -> ControlChannel:
    """Join through the leader: the authenticated control channel, its `join` message sent.

    Everything but success is retried until `deadline` (the leader may start later, or be
    busy turning a flood of other connections away).
    """
    link = await dial_authenticated(
        leader[0], leader[1], creds, limits, deadline, rank=-1, expect=0, extra={"join": True}
    )
    channel = ControlChannel(link, label="the leader", peer_rank=0)
    host, port = listen_address
    if host in ("", "0.0.0.0", "::"):
        host = channel.local_host or host
    await channel.send({"k": "join", "addr": [host, port], "rank": rank})
    return channel


# ---------------------------------------------------------------------- plain rendezvous
def assign_ranks(world_size: int, required: list[int | None]) -> list[int]:
    """Ranks 1..world_size-1 for joiners in arrival order: required ones as given (they are
    distinct and in range: `lead_rendezvous` refused the others), the rest in order."""
    taken = {r for r in required if r is not None}
    free = iter(r for r in range(1, world_size) if r not in taken)
    return [r if r is not None else next(free) for r in required]


async def lead_rendezvous(
    desk: JoinDesk, world_size: int, own_address: tuple[str, int], timeouts: Timeouts
) -> list[tuple[str, int]]:
    """Wait for `world_size - 1` joiners, assign ranks, send the table; returns the peers.

    A joiner that is malformed, asks for a rank that is taken or out of range, or leaves
    before the cluster is complete is turned away without harming the others.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeouts.connect
    joined: list[tuple[ControlChannel, tuple[str, int], int | None]] = []
    try:
        while True:
            # A joiner that left before the table went out is replaced by a later one.
            joined = [j for j in joined if j[0].link.lost is None]
            if len(joined) == world_size - 1:
                break
            try:
                async with asyncio.timeout_at(deadline):
                    channel = await desk.accept()
                    message = await channel.recv()
            except TimeoutError:
                listener = desk.listener
                refused = list(listener.refusals)
                raise CollectiveTimeoutError(
                    "rendezvous at the leader",
                    timeouts.connect,
                    [],
                    detail=(
                        f" ({len(joined)} of {world_size - 1} joined; "
                        f"{listener.rejected} connection(s) turned away, the latest: "
                        f"{'; '.join(refused[-3:])})"
                        if refused
                        else f" ({len(joined)} of {world_size - 1} joined)"
                    ),
                ) from None
            except (PeerLostError, ProtocolError) as exc:
                log.warning("rendezvous: dropping a joiner: %s", exc)
                continue
            try:
                address, rank = parse_join(message)
            except ProtocolError as exc:
                log.warning("rendezvous: %s", exc)
                channel.close()
                continue
            taken = {r for _, _, r in joined if r is not None}
            if rank is not None and (not 0 < rank < world_size or rank in taken):
                why = "is taken" if rank in taken else f"is outside 1..{world_size - 1}"
                with contextlib.suppress(P2PDLError):
                    await channel.send({"k": "refuse", "reason": f"rank {rank} {why}"})
                channel.close()
                continue
            joined.append((channel, address, rank))
        ranks = assign_ranks(world_size, [rank for _, _, rank in joined])
        peers: list[tuple[str, int]] = [own_address] * world_size
        for (_channel, address, _rank), rank in zip(joined, ranks, strict=True):
            peers[rank] = address
        table = [list(p) for p in peers]
        for (channel, _address, _rank), rank in zip(joined, ranks, strict=True):
            try:
                await channel.send({"k": "table", "rank": rank, "peers": table})
            except P2PDLError as exc:
                raise PeerLostError(
                    [rank], f"the joiner for rank {rank} left during the rendezvous: {exc}"
                ) from None
        return peers
    finally:
        for channel, _address, _rank in joined:
            channel.close()


async def join_rendezvous(channel: Channel, deadline: float) -> tuple[int, list[tuple[str, int]]]:
    """The joiner's side of a plain rendezvous: wait for the table; (rank, peers)."""
    loop = asyncio.get_running_loop()
    allowed = max(0.0, deadline - loop.time())
    try:
        async with asyncio.timeout_at(deadline):
            message = await channel.recv()
    except TimeoutError:
        raise CollectiveTimeoutError("joining through the leader", allowed, [0]) from None
    finally:
        channel.close()
    return parse_table(message)


def parse_table(message: dict[str, Any]) -> tuple[int, list[tuple[str, int]]]:
    """(rank, peers) from the leader's table message, or the leader's refusal as an error."""
    kind = message.get("k")
    if kind == "refuse":
        raise ConfigError(f"the leader refused the join: {str(message.get('reason'))[:200]}")
    if kind == "job":
        raise ConfigError(
            "the leader runs a training job; join it with `python -m p2pdl node --leader "
            "host:port` (a job worker), not as a plain node"
        )
    rank, peers = message.get("rank"), message.get("peers")
    if (
        kind != "table"
        or isinstance(rank, bool)
        or not isinstance(rank, int)
        or not isinstance(peers, list)
        or not 0 <= rank < len(peers)
        or not all(
            isinstance(p, list)
            and len(p) == 2
            and isinstance(p[0], str)
            and isinstance(p[1], int)
            and not isinstance(p[1], bool)
            for p in peers
        )
    ):
        raise ProtocolError("malformed peer table from the leader", rank=0)
    return rank, [(h, p) for h, p in peers]

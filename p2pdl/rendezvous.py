"""Rendezvous through a leader: nodes that only know the leader's address get ranks and peers.

The leader (rank 0) takes authenticated join requests on its ordinary listener; once
`world_size - 1` nodes have joined it assigns ranks (a requested rank is honoured when it is
free) and hands every node the peer table. The nodes then build the mesh as in static mode.
Every node advertises the port it really listens on, so port 0 works everywhere.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from p2pdl.config import Limits, Timeouts
from p2pdl.errors import (
    AuthenticationError,
    CollectiveTimeoutError,
    ConfigError,
    P2PDLError,
    ProtocolError,
)
from p2pdl.mesh import Listener, dial
from p2pdl.transport import Credentials, Link, dial_handshake

log = logging.getLogger("p2pdl.rendezvous")

TABLE_TAG = 1


def assign_ranks(world_size: int, wanted: list[int | None]) -> list[int]:
    """Ranks 1..world_size-1 for joiners in arrival order; valid, unclaimed wishes first."""
    free = set(range(1, world_size))
    result: list[int | None] = [None] * len(wanted)
    for index, want in enumerate(wanted):
        if want is not None and want in free:
            result[index] = want
            free.discard(want)
    remaining = sorted(free)
    return [r if r is not None else remaining.pop(0) for r in result]


class RendezvousLeader:
    """Collects join requests until the cluster is complete, then sends the peer table."""

    def __init__(self, listener: Listener, world_size: int) -> None:
        self.listener = listener
        self.world_size = world_size
        self._joined: list[tuple[Link, tuple[str, int], int | None]] = []
        self._complete: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        listener.join_handler = self._on_join
        listener.on_join_refused = self._on_refused

    async def _on_join(self, link: Link, hello: dict[str, Any]) -> None:
        address = hello.get("addr")
        want = hello.get("want_rank")
        if (
            not isinstance(address, list)
            or len(address) != 2
            or not isinstance(address[0], str)
            or not isinstance(address[1], int)
        ):
            log.warning("join request without a usable address: %r", address)
            link.close()
            return
        if self._complete.done():
            link.send_nowait({"t": TABLE_TAG, "error": "the cluster is already complete"})
            link.close()
            return
        if want is not None and (not isinstance(want, int) or want == 0):
            want = None
        self._joined.append((link, (address[0], address[1]), want))
        link.on_lost = self._on_lost
        if len(self._joined) == self.world_size - 1:
            self._complete.set_result(None)

    def _on_refused(self, error: AuthenticationError) -> None:
        # Fix: a joiner that fails authentication fails the rendezvous on the leader too.
        if not self._complete.done():
            self._complete.set_exception(error)

    def _on_lost(self, link: Link) -> None:
        if not self._complete.done():
            self._joined = [entry for entry in self._joined if entry[0] is not link]

    async def run(self, own_address: tuple[str, int], deadline: float) -> list[tuple[str, int]]:
        """Wait for the joiners, assign ranks, send the table; returns peers in rank order."""
        if self.world_size > 1:
            # Fix: the reported timeout used to be computed after the deadline had passed
            # (so it read "after -0.003s"); measure the allowance before waiting.
            allowed = deadline - asyncio.get_running_loop().time()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._complete
            except TimeoutError:
                raise CollectiveTimeoutError("rendezvous at the leader", allowed, []) from None
            finally:
                self.listener.on_join_refused = None
        ranks = assign_ranks(self.world_size, [want for _, _, want in self._joined])
        peers: list[tuple[str, int]] = [own_address] * self.world_size
        for (_link, address, _want), rank in zip(self._joined, ranks, strict=True):
            peers[rank] = address
        table = [list(p) for p in peers]
        for (link, _address, _want), rank in zip(self._joined, ranks, strict=True):
            try:
                await link.send({"t": TABLE_TAG, "rank": rank, "peers": table})
            except P2PDLError as exc:
                raise ProtocolError(
                    f"joiner for rank {rank} left during rendezvous: {exc}"
                ) from None
        self.listener.join_handler = None
        return peers


async def join_cluster(
    leader: tuple[str, int],
    listen_address: tuple[str, int],
    creds: Credentials,
    limits: Limits,
    timeouts: Timeouts,
    want_rank: int | None,
) -> tuple[int, list[tuple[str, int]]]:
    """Join through the leader; returns (rank, peers in rank order)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeouts.connect
    link = await dial(leader[0], leader[1], limits, deadline, label="the leader")
    try:
        async with asyncio.timeout_at(deadline):
            host, port = listen_address
            if host in ("", "0.0.0.0", "::"):
                host = link._transport.get_extra_info("sockname")[0] if link._transport else host
            await dial_handshake(
                link,
                creds,
                -1,
                0,
                {"join": True, "addr": [host, port], "want_rank": want_rank},
            )
            header, _ = await link.post(TABLE_TAG)
    except TimeoutError:
        raise CollectiveTimeoutError("joining through the leader", timeouts.connect, [0]) from None
    finally:
        link.close()
    return parse_table(header)


def parse_table(header: dict[str, Any]) -> tuple[int, list[tuple[str, int]]]:
    """(rank, peers) from the leader's table frame, or the leader's refusal as an error."""
    if "error" in header:
        raise ConfigError(f"the leader refused the join: {header['error']}")
    rank, peers = header.get("rank"), header.get("peers")
    if (
        not isinstance(rank, int)
        or not isinstance(peers, list)
        or not 0 <= rank < len(peers)
        or not all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], int)
            for p in peers
        )
    ):
        raise ProtocolError("malformed peer table from the leader", rank=0)
    return rank, [(h, p) for h, p in peers]

"""`Node`: one rank of a p2pdl cluster, for asyncio programs — a facade over its session.

    async with p2pdl.Node(rank=0, peers=[("127.0.0.1", 29500), ...], secret=b"...") as node:
        await node.allreduce(array)

A node listens, finds its peers (static table, a leader to join, or the environment: see
`NodeConfig`), forms the session of membership epoch 0 and offers the collectives over the
current session. A reconfiguration (`enter`: the job runtime's epochs) replaces the session
through the one path every session is formed by. The node does not pick the event loop:
entry points do (uvloop in the CLI and examples).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from p2pdl.collectives.api import Collectives
from p2pdl.collectives.compute import Compute
from p2pdl.collectives.context import OnSlice
from p2pdl.config import Limits, NodeConfig, Timeouts
from p2pdl.membership import Membership
from p2pdl.rendezvous import ControlChannel, JoinDesk
from p2pdl.session import Endpoint, Session

__all__ = ["Node"]

log = logging.getLogger("p2pdl.node")


class Node:
    """One rank: an endpoint and its current session, as an async context manager.

    `Node(rank, peers, **settings)`, `Node(config=NodeConfig(...))` or `Node.from_env()`;
    the settings are `NodeConfig`'s fields.
    """

    def __init__(
        self,
        rank: int | None = None,
        peers: Any = None,
        *,
        config: NodeConfig | None = None,
        **settings: Any,
    ) -> None:
        if rank is not None:
            settings["rank"] = rank
        if peers is not None:
            settings["peers"] = peers
        self.config = NodeConfig.build(config, **settings)
        self.endpoint = Endpoint(self.config)
        self._session: Session | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **settings: Any) -> Node:
        """A node configured from P2PDL_* (or torchrun's) variables; `settings` win."""
        return cls(config=NodeConfig.from_env(os.environ if env is None else env, **settings))

    @property
    def timeouts(self) -> Timeouts:
        return self.config.timeouts

    @property
    def limits(self) -> Limits:
        return self.config.limits

    # ------------------------------------------------------------------------ lifecycle
    async def listen(self, on_listening: Callable[[tuple[str, int]], None] | None = None) -> Any:
        """Start listening; `on_listening(address)` is told the real address at once (a
        leader on port 0 uses it to tell the others where it is)."""
        address = await self.endpoint.open()
        if on_listening is not None:
            on_listening(address)
        return address

    async def start(self, on_listening: Callable[[tuple[str, int]], None] | None = None) -> Node:
        """Listen, find the peers, and form the session of membership epoch 0."""
        try:
            await self.listen(on_listening)
            membership, rank = await self.endpoint.bootstrap()
            await self.enter(membership, rank)
        except BaseException:
            await self.close()
            raise
        return self

    async def enter(
        self,
        membership: Membership,
        rank: int,
        *,
        deadline: float | None = None,
        compute: Compute | None = None,
    ) -> Session:
        """Leave the current session (if any) and form the one of `membership`."""
        await self.leave()
        self._session = await self.endpoint.form(
            membership, rank, deadline=deadline, compute=compute
        )
        return self._session

    async def leave(self) -> None:
        """Close the current session (links and shared memory); keep listening."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def close(self) -> None:
        """Close the session politely and stop listening; pending operations fail with
        PeerLostError."""
        try:
            await self.leave()
        finally:
            await self.endpoint.close()

    async def __aenter__(self) -> Node:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -------------------------------------------------------------------- joining (jobs)
    def join_desk(self) -> JoinDesk:
        """Take join requests (a job leader): each joiner becomes a control channel."""
        return self.endpoint.join_desk()

    async def dial_leader(self, deadline: float) -> ControlChannel:
        """Join the configured leader; the control channel, with the join message sent."""
        return await self.endpoint.dial_leader(self.config.rank, deadline)

    # ----------------------------------------------------------------------- identity
    @property
    def session(self) -> Session:
        if self._session is None:
            raise RuntimeError("use the node inside 'async with' (or after await node.start())")
        return self._session

    @property
    def has_session(self) -> bool:
        return self._session is not None

    @property
    def collectives(self) -> Collectives:
        """The current session's collectives."""
        return self.session.collectives

    @property
    def rank(self) -> int:
        if self._session is not None:
            return self._session.rank
        if self.config.mode != "join" and self.config.rank is not None:
            return self.config.rank
        raise RuntimeError("the node has not joined its cluster yet")

    @property
    def world_size(self) -> int:
        if self._session is not None:
            return self._session.world_size
        if self.config.world_size is None:
            raise RuntimeError("the node has not joined its cluster yet")
        return self.config.world_size

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) this node actually listens on."""
        return self.endpoint.address

    # -------------------------------------------------------------------- collectives
    async def allreduce(
        self,
        array: Any,
        op: str = "sum",
        algorithm: str = "auto",
        *,
        compression: str | None = None,
        on_slice: OnSlice | None = None,
        on_chunk: OnSlice | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Sum or average `array` (or a list of local buffers) across ranks, in place.

        Every algorithm sums in a fixed order, so results are bit-identical on every rank
        and from run to run.
        """
        await self.collectives.allreduce(
            array,
            op=op,
            algorithm=algorithm,
            compression=compression,
            on_slice=on_slice,
            on_chunk=on_chunk,
            timeout=timeout,
        )
        return array

    async def reduce_scatter(
        self,
        array: Any,
        op: str = "sum",
        *,
        on_slice: OnSlice | None = None,
        timeout: float | None = None,
    ) -> tuple[int, int]:
        """Reduce into this rank's slice of `array`; returns that slice's (start, stop)."""
        return await self.collectives.reduce_scatter(
            array, op=op, on_slice=on_slice, timeout=timeout
        )

    async def allgather(self, array: Any, *, timeout: float | None = None) -> Any:
        """Copy every rank's slice of `array` to every rank, in place."""
        await self.collectives.allgather(array, timeout=timeout)
        return array

    async def broadcast(self, array: Any, root: int = 0, *, timeout: float | None = None) -> Any:
        """Copy `array` from `root` to every rank, in place."""
        await self.collectives.broadcast(array, root=root, timeout=timeout)
        return array

    async def barrier(self, *, timeout: float | None = None) -> None:
        """Wait until every rank has reached the barrier."""
        await self.collectives.barrier(timeout=timeout)

"""Sessions: one membership epoch of one node — its links, collectives, hosts, shared memory.

A node's `Endpoint` (its listener and credentials) outlives membership epochs; each epoch is
a `Session` formed through `Endpoint.form`, the one code path for every way a cluster comes
together: a static peer table, a plain rendezvous, and every epoch of a training job (the
first one, one after a failure, one that admits joiners). Closing a session closes its links
politely and releases its shared memory; the endpoint keeps listening for the next one.

Nothing above this layer sees a link, a mesh or a transport: `Node` wraps the current
session, and the job runtime drives sessions through `Node`.
"""

from __future__ import annotations

import asyncio
import logging

from p2pdl.collectives.api import Collectives
from p2pdl.collectives.compute import Compute
from p2pdl.config import NodeConfig
from p2pdl.errors import P2PDLError
from p2pdl.membership import Membership, PeerAddress
from p2pdl.mesh import Listener, Mesh
from p2pdl.rendezvous import (
    ControlChannel,
    JoinDesk,
    dial_leader,
    join_rendezvous,
    lead_rendezvous,
)
from p2pdl.transport import Credentials

__all__ = ["Endpoint", "Session", "membership_of"]

log = logging.getLogger("p2pdl.session")


def membership_of(epoch: int, peers: list[tuple[str, int]]) -> Membership:
    """A membership from a peer table in rank order; a rank's host identity is the address
    it advertises (ranks in one network namespace or on one machine share it)."""
    return Membership(
        epoch,
        tuple(PeerAddress(r, host, port, host_id=host) for r, (host, port) in enumerate(peers)),
    )


class Session:
    """One membership epoch on one node: the authenticated mesh and the collectives over it."""

    def __init__(self, membership: Membership, rank: int, mesh: Mesh, collectives: Collectives):
        self.membership = membership
        self.rank = rank
        self.mesh = mesh
        self.collectives = collectives
        self.closed = False

    @property
    def epoch(self) -> int:
        return self.membership.epoch

    @property
    def world_size(self) -> int:
        return self.membership.world_size

    async def close(self) -> None:
        """Close the links politely (queued frames go out first) and release shared memory."""
        if self.closed:
            return
        self.closed = True
        try:
            await self.mesh.close()
        finally:
            self.collectives.close()


class Endpoint:
    """A node's listener and credentials: what stays the same from one session to the next."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.creds = Credentials(config.cluster_id, config.secret, config.encryption)
        self.listener: Listener | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) this node listens on."""
        if self.listener is None:
            raise RuntimeError("the node is not listening yet")
        return self.listener.address

    async def open(self) -> tuple[str, int]:
        """Start listening (port 0 picks a free port); returns the real address."""
        if self.listener is None:
            config = self.config
            listener = Listener(self.creds, config.limits, config.timeouts)
            await listener.start(config.listen_host, config.listen_port)
            self.listener = listener
        return self.listener.address

    def _listening(self) -> Listener:
        if self.listener is None:
            raise RuntimeError("open the endpoint first")
        return self.listener

    # --------------------------------------------------------------------- joining
    def join_desk(self) -> JoinDesk:
        """Take join requests on this endpoint (a leader)."""
        return JoinDesk(self._listening())

    async def dial_leader(self, rank: int | None, deadline: float) -> ControlChannel:
        """Join the configured leader: the control channel, its join message sent."""
        config = self.config
        assert config.leader is not None
        return await dial_leader(
            config.leader, self.address, rank, self.creds, config.limits, deadline
        )

    async def bootstrap(self) -> tuple[Membership, int]:
        """Epoch 0 of a plain cluster, found the configured way; (membership, this rank)."""
        config = self.config
        address = self.address
        loop = asyncio.get_running_loop()
        if config.mode == "static":
            assert config.peers is not None and config.rank is not None
            peers = list(config.peers)
            peers[config.rank] = address
            return membership_of(0, peers), config.rank
        if config.mode == "lead":
            assert config.world_size is not None
            desk = self.join_desk()
            try:
                peers = await lead_rendezvous(desk, config.world_size, address, config.timeouts)
            finally:
                desk.close()
            return membership_of(0, peers), 0
        deadline = loop.time() + config.timeouts.connect
        channel = await self.dial_leader(config.rank, deadline)
        rank, peers = await join_rendezvous(channel, deadline)
        if config.world_size is not None and config.world_size != len(peers):
            raise P2PDLError(
                f"the leader formed a cluster of {len(peers)}, this node expected "
                f"{config.world_size}"
            )
        return membership_of(0, peers), rank

    # --------------------------------------------------------------------- sessions
    async def form(
        self,
        membership: Membership,
        rank: int,
        *,
        deadline: float | None = None,
        compute: Compute | None = None,
    ) -> Session:
        """Authenticate a link to every other member of `membership` and probe what the
        collectives can use; by `deadline` (default: `timeouts.connect` from now)."""
        config = self.config
        listener = self._listening()
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + config.timeouts.connect
        addresses = [(peer.host, peer.port) for peer in membership.peers]
        listener.prepare(membership.epoch, rank, membership.world_size)
        compute = compute or Compute()
        # Large frames are sealed and opened where large reductions run: off the loop.
        mesh = Mesh(
            rank, addresses, listener, config.timeouts, epoch=membership.epoch, offload=compute.run
        )
        collectives = Collectives(
            mesh,
            timeout=config.timeouts.operation,
            chunk_bytes=config.chunk_bytes,
            compute=compute,
            host_ids=[peer.host_id for peer in membership.peers],
        )
        session = Session(membership, rank, mesh, collectives)
        try:
            await mesh.connect(deadline)
            # Ranks that share a host agree now whether shared memory works between them,
            # so `auto` can use it from the first call (nothing when hosts run one rank).
            await collectives.prepare(deadline)
        except BaseException:
            await session.close()
            raise
        return session

    async def close(self) -> None:
        if self.listener is not None:
            await self.listener.close()

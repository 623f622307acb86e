"""`Node`: one rank of a p2pdl cluster, for asyncio programs.

    async with p2pdl.Node(rank=0, peers=[("127.0.0.1", 29500), ...], secret=b"...") as node:
        await node.allreduce(array)

A node listens, finds its peers (static table, a leader to join, or the environment),
authenticates a link to every other rank and then offers the collectives. It does not pick
the event loop: entry points do (uvloop in the CLI and examples).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

from p2pdl.collectives.api import DEFAULT_CHUNK_BYTES, Collectives
from p2pdl.collectives.context import OnSlice
from p2pdl.config import Limits, Timeouts, is_loopback
from p2pdl.errors import ConfigError
from p2pdl.membership import LaunchSettings, Membership, PeerAddress, settings_from_env
from p2pdl.mesh import Listener, Mesh
from p2pdl.rendezvous import RendezvousLeader, join_cluster
from p2pdl.transport import Credentials

log = logging.getLogger("p2pdl.node")


class Node:
    """One rank: listener, mesh and collectives, as an async context manager."""

    def __init__(
        self,
        rank: int | None = None,
        peers: list[tuple[str, int]] | tuple[tuple[str, int], ...] | None = None,
        *,
        secret: bytes | str | None = None,
        leader: tuple[str, int] | None = None,
        world_size: int | None = None,
        host: str | None = None,
        port: int | None = None,
        cluster_id: str = "p2pdl",
        insecure: bool = False,
        timeouts: Timeouts | None = None,
        limits: Limits | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        if isinstance(secret, str):
            secret = secret.encode()
        if secret is not None and len(secret) < 8:
            raise ConfigError("the shared secret must be at least 8 bytes")
        self.timeouts = timeouts or Timeouts()
        self.limits = limits or Limits()
        self.cluster_id = cluster_id
        self._secret = secret
        self._chunk_bytes = chunk_bytes
        if peers is not None:
            peers = tuple((str(h), int(p)) for h, p in peers)
            if rank is None or not 0 <= rank < len(peers):
                raise ConfigError(f"rank {rank!r} is outside 0..{len(peers) - 1}")
            if world_size is not None and world_size != len(peers):
                raise ConfigError(f"world_size {world_size} does not match {len(peers)} peers")
            self._mode = "static"
            host = host if host is not None else peers[rank][0]
            port = port if port is not None else peers[rank][1]
        elif leader is not None:
            self._mode = "join"
        elif world_size is not None:
            self._mode = "lead"
            if rank not in (None, 0):
                raise ConfigError("the leader is always rank 0")
            rank = 0
        else:
            raise ConfigError("give peers (static), leader (join) or world_size (lead)")
        self._peers = peers
        self._leader = leader
        self._want_rank = rank
        self._world_size = world_size if peers is None else len(peers)
        self._host = host if host is not None else "127.0.0.1"
        self._port = port if port is not None else 0
        if secret is None and not insecure and not is_loopback(self._host):
            raise ConfigError(
                f"refusing to listen on {self._host} without a shared secret; "
                "set P2PDL_SECRET or --secret-file, or pass --insecure"
            )
        if self._world_size is not None and self._world_size < 1:
            raise ConfigError(f"world_size must be positive, got {self._world_size}")
        self.listener: Listener | None = None
        self.mesh: Mesh | None = None
        self.collectives: Collectives | None = None
        self.membership: Membership | None = None
        self._rank: int | None = rank if self._mode != "join" else None

    @classmethod
    def from_settings(cls, settings: LaunchSettings, **kwargs: Any) -> Node:
        """A node configured from `settings_from_env` (P2PDL_* or torchrun variables)."""
        kwargs.setdefault("secret", settings.secret)
        kwargs.setdefault("cluster_id", settings.cluster_id)
        if settings.peers is not None:
            if settings.rank is None:
                raise ConfigError("P2PDL_PEERS is set but no rank (P2PDL_RANK or RANK) is")
            return cls(settings.rank, settings.peers, **kwargs)
        if settings.leader is not None:
            if settings.rank == 0:
                if settings.world_size is None:
                    raise ConfigError("rank 0 leads the rendezvous and needs the world size")
                kwargs.setdefault("host", settings.leader[0])
                kwargs.setdefault("port", settings.leader[1])
                return cls(0, world_size=settings.world_size, **kwargs)
            return cls(settings.rank, leader=settings.leader, **kwargs)
        if settings.world_size == 1 or settings.world_size is None:
            return cls(0, world_size=1, **kwargs)
        raise ConfigError("no peers and no leader: set P2PDL_PEERS or P2PDL_LEADER/MASTER_ADDR")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **kwargs: Any) -> Node:
        return cls.from_settings(
            settings_from_env(dict(env if env is not None else os.environ)), **kwargs
        )

    # ------------------------------------------------------------------------ lifecycle
    async def start(self, on_listening: Callable[[tuple[str, int]], None] | None = None) -> Node:
        """Listen, find the peers, and authenticate a link to each of them.

        `on_listening(address)` is called as soon as the real listen address is known
        (before peers are reached): a leader on port 0 uses it to tell others where it is.
        """
        creds = Credentials(self.cluster_id, self._secret)
        listener = Listener(creds, self.limits, self.timeouts)
        self.listener = listener
        address = await listener.start(self._host, self._port)
        if on_listening is not None:
            on_listening(address)
        loop = asyncio.get_running_loop()
        try:
            if self._mode == "static":
                assert self._peers is not None and self._rank is not None
                peers = list(self._peers)
                peers[self._rank] = address
            elif self._mode == "lead":
                assert self._world_size is not None
                leader = RendezvousLeader(listener, self._world_size)
                peers = await leader.run(address, loop.time() + self.timeouts.connect)
            else:
                assert self._leader is not None
                self._rank, peers = await join_cluster(
                    self._leader, address, creds, self.limits, self.timeouts, self._want_rank
                )
            assert self._rank is not None
            mesh = Mesh(self._rank, peers, listener, self.timeouts)
            self.mesh = mesh
            await mesh.connect()
        except BaseException:
            await self.close()
            raise
        # Host identity: the address a rank advertises (ranks in one network namespace or on
        # one machine share it), which the hierarchical allreduce uses for phase 1.
        self.membership = Membership(
            0, tuple(PeerAddress(r, h, p, host_id=h) for r, (h, p) in enumerate(peers))
        )
        self.collectives = Collectives(
            mesh,
            timeout=self.timeouts.operation,
            chunk_bytes=self._chunk_bytes,
            host_ids=[peer.host_id for peer in self.membership.peers],
        )
        # Ranks that share a host agree now whether shared memory works between them, so
        # `auto` can use it from the first call (a collective; nothing when every host
        # runs one rank).
        try:
            await self.collectives.prepare()
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        """Close every link and stop listening; pending operations fail with PeerLostError."""
        if self.mesh is not None:
            await self.mesh.close()
        if self.listener is not None:
            await self.listener.close()
        if self.collectives is not None:
            self.collectives.close()

    async def __aenter__(self) -> Node:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ----------------------------------------------------------------------- identity
    @property
    def rank(self) -> int:
        if self._rank is None:
            raise RuntimeError("the node has not joined its cluster yet")
        return self._rank

    @property
    def world_size(self) -> int:
        if self.mesh is not None:
            return self.mesh.world_size
        if self._world_size is None:
            raise RuntimeError("the node has not joined its cluster yet")
        return self._world_size

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) this node actually listens on."""
        if self.listener is None:
            raise RuntimeError("the node is not listening yet")
        return self.listener.address

    def _ready(self) -> Collectives:
        if self.collectives is None:
            raise RuntimeError("use the node inside 'async with' (or after await node.start())")
        return self.collectives

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
        deterministic: bool = True,
    ) -> Any:
        """Sum or average `array` (or a list of local buffers) across ranks, in place.

        Every algorithm sums in a fixed order, so results are bit-identical on every rank
        and from run to run; `deterministic` is accepted for API stability.
        """
        del deterministic
        await self._ready().allreduce(
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
        return await self._ready().reduce_scatter(array, op=op, on_slice=on_slice, timeout=timeout)

    async def allgather(self, array: Any, *, timeout: float | None = None) -> Any:
        """Copy every rank's slice of `array` to every rank, in place."""
        await self._ready().allgather(array, timeout=timeout)
        return array

    async def broadcast(self, array: Any, root: int = 0, *, timeout: float | None = None) -> Any:
        """Copy `array` from `root` to every rank, in place."""
        await self._ready().broadcast(array, root=root, timeout=timeout)
        return array

    async def barrier(self, *, timeout: float | None = None) -> None:
        """Wait until every rank has reached the barrier."""
        await self._ready().barrier(timeout=timeout)

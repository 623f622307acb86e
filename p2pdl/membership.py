"""Who is in the cluster: ranks, addresses and membership epochs, as plain frozen values.

How a node finds its peers is `p2pdl.config.NodeConfig` (static table, leader, environment)
and `p2pdl.rendezvous` (the join protocol).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PeerAddress:
    """Where one rank listens, and which host it runs on (ranks on one host are local)."""

    rank: int
    host: str
    port: int
    host_id: str = ""

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Membership:
    """One epoch of the cluster: the peers in rank order. A new epoch means new ranks."""

    epoch: int
    peers: tuple[PeerAddress, ...]

    def __post_init__(self) -> None:
        for index, peer in enumerate(self.peers):
            if peer.rank != index:
                raise ValueError(f"peer at position {index} has rank {peer.rank}")

    @property
    def world_size(self) -> int:
        return len(self.peers)

    @property
    def ranks(self) -> range:
        return range(len(self.peers))

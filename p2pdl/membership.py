"""Who is in the cluster: ranks, addresses, membership epochs, and where settings come from.

The dataclasses here are plain values; rendezvous through a leader lives at the bottom and
only uses the transport's control connections.
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


# ------------------------------------------------------------------------ settings sources
def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    """'host:port' (or '[v6]:port') → (host, port), with a ConfigError naming `what`."""
    from p2pdl.errors import ConfigError

    host, sep, port_text = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{what} must look like host:port, got {text!r}")
    return host, int(port_text)


def parse_peers(text: str) -> tuple[tuple[str, int], ...]:
    """A comma-separated host:port list in rank order."""
    from p2pdl.errors import ConfigError

    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise ConfigError("the peer list is empty")
    return tuple(parse_address(item, f"peer {i}") for i, item in enumerate(items))


@dataclass(frozen=True, slots=True)
class LaunchSettings:
    """Where a node's identity comes from: a static peer table or a leader to join."""

    rank: int | None
    world_size: int | None
    peers: tuple[tuple[str, int], ...] | None
    leader: tuple[str, int] | None
    secret: bytes | None
    cluster_id: str


def settings_from_env(env: dict[str, str]) -> LaunchSettings:
    """Read P2PDL_* variables, falling back to torchrun's RANK/WORLD_SIZE/MASTER_*."""
    from p2pdl.errors import ConfigError

    def integer(name: str) -> int | None:
        value = env.get(name)
        if value is None or value == "":
            return None
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None

    rank = integer("P2PDL_RANK")
    if rank is None:
        rank = integer("RANK")
    world = integer("P2PDL_WORLD_SIZE")
    if world is None:
        world = integer("WORLD_SIZE")
    peers = parse_peers(env["P2PDL_PEERS"]) if env.get("P2PDL_PEERS") else None
    leader = parse_address(env["P2PDL_LEADER"], "P2PDL_LEADER") if env.get("P2PDL_LEADER") else None
    if leader is None and peers is None and env.get("MASTER_ADDR"):
        port = integer("MASTER_PORT")
        if port is None:
            raise ConfigError("MASTER_ADDR is set but MASTER_PORT is not")
        leader = (env["MASTER_ADDR"], port)
    secret = env.get("P2PDL_SECRET")
    if peers is not None and world is not None and world != len(peers):
        raise ConfigError(f"world size {world} does not match {len(peers)} peers")
    if world is not None and world < 1:
        raise ConfigError(f"world size must be positive, got {world}")
    if rank is not None and world is not None and not 0 <= rank < world:
        raise ConfigError(f"rank {rank} is outside 0..{world - 1}")
    return LaunchSettings(
        rank=rank,
        world_size=world if world is not None else (len(peers) if peers else None),
        peers=peers,
        leader=leader,
        secret=secret.encode() if secret else None,
        cluster_id=env.get("P2PDL_CLUSTER_ID", "p2pdl"),
    )

"""Frozen, validated settings: one place for every deadline and limit a node uses."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from p2pdl.errors import ConfigError

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


def _positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Deadlines in seconds. Each operation computes one deadline from these and passes it down."""

    connect: float = 30.0
    """How long startup may take to reach and authenticate every peer."""
    handshake: float = 5.0
    """How long an unauthenticated connection may take to finish the handshake."""
    operation: float = 60.0
    """Default deadline of one collective (allreduce, broadcast, barrier, …)."""
    shutdown: float = 5.0
    """How long closing may wait for queued writes to drain."""

    def __post_init__(self) -> None:
        for name in ("connect", "handshake", "operation", "shutdown"):
            _positive(f"timeouts.{name}", getattr(self, name))


@dataclass(frozen=True, slots=True)
class Limits:
    """Sizes checked before any allocation on the receive path."""

    max_header: int = 64 * KIB
    """Largest msgpack header a peer may send."""
    max_payload: int = 4 * GIB
    """Largest payload of one frame, whatever buffer is posted."""
    eager_payload: int = 256 * KIB
    """Frames up to this size that arrive before their buffer is posted are kept in memory."""
    eager_budget: int = 16 * MIB
    """Total bytes of early frames kept per connection; beyond it reading pauses instead."""
    handshake_header: int = 1 * KIB
    """Largest header accepted from a peer that has not authenticated yet."""

    def __post_init__(self) -> None:
        for name in ("max_header", "max_payload", "eager_payload", "eager_budget"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"limits.{name} must be a positive integer, got {value!r}")
        if self.max_header > 64 * KIB:
            raise ConfigError("limits.max_header may not exceed 64 KiB")
        if self.eager_payload > self.eager_budget:
            raise ConfigError("limits.eager_payload may not exceed limits.eager_budget")


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything one node needs to join a static cluster of known peers."""

    rank: int
    peers: tuple[tuple[str, int], ...]
    secret: bytes | None = None
    cluster_id: str = "p2pdl"
    host: str | None = None
    """Address to listen on; defaults to this rank's entry in `peers`."""
    port: int | None = None
    """Port to listen on; defaults to this rank's entry in `peers` (0 picks a free one)."""
    insecure: bool = False
    """Allow a non-loopback listen address without a secret."""
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if not self.peers:
            raise ConfigError("peers must list at least this node")
        if not isinstance(self.rank, int) or not 0 <= self.rank < len(self.peers):
            raise ConfigError(f"rank {self.rank!r} is outside 0..{len(self.peers) - 1}")
        for index, peer in enumerate(self.peers):
            if len(peer) != 2 or not isinstance(peer[0], str) or not isinstance(peer[1], int):
                raise ConfigError(f"peer {index} must be (host, port), got {peer!r}")
            if not 0 <= peer[1] <= 65535:
                raise ConfigError(f"peer {index} has port {peer[1]} outside 0..65535")
        if self.secret is not None and not isinstance(self.secret, bytes):
            raise ConfigError("secret must be bytes")
        if self.secret is not None and len(self.secret) < 8:
            raise ConfigError("secret must be at least 8 bytes")
        if not self.cluster_id or len(self.cluster_id) > 128:
            raise ConfigError("cluster_id must be 1..128 characters")
        if self.secret is None and not self.insecure and not is_loopback(self.listen_host):
            raise ConfigError(
                f"refusing to listen on {self.listen_host} without a secret; "
                "set P2PDL_SECRET / --secret-file, or pass --insecure"
            )

    @property
    def world_size(self) -> int:
        return len(self.peers)

    @property
    def listen_host(self) -> str:
        return self.host if self.host is not None else self.peers[self.rank][0]

    @property
    def listen_port(self) -> int:
        return self.port if self.port is not None else self.peers[self.rank][1]


def is_loopback(host: str) -> bool:
    """True for addresses that only this machine can reach."""
    import ipaddress

    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

"""Frozen, validated settings: one place for every deadline, limit and node setting.

`NodeConfig` is the one node configuration type: the CLI, `Node`, `connect()`, the job
runtime and the integrations all build it (from arguments or from the environment with
`NodeConfig.from_env`), and it is validated once, here.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from p2pdl.errors import ConfigError

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

DEFAULT_CHUNK_BYTES = 2 * MIB
"""Wire bytes per frame in `sliced`/`ring`: 2 MiB cut the CPU per 64 MiB allreduce by ~10%
against 1 MiB (fewer frames, wakeups and thread hops) and stays under the kernels'
multi-threading threshold; 256 KiB cost ~50% more CPU (docs/benchmarks.md)."""

MIN_SECRET_BYTES = 16
"""Shortest shared secret accepted (`python -m p2pdl secret` prints a 256-bit one)."""


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
    max_unauthenticated: int = 64
    """Connections in their handshake at once; when more arrive, the oldest is dropped."""

    def __post_init__(self) -> None:
        for name in (
            "max_header",
            "max_payload",
            "eager_payload",
            "eager_budget",
            "handshake_header",
            "max_unauthenticated",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"limits.{name} must be a positive integer, got {value!r}")
        if self.max_header > 64 * KIB:
            raise ConfigError("limits.max_header may not exceed 64 KiB")
        if self.eager_payload > self.eager_budget:
            raise ConfigError("limits.eager_payload may not exceed limits.eager_budget")


# ----------------------------------------------------------------------------- addresses
def route_source(host: str) -> str:
    """This host's address on the route to `host` (a UDP socket's name once "connected":
    nothing is sent); 127.0.0.1 when there is no route. How a joiner picks the interface to
    listen on when told only where its remote leader is."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))
            return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def is_loopback(host: str) -> bool:
    """True for addresses that only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    """'host:port' (or '[v6]:port') → (host, port), with a ConfigError naming `what`."""
    host, sep, port_text = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{what} must look like host:port, got {text!r}")
    return host, int(port_text)


def parse_peers(text: str) -> tuple[tuple[str, int], ...]:
    """A comma-separated host:port list in rank order."""
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise ConfigError("the peer list is empty")
    return tuple(parse_address(item, f"peer {i}") for i, item in enumerate(items))


def _address(value: object, what: str) -> tuple[str, int]:
    if isinstance(value, str):
        return parse_address(value, what)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not isinstance(value[0], str)
        or isinstance(value[1], bool)
        or not isinstance(value[1], int)
    ):
        raise ConfigError(f"{what} must be (host, port) or 'host:port', got {value!r}")
    if not 0 <= value[1] <= 65535:
        raise ConfigError(f"{what} has port {value[1]} outside 0..65535")
    return (value[0], value[1])


def check_secret(secret: object, *, insecure: bool, hosts: Sequence[str]) -> bytes | None:
    """The one secret check: bytes (str is encoded), at least `MIN_SECRET_BYTES`, and
    present — on loopback too: any local user could join otherwise — unless `insecure` is
    asked for explicitly (then one warning names what is exposed)."""
    if isinstance(secret, str):
        secret = secret.encode()
    if secret is not None and not isinstance(secret, bytes):
        raise ConfigError(f"the shared secret must be bytes or str, got {type(secret).__name__}")
    if secret is not None and len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"the shared secret must be at least {MIN_SECRET_BYTES} bytes; "
            "`python -m p2pdl secret` prints a fresh one"
        )
    if secret is None:
        where = ", ".join(dict.fromkeys(hosts))
        if not insecure:
            raise ConfigError(
                f"refusing to use {where} without a shared secret; set P2PDL_SECRET or "
                "--secret-file (`python -m p2pdl secret` makes one), or pass --insecure"
            )
        logging.getLogger("p2pdl").warning(
            "insecure: no shared secret, no authentication and no encryption on %s", where
        )
    return secret


Mode = Literal["static", "lead", "join"]


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """Everything one node needs, validated. Exactly one way of finding the peers:

    * static: `peers` (every rank's host:port, in rank order) and this node's `rank`;
    * lead: `world_size` (and no `peers`/`leader`, or `leader` with `rank=0`, the torchrun
      way: rank 0 listens at the leader address) — this node is rank 0 and takes joins;
    * join: `leader` and a `rank` other than 0 — or no rank at all: the leader assigns one.

    `rank` always means this node's rank; a joiner that names one gets exactly it or fails.
    """

    rank: int | None = None
    world_size: int | None = None
    peers: tuple[tuple[str, int], ...] | None = None
    leader: tuple[str, int] | None = None
    host: str | None = None
    """Address to listen on (default: this rank's peer entry, the leader's, or 127.0.0.1)."""
    port: int | None = None
    """Port to listen on (default: this rank's peer entry or the leader's; else 0, any)."""
    secret: bytes | None = field(default=None, repr=False)
    insecure: bool = False
    """Run without a secret: no authentication, no encryption (say so explicitly)."""
    encryption: bool = True
    """Seal every frame after the handshake; False for trusted fabrics only (every node must
    agree; the handshake stays authenticated)."""
    cluster_id: str = "p2pdl"
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in ("rank", "world_size", "port", "chunk_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        if self.peers is not None:
            if isinstance(self.peers, str):
                set_(self, "peers", parse_peers(self.peers))
            else:
                set_(
                    self,
                    "peers",
                    tuple(_address(p, f"peer {i}") for i, p in enumerate(self.peers)),
                )
        if self.leader is not None:
            set_(self, "leader", _address(self.leader, "leader"))
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is outside 0..65535")
        if self.world_size is not None and self.world_size < 1:
            raise ConfigError(f"world size must be positive, got {self.world_size}")
        if self.chunk_bytes < 64:
            raise ConfigError(f"chunk_bytes must be at least 64, got {self.chunk_bytes}")
        if not isinstance(self.encryption, bool) or not isinstance(self.insecure, bool):
            raise ConfigError("encryption and insecure must be booleans")
        if not isinstance(self.cluster_id, str) or not 0 < len(self.cluster_id) <= 128:
            raise ConfigError("cluster_id must be 1..128 characters")
        if not isinstance(self.timeouts, Timeouts) or not isinstance(self.limits, Limits):
            raise ConfigError("timeouts and limits must be Timeouts and Limits values")
        peers, rank, world = self.peers, self.rank, self.world_size
        if peers is not None:
            if self.leader is not None:
                raise ConfigError("give peers (static) or a leader (rendezvous), not both")
            if not peers:
                raise ConfigError("peers must list at least this node")
            if rank is None or not 0 <= rank < len(peers):
                raise ConfigError(f"rank {rank!r} is outside 0..{len(peers) - 1}")
            if world is not None and world != len(peers):
                raise ConfigError(f"world size {world} does not match {len(peers)} peers")
            set_(self, "world_size", len(peers))
        elif self.leader is not None:
            if rank is not None and rank < 0:
                raise ConfigError(f"rank must be >= 0, got {rank}")
            if rank == 0 and world is None:
                raise ConfigError("rank 0 leads the rendezvous and needs the world size")
            if rank is not None and world is not None and rank >= world:
                raise ConfigError(f"rank {rank} is outside 0..{world - 1}")
        elif world is not None:
            if rank not in (None, 0):
                raise ConfigError(
                    f"rank {rank} needs the leader's address (leader=...): the node that "
                    "only knows the world size leads, as rank 0"
                )
            set_(self, "rank", 0)
        else:
            raise ConfigError(
                "no peers and no leader: give peers (static), leader (join) or world_size (lead)"
            )
        dialed = [h for h, _ in peers] if peers is not None else []
        if self.leader is not None and self.mode == "join":
            dialed.append(self.leader[0])
        set_(
            self,
            "secret",
            check_secret(self.secret, insecure=self.insecure, hosts=[self.listen_host, *dialed]),
        )

    @property
    def mode(self) -> Mode:
        if self.peers is not None:
            return "static"
        if self.leader is not None and self.rank != 0:
            return "join"
        return "lead"

    @property
    def listen_host(self) -> str:
        if self.host is not None:
            return self.host
        if self.peers is not None and self.rank is not None:
            return self.peers[self.rank][0]
        if self.leader is not None and self.mode == "lead":
            return self.leader[0]
        if self.leader is not None and not is_loopback(self.leader[0]):
            return route_source(self.leader[0])  # a joiner of a remote leader: reachable
        return "127.0.0.1"

    @property
    def listen_port(self) -> int:
        if self.port is not None:
            return self.port
        if self.peers is not None and self.rank is not None:
            return self.peers[self.rank][1]
        if self.leader is not None and self.mode == "lead":
            return self.leader[1]
        return 0

    def with_(self, **changes: Any) -> NodeConfig:
        """A validated copy with `changes` applied."""
        return replace(self, **changes)

    @classmethod
    def build(cls, config: NodeConfig | None = None, /, **settings: Any) -> NodeConfig:
        """`config` (or defaults) with `settings` applied; unknown names are a ConfigError."""
        unknown = sorted(set(settings) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown node setting(s) {unknown}")
        if config is None:
            return cls(**settings)
        return replace(config, **settings) if settings else config

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> NodeConfig:
        """From P2PDL_* variables, else torchrun's RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT;
        `overrides` win. With nothing set, a cluster of one."""
        values: dict[str, Any] = {}
        rank = _env_int(env, "P2PDL_RANK", "RANK")
        world = _env_int(env, "P2PDL_WORLD_SIZE", "WORLD_SIZE")
        if env.get("P2PDL_PEERS"):
            values["peers"] = parse_peers(env["P2PDL_PEERS"])
        if env.get("P2PDL_LEADER"):
            values["leader"] = parse_address(env["P2PDL_LEADER"], "P2PDL_LEADER")
        elif "peers" not in values and env.get("MASTER_ADDR"):
            port = _env_int(env, "MASTER_PORT")
            if port is None:
                raise ConfigError("MASTER_ADDR is set but MASTER_PORT is not")
            values["leader"] = (env["MASTER_ADDR"], port)
        if rank is not None:
            values["rank"] = rank
        if world is not None:
            values["world_size"] = world
        secret = take_env_secret() if env is os.environ else env.get("P2PDL_SECRET")
        if isinstance(secret, str) and secret:
            secret = secret.encode()
        if secret:
            values["secret"] = secret
        if env.get("P2PDL_HOST"):
            values["host"] = env["P2PDL_HOST"]
        if env.get("P2PDL_CLUSTER_ID"):
            values["cluster_id"] = env["P2PDL_CLUSTER_ID"]
        values.update(overrides)
        if not any(values.get(k) is not None for k in ("peers", "leader", "world_size")):
            values["world_size"] = 1
        return cls(**values)


def take_env_secret() -> bytes | None:
    """P2PDL_SECRET, removed from this process's environment once read (children do not
    inherit it; a second read in the same process sees the value kept here)."""
    global _taken_secret
    value = os.environ.pop("P2PDL_SECRET", None)
    if value:
        _taken_secret = value.encode()
    return _taken_secret


_taken_secret: bytes | None = None


def _env_int(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = env.get(name)
        if value is None or value == "":
            continue
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    return None

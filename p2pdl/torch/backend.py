"""The torch.distributed backend "p2pdl": `init_process_group("p2pdl")` on a p2pdl node.

`import p2pdl.torch` registers it. For each process group torch creates (the world, and
every `new_group`), each member rank:

1. starts a p2pdl node listening on an ephemeral port of the interface that reaches the
   rendezvous (MASTER_ADDR, a TCPStore's host; `P2PDL_HOST` overrides);
2. publishes host:port in the group's store (never the secret) and reads every member's;
3. forms the static mesh of that table (the one session path, `Node.enter`).

The secret comes from `P2PDL_SECRET`; without it the backend refuses to start unless
`P2PDL_INSECURE=1` asks for an unauthenticated, unencrypted mesh. The group's timeout
(`init_process_group(timeout=...)`) bounds the rendezvous and is every collective's default
deadline. `destroy_process_group` closes the nodes.
"""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from p2pdl.config import NodeConfig, Timeouts, is_loopback, route_source, take_env_secret
from p2pdl.errors import CollectiveTimeoutError, ConfigError
from p2pdl.node import Node
from p2pdl.session import membership_of
from p2pdl.sync import SyncNode
from p2pdl.torch.process_group import BACKEND_NAME, P2PDLProcessGroup

__all__ = ["BACKEND_NAME", "create_process_group", "listen_host", "register"]

ADDRESS_KEY = "p2pdl/address/{rank}"


def _unwrap_store(store: Any) -> Any:
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return store


def listen_host(store: Any = None, env: Any = None) -> str:
    """The address this rank's node listens on: P2PDL_HOST, else the local interface that
    routes to MASTER_ADDR (or to a TCPStore's host), else loopback."""
    env = os.environ if env is None else env
    if env.get("P2PDL_HOST"):
        return str(env["P2PDL_HOST"])
    target = env.get("MASTER_ADDR")
    base = _unwrap_store(store)
    if not target and isinstance(base, dist.TCPStore):
        target = base.host
    if not target or is_loopback(target):
        return "127.0.0.1"
    return route_source(target)


def _secret() -> tuple[bytes | None, bool]:
    insecure = os.environ.get("P2PDL_INSECURE", "") not in ("", "0")
    secret = take_env_secret()
    if secret is None and not insecure:
        raise ConfigError(
            "the p2pdl torch backend needs a shared secret: set P2PDL_SECRET on every rank "
            "(`python -m p2pdl secret` prints one; `python -m p2pdl launch` sets one), or "
            "set P2PDL_INSECURE=1 for an unauthenticated, unencrypted mesh"
        )
    return secret, insecure


class _StoreNode(Node):
    """A node whose peer table comes from torch's store: listen, publish, read, form."""

    def __init__(self, config: NodeConfig, store: Any, timeout: float) -> None:
        super().__init__(config=config)
        self._store = store
        self._rendezvous_timeout = timeout

    async def start(self, on_listening: Any = None) -> Node:
        try:
            host, port = await self.listen(on_listening)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._rendezvous_timeout
            peers = await loop.run_in_executor(None, self._exchange, f"{host}:{port}")
            await self.enter(membership_of(0, peers), self.config.rank or 0, deadline=deadline)
        except BaseException:
            await self.close()
            raise
        return self

    def _exchange(self, address: str) -> list[tuple[str, int]]:
        """Publish this rank's address and read every member's (blocking store calls)."""
        store, n = self._store, self.config.world_size or 1
        store.set(ADDRESS_KEY.format(rank=self.config.rank), address)
        keys = [ADDRESS_KEY.format(rank=r) for r in range(n)]
        try:
            store.wait(keys, timedelta(seconds=self._rendezvous_timeout))
        except Exception as exc:
            missing = [r for r, key in enumerate(keys) if not store.check([key])]
            raise CollectiveTimeoutError(
                "p2pdl backend rendezvous",
                self._rendezvous_timeout,
                missing,
                detail=f" to publish their addresses ({exc})",
            ) from exc
        peers = []
        for key in keys:
            text = store.get(key).decode()
            host, _, port = text.rpartition(":")
            peers.append((host, int(port)))
        return peers


def create_process_group(
    store: Any,
    rank: int,
    world_size: int,
    timeout: timedelta,
    *,
    group_id: str = "",
) -> P2PDLProcessGroup:
    """One p2pdl node for one torch process group, its addresses exchanged through `store`."""
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
    if not seconds > 0:
        raise ConfigError(f"the process group timeout must be positive, got {timeout!r}")
    secret, insecure = _secret()
    host = listen_host(store)
    config = NodeConfig(
        rank=rank,
        peers=tuple((host, 0) for _ in range(world_size)),
        secret=secret,
        insecure=insecure,
        cluster_id=f"torch/{group_id or 'default'}"[:128],
        timeouts=Timeouts(connect=seconds, operation=seconds),
    )
    node = SyncNode(lambda: _StoreNode(config, store, seconds))
    return P2PDLProcessGroup(node, timeout=seconds)


def _create(options: Any, backend_options: Any = None) -> P2PDLProcessGroup:
    """torch's extended-API creator: `options` is a `_DistributedBackendOptions`."""
    return create_process_group(
        options.store,
        options.group_rank,
        options.group_size,
        options.timeout,
        group_id=str(options.group_id or ""),
    )


def register() -> None:
    """Register "p2pdl" with torch.distributed (idempotent; done by `import p2pdl.torch`)."""
    if BACKEND_NAME.upper() in dist.Backend._plugins:
        return
    dist.Backend.register_backend(BACKEND_NAME, _create, extended_api=True, devices=["cpu"])

"""p2pdl: a peer-to-peer runtime for data-parallel deep learning on asyncio.

`Node` is the asyncio API for embedding; `connect` is the blocking facade that runs the
event loop in a background thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from p2pdl.errors import (
    AuthenticationError,
    CollectiveMismatchError,
    CollectiveTimeoutError,
    ConfigError,
    P2PDLError,
    PeerLostError,
    ProtocolError,
    SharedMemoryError,
)

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "CollectiveMismatchError",
    "CollectiveTimeoutError",
    "ConfigError",
    "Node",
    "NodeConfig",
    "P2PDLError",
    "PeerLostError",
    "ProtocolError",
    "SharedMemoryError",
    "SyncNode",
    "Timeouts",
    "connect",
]

if TYPE_CHECKING:
    from p2pdl.config import NodeConfig, Timeouts
    from p2pdl.node import Node
    from p2pdl.sync import SyncNode, connect

_LAZY = {
    "Node": "p2pdl.node",
    "NodeConfig": "p2pdl.config",
    "Timeouts": "p2pdl.config",
    "SyncNode": "p2pdl.sync",
    "connect": "p2pdl.sync",
}


def __getattr__(name: str) -> Any:
    """Import the heavier modules only when their names are used."""
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'p2pdl' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)

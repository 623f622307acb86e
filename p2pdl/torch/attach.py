"""The node a torch object works with, and how it blocks on it (through the one sync bridge).

A torch object (`DistributedDataParallel`, `ShardedOptimizer`, a `TorchTask` outside job
mode) is given `p2pdl.connect()`'s blocking node, or an asyncio `Node` plus the `loop` it runs
on in another thread; with a bare asyncio `Node` only the `*_async` methods work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from p2pdl.node import Node
from p2pdl.sync import SyncNode, bridge_of, wait_for

T = TypeVar("T")

__all__ = ["Attached"]


class Attached:
    """`node` as seen by a torch object: the asyncio node, and a bridge to block on it."""

    def __init__(self, node: Any, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if isinstance(node, SyncNode):
            self.node: Node = node.node
        elif isinstance(node, Node):
            self.node = node
        else:
            raise TypeError(
                f"expected p2pdl.connect()'s node or a p2pdl.Node, got {type(node).__name__}"
            )
        self.bridge = bridge_of(node, loop)

    @property
    def rank(self) -> int:
        return self.node.rank

    @property
    def world_size(self) -> int:
        return self.node.world_size

    @property
    def collectives(self) -> Any:
        return self.node.collectives

    @property
    def can_block(self) -> bool:
        return self.bridge is not None

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        if self.bridge is None:
            coro.close()
            raise TypeError(
                "this object was given an asyncio Node without its loop: use the *_async "
                "methods from the node's loop, pass loop=, or use p2pdl.connect()"
            )
        return self.bridge.submit(coro)

    def wait(self, timeout: float | None = None) -> float:
        """How long to wait for one collective's result (its deadline plus a grace)."""
        return wait_for(self.node, timeout)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self.bridge is None:
            self.submit(coro)  # raises the explanation
        assert self.bridge is not None
        return self.bridge.call(coro, self.wait(timeout))

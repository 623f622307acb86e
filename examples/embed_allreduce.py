"""Embedding p2pdl in a program: the blocking facade, and the asyncio API.

    python -m p2pdl launch -n 3 examples/embed_allreduce.py           # blocking facade
    python -m p2pdl launch -n 3 examples/embed_allreduce.py --asyncio # asyncio Node

Each rank contributes `rank + 1` in every element; after the allreduce every rank holds
1 + 2 + ... + n. The same call takes a CPU torch tensor, in place.
"""

from __future__ import annotations

import sys

import numpy as np

import p2pdl


def blocking() -> None:
    with p2pdl.connect() as node:  # settings from P2PDL_* (or RANK/WORLD_SIZE/MASTER_*) env
        data = np.full(1_000_000, node.rank + 1, dtype=np.float32)
        node.allreduce(data)  # in place: sum across ranks
        expected = node.world_size * (node.world_size + 1) / 2
        assert np.all(data == expected)
        try:
            import torch

            tensor = torch.ones(10)
            node.allreduce(tensor, op="mean")  # a CPU tensor works the same way
        except ImportError:
            pass
        node.barrier()
        print(f"rank {node.rank}/{node.world_size}: sum = {data[0]:.0f}", flush=True)


async def with_asyncio() -> None:
    async with p2pdl.Node.from_env() as node:
        data = np.full(1_000_000, node.rank + 1, dtype=np.float32)
        await node.allreduce(data)
        await node.barrier()
        print(f"rank {node.rank}/{node.world_size}: sum = {data[0]:.0f} (asyncio)", flush=True)


if __name__ == "__main__":
    if "--asyncio" in sys.argv[1:]:
        import uvloop  # the entry point chooses the event loop, never the library

        uvloop.run(with_asyncio())
    else:
        blocking()

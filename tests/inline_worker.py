"""A blocking-facade program for tests/test_inline.py (run under `p2pdl launch`).

Every rank makes the same sequence of small allreduces through `p2pdl.connect()` — most run
on the caller's thread (`p2pdl.collectives.inline`), in the compiled small call unless told
(argv[2]: ranks that leave every step to Python) — and checks each result bit for bit
against the same sum over TCP (`sliced`, on the loop: the same slices, the same order), then
a mismatched call, and one more call. Prints one JSON line per rank.
"""

from __future__ import annotations

import json
import sys

import numpy as np

import p2pdl
from p2pdl.errors import CollectiveMismatchError
from p2pdl.kernels import shmcall

CALLS = int(sys.argv[1]) if len(sys.argv) > 1 else 300
PYTHON_RANKS = {int(r) for r in sys.argv[2].split(",")} if len(sys.argv) > 2 else set()
"""Ranks that leave every step to Python (`P2PDL_SHM_COMPILED=0`), beside ranks that run
the compiled small call: the two must work together."""
SIZES = (1, 7, 1024, 70_000)


def main() -> None:
    with p2pdl.connect() as node:
        rank = node.rank
        if rank in PYTHON_RANKS:
            shmcall.ENABLED = False
        collectives = node.node.collectives
        node.allreduce(np.ones(max(SIZES), np.float64))  # makes the segments
        differ = 0
        for i in range(CALLS):
            size = SIZES[i % len(SIZES)]
            dtype = np.float32 if i % 3 else np.float64
            op = "mean" if i % 5 == 0 else "sum"
            data = np.random.default_rng([i, rank]).standard_normal(size).astype(dtype)
            inline = data.copy()
            node.allreduce(inline, op=op)
            looped = data.copy()
            node.submit(node.node.allreduce(looped, op, "sliced")).result(60)
            differ += int(inline.tobytes() != looped.tobytes())
        counts = dict(collectives.inline_calls)
        mismatch = ""
        try:
            node.allreduce(np.ones(10 + rank, np.float32))
        except CollectiveMismatchError as exc:
            mismatch = str(exc)
        after = np.full(5, rank + 1.0, np.float32)
        node.allreduce(after)  # the ranks go on together after a mismatch
        node.barrier(timeout=30)
        print(
            json.dumps(
                {
                    "rank": rank,
                    "differ": differ,
                    "counts": counts,
                    "mismatch": mismatch,
                    "after": float(after[0]),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()

"""Run every collective on a local cluster and print what was verified.

python -m p2pdl launch -n 4 examples/verify_collectives.py
"""

from __future__ import annotations

import json
import time

import numpy as np

import p2pdl

ALGORITHMS = ("direct", "sliced", "ring", "driver", "tree")
ONE_HOST_ALGORITHMS = ("shm",)
"""Only when every rank runs on this host (as under `launch`)."""
SIZES = (1, 1000, 1 << 20)


def main() -> None:
    with p2pdl.connect() as node:
        rank, n = node.rank, node.world_size
        collectives = node.node.collectives
        algorithms = ALGORITHMS
        if collectives is not None and collectives.one_host:
            algorithms = (*ALGORITHMS, *ONE_HOST_ALGORITHMS)
        checks = 0
        for algorithm in algorithms:
            for size in SIZES:
                rng = np.random.default_rng(1000 * size + rank)
                data = rng.standard_normal(size).astype(np.float32)
                everyone = np.stack(
                    [np.random.default_rng(1000 * size + r).standard_normal(size) for r in range(n)]
                ).astype(np.float32)
                node.allreduce(data, algorithm=algorithm)
                exact = everyone.astype(np.float64).sum(axis=0)
                if not np.allclose(data, exact, rtol=1e-4, atol=1e-4):
                    raise SystemExit(f"rank {rank}: {algorithm} allreduce of {size} is wrong")
                digest = np.frombuffer(data.tobytes()[:4096], dtype=np.uint8).copy()
                node.broadcast(digest, root=0)
                if digest.tobytes() != data.tobytes()[:4096]:
                    raise SystemExit(f"rank {rank}: {algorithm} results differ across ranks")
                checks += 1
        for compression in ("bf16", "fp16"):
            data = np.full(1 << 16, rank + 1.0, dtype=np.float32)
            node.allreduce(data, compression=compression, algorithm="sliced")
            if not np.all(data == n * (n + 1) / 2):
                raise SystemExit(f"rank {rank}: {compression} allreduce is wrong")
            checks += 1
        for root in range(n):
            data = np.full(1000, float(rank))
            node.broadcast(data, root=root)
            if not np.all(data == root):
                raise SystemExit(f"rank {rank}: broadcast from {root} is wrong")
            checks += 1
        started = time.perf_counter()
        for _ in range(100):
            node.barrier()
        barrier_ms = (time.perf_counter() - started) * 10
        if rank == 0:
            print(
                f"verified {checks} collectives on {n} nodes: allreduce "
                f"({', '.join(algorithms)}; sizes {', '.join(map(str, SIZES))}; "
                "bit-identical on every rank), bf16/fp16 compression, broadcast from every "
                f"root; barrier {barrier_ms:.3f} ms"
            )
            print(json.dumps({"nodes": n, "checks": checks, "barrier_ms": round(barrier_ms, 3)}))


if __name__ == "__main__":
    main()

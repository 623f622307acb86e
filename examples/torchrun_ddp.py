"""An ordinary torch DDP script on the "p2pdl" backend: a gloo script with one name changed.

    P2PDL_SECRET=$(python -m p2pdl secret) \\
        python -m torch.distributed.run --nproc-per-node 2 examples/torchrun_ddp.py
    python -m p2pdl launch -n 2 examples/torchrun_ddp.py          # sets the secret itself
    python -m torch.distributed.run --nproc-per-node 2 examples/torchrun_ddp.py --backend gloo

Each rank trains the same MLP on its own shard of a synthetic regression with plain
`torch.nn.parallel.DistributedDataParallel`; at the end rank 0 checks that every rank holds
the same weights and prints one JSON line (loss, steps, world size, backend).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import p2pdl.torch  # noqa: F401 - registers the "p2pdl" backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="p2pdl")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    dist.init_process_group(args.backend)  # torchrun's env:// (MASTER_ADDR, RANK, ...)
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same initial weights everywhere (DDP broadcasts rank 0's)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    true_w = torch.linspace(-1, 1, 16)

    data = torch.Generator().manual_seed(1000 + rank)  # this rank's shard
    loss = torch.tensor(0.0)
    for _ in range(args.steps):
        x = torch.randn(args.batch, 16, generator=data)
        y = (x @ true_w).unsqueeze(1)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()  # gradients averaged across ranks through the backend
        optimizer.step()

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, 0)
    same = bool(torch.equal(flat, reference))
    agree = torch.tensor([int(same)], dtype=torch.int32)
    dist.all_reduce(agree, op=dist.ReduceOp.MIN)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG)
    if rank == 0:
        record = {
            "backend": dist.get_backend(),
            "world_size": world,
            "steps": args.steps,
            "loss": round(float(mean_loss), 6),
            "weights_equal": bool(agree.item()),
        }
        print(json.dumps(record), flush=True)
    dist.destroy_process_group()
    if not agree.item():
        raise SystemExit("ranks ended with different weights")


if __name__ == "__main__":
    main()

"""FSDP2 (`fully_shard`) on the "p2pdl" backend, checked against a single-process reference.

    python -m p2pdl launch -n 2 examples/fsdp2.py
    P2PDL_SECRET=$(python -m p2pdl secret) \\
        python -m torch.distributed.run --nproc-per-node 2 examples/fsdp2.py

Every rank shards the same MLP with `fully_shard` (parameters all-gathered for forward and
backward, gradients reduce-scattered with AVG) and trains on its own part of each global
batch. Each rank also trains an unsharded copy on the whole global batch, alone; the sharded
model's full parameters must match it. Rank 0 prints the largest difference as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import p2pdl.torch  # noqa: F401 - registers the "p2pdl" backend

TOLERANCE = 1e-5


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 4),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="p2pdl")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="samples per rank per step")
    args = parser.parse_args()

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    reference = make_model()
    sharded = copy.deepcopy(reference)
    for layer in sharded:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    opt = torch.optim.SGD(sharded.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)

    data = torch.Generator().manual_seed(7)  # the same global batches on every rank
    for _ in range(args.steps):
        x = torch.randn(world * args.batch, 8, generator=data)
        y = torch.randn(world * args.batch, 4, generator=data)
        mine = slice(rank * args.batch, (rank + 1) * args.batch)

        opt.zero_grad()
        torch.nn.functional.mse_loss(sharded(x[mine]), y[mine]).backward()
        opt.step()

        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(reference(x), y).backward()
        ref_opt.step()

    worst = 0.0
    for p, q in zip(sharded.parameters(), reference.parameters(), strict=True):
        full = p.detach().full_tensor()  # an all-gather of the shards (DTensor)
        worst = max(worst, float((full - q).abs().max()))
    if rank == 0:
        print(json.dumps({"world_size": world, "steps": args.steps, "max_diff": worst}))
    dist.destroy_process_group()
    if worst > TOLERANCE:
        raise SystemExit(f"FSDP2 on {args.backend} differs from the reference by {worst}")


if __name__ == "__main__":
    main()

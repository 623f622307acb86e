"""An existing DDP-style training loop, switched to p2pdl by changing two lines.

    python -m p2pdl launch -n 2 examples/existing_loop.py

The torch.distributed version of this loop had

    dist.init_process_group("gloo")                                   # line 1
    model = torch.nn.parallel.DistributedDataParallel(model)          # line 2

and p2pdl's has the two lines marked below. Everything else — the model, the data, the
unchanged torch optimizer, zero_grad/backward/step — stays as it was: when `backward()`
returns, every `.grad` holds the average across nodes (bucketed allreduce during backward).
"""

from __future__ import annotations

import torch

import p2pdl
import p2pdl.torch


def main() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))

    node = p2pdl.connect()  # line 1: was dist.init_process_group("gloo")
    model = p2pdl.torch.DistributedDataParallel(model, node)  # line 2: was torch's DDP

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(node.rank)  # each rank has its own data
    inputs = torch.randn(512, 20, generator=generator)
    targets = (inputs[:, 0] > 0).long()
    for step in range(50):
        batch = slice((step * 32) % 512, (step * 32) % 512 + 32)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs[batch]), targets[batch])
        loss.backward()
        optimizer.step()
        if node.rank == 0 and step % 10 == 9:
            print(f"step {step + 1}: loss {loss.item():.4f}", flush=True)
    node.close()


if __name__ == "__main__":
    main()

"""The main job: an MLP on scikit-learn's bundled digits (real data, offline) on a p2pdl cluster.

    python examples/train_digits.py                  # starts a 4-node local cluster itself
    python examples/train_digits.py --nodes 2 --steps 300
    python -m p2pdl launch -n 4 examples/train_digits.py  # under the launcher (env settings)
    python -m p2pdl node --lead --job examples.train_digits:task   # as a group-scheduled job

Every node runs `task` (a `p2pdl.torch.TorchTask`): its share of each global batch forward and
backward, then the sharded optimizer (reduce-scatter, SGD on the owned slice, all-gather of the
weights). Rank 0 shows a progress bar and prints the test accuracy, samples/s, wall time and
one JSON line with those figures.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import p2pdl
from p2pdl.collectives import timeline
from p2pdl.torch import TorchTask, train, weights_digest

SEED = 0
HIDDEN = 128


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits (8x8 images, 10 classes), scaled to [0, 1], split 75/25 (stratified, seeded)."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)
    return (torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te),
            torch.from_numpy(y_te))  # fmt: skip


X_TRAIN, Y_TRAIN, X_TEST, Y_TEST = load_data()


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(64, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, 10),
    )


def accuracy(model: torch.nn.Module) -> dict[str, float]:
    with torch.no_grad():
        predicted = model(X_TEST).argmax(dim=1)
    return {"accuracy": float((predicted == Y_TEST).float().mean())}


def make_task(partitions: int = 1, lr: float = 0.1) -> TorchTask:
    return TorchTask(
        model_fn=make_model,
        loss_fn=torch.nn.functional.cross_entropy,
        dataset=(X_TRAIN, Y_TRAIN),
        optimizer={"kind": "sgd", "lr": lr, "momentum": 0.9, "nesterov": True},
        partitions=partitions,
        seed=SEED,
        eval_fn=accuracy,
        global_batch=64,
        epochs=20,
    )


task = make_task()
"""The job for the group-scheduled runtime (`--job examples.train_digits:task`)."""


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=4, help="local cluster size (default 4)")
    parser.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    parser.add_argument("--batch", type=int, default=64, help="global batch (default 64)")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate (default 0.05)")
    parser.add_argument(
        "--partitions", type=int, default=1, help="local replicas (threads) per node"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def run_rank(args: argparse.Namespace) -> int:
    """One node of the cluster (settings from P2PDL_* in the environment)."""
    world = int(os.environ.get("P2PDL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    job = make_task(args.partitions, args.lr)
    with p2pdl.connect() as node:
        result = train(
            job, node, steps=args.steps, global_batch=args.batch, progress=not args.no_progress
        )
        # Are the weights bit-identical on every rank? Compare each digest with rank 0's.
        mine = np.frombuffer(bytes.fromhex(weights_digest(job.flats[0])), np.uint8)
        theirs = mine.astype(np.float64)
        node.broadcast(theirs, 0)
        mismatches = np.array([float(not np.array_equal(theirs, mine))])
        node.allreduce(mismatches)
        identical = bool(mismatches[0] == 0)
        if node.rank == 0:
            metrics = job.evaluate()
            figures = {
                "event": "train_digits",
                "nodes": node.world_size,
                "steps": int(result["steps"]),
                "global_batch": args.batch,
                "test_accuracy": round(metrics["accuracy"], 4),
                "samples_per_s": round(result["samples_per_s"], 1),
                "wall_s": round(result["wall_s"], 3),
                "final_loss": round(result["loss"], 4),
                "weights_identical": identical,
            }
            print(
                f"test accuracy {figures['test_accuracy']:.4f}  "
                f"{figures['samples_per_s']:,.0f} samples/s  wall {figures['wall_s']:.2f} s  "
                f"({node.world_size} nodes, {args.steps} steps, global batch {args.batch})"
            )
            print(json.dumps(figures), flush=True)
    job.close()
    return 0


def run_cluster(args: argparse.Namespace, argv: list[str]) -> int:
    """Start a local cluster: this process is rank 0, the others are children of it."""
    from p2pdl.launch import free_port

    env = dict(os.environ)
    env.update(
        P2PDL_WORLD_SIZE=str(args.nodes),
        P2PDL_LEADER=f"127.0.0.1:{free_port()}",
        P2PDL_SECRET=secrets.token_hex(16),
    )
    children = []
    for rank in range(1, args.nodes):
        child_env = dict(env, P2PDL_RANK=str(rank))
        children.append(
            subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), *argv],
                env=child_env,
                stdout=subprocess.DEVNULL,
            )
        )
    os.environ.update(env, P2PDL_RANK="0")
    try:
        code = run_rank(args)
    except BaseException:
        for child in children:
            child.terminate()
        raise
    finally:
        for child in children:
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    trace = os.environ.get(timeline.ENV)
    if trace and timeline.merge(trace):  # P2PDL_TIMELINE: every rank's spans in one trace
        print(f"timeline: {trace}", file=sys.stderr)
    failed = [c.returncode for c in children if c.returncode != 0]
    if failed:
        print(f"{len(failed)} node(s) failed: exit codes {failed}", file=sys.stderr)
        return 1
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if "P2PDL_RANK" in os.environ or "RANK" in os.environ or args.nodes <= 1:
        return run_rank(args)
    return run_cluster(args, argv)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m p2pdl bench spark --partitions N [--master M] [--epochs E] [--repeat R] [--json F]`.

The same training twice on one Spark cluster (default `local-cluster[N,1,1024]`: N executor
JVMs of one core each), side by side:

- **Spark's own way** (the per-iteration job of MLlib's `GradientDescent.runMiniBatchSGD`):
  every iteration broadcasts the weights, computes each partition's gradient in a task and
  `treeAggregate`s the sums to the driver, which updates the weights: one Spark job per
  iteration.
- **p2pdl.spark.fit**: one barrier stage for the whole training; inside it the nodes AllReduce
  peer to peer and run the leader's iteration groups, with no Spark job and no driver round
  trip per iteration.

Both train the same ~1.1M-parameter MLP (64-1024-1024-10) on the digits training set (a
DataFrame of N partitions), with the same global batch, the same SGD (momentum 0.9, Nesterov,
lr 0.1), the same number of iterations and the same rows at every step (each partition draws
its share of a global batch from a per-epoch permutation of its own rows, as
`p2pdl.spark.data` does). Reported: time per iteration of each (the baseline's warm-up
iterations and p2pdl's stage start-up left out, and also the whole call with them), their
ratio, and the test accuracy each reached.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pdl.schedule.plan import epoch_permutation
from p2pdl.spark.session import session, stop
from p2pdl.torch import TorchTask

SEED = 0
HIDDEN = 1024
BATCH = 64
OPTIMIZER = {"kind": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True}
TASK = "p2pdl.bench.spark:task"


def make_model() -> torch.nn.Module:
    """The benchmark's MLP: 64-1024-1024-10, 1,126,410 float32 parameters."""
    return torch.nn.Sequential(
        torch.nn.Linear(64, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, 10),
    )


task = TorchTask(
    model_fn=make_model,
    loss_fn=torch.nn.functional.cross_entropy,
    dataset=None,  # p2pdl.spark.fit hands every node its partition's rows
    optimizer=OPTIMIZER,
    partitions=1,
    seed=SEED,
    global_batch=BATCH,
    epochs=5,
)
"""What p2pdl.spark.fit trains (`p2pdl.bench.spark:task`)."""


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits scaled to [0, 1], split 75/25 as examples/train_digits.py does."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise SystemExit("bench spark needs scikit-learn (the [examples] extra)") from None
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)
    return x_tr, y_tr, x_te, y_te


def accuracy(state: dict[str, torch.Tensor], x: np.ndarray, y: np.ndarray) -> float:
    model = make_model()
    model.load_state_dict(state)
    with torch.no_grad():
        predicted = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((predicted == y).mean())


# ------------------------------------------------------------------ the per-iteration baseline
def local_rows(seed: int, step: int, steps_per_epoch: int, rank: int, world: int, n: int) -> Any:
    """Partition `rank`'s rows for global step `step` (what p2pdl.spark.data picks)."""
    epoch, i = divmod(step, steps_per_epoch)
    base, extra = divmod(BATCH, world)
    count = base + int(rank < extra)
    share = -(-BATCH // world)
    positions = (i * share + np.arange(count, dtype=np.int64)) % n
    return epoch_permutation(seed, epoch, n)[positions]


_WORKER: dict[str, Any] = {}


def _worker_model(threads: int) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """One model per Python worker process, reused across iterations (as MLlib reuses its
    gradient object); its weights are overwritten from the broadcast every iteration."""
    if "model" not in _WORKER:
        torch.set_num_threads(threads)
        model = make_model()
        _WORKER["model"] = model
        _WORKER["params"] = list(model.parameters())
    return _WORKER["model"], _WORKER["params"]


def _block_gradient(
    block: tuple[int, np.ndarray, np.ndarray],
    weights: np.ndarray,
    step: int,
    steps_per_epoch: int,
    world: int,
    threads: int,
) -> tuple[np.ndarray, float, int]:
    """One partition's summed gradient, summed loss and sample count at `step`."""
    rank, x, y = block
    model, params = _worker_model(threads)
    torch.nn.utils.vector_to_parameters(torch.from_numpy(weights), params)
    rows = local_rows(SEED, step, steps_per_epoch, rank, world, len(y))
    model.zero_grad(set_to_none=False)
    loss = torch.nn.functional.cross_entropy(
        model(torch.from_numpy(x[rows])), torch.from_numpy(y[rows]), reduction="sum"
    )
    loss.backward()
    grad = torch.nn.utils.parameters_to_vector([p.grad for p in params]).numpy().copy()
    return grad, float(loss.detach()), len(rows)


def _combine(
    a: tuple[np.ndarray, float, int] | None, b: tuple[np.ndarray, float, int] | None
) -> tuple[np.ndarray, float, int] | None:
    if a is None:
        return b
    if b is None:
        return a
    grad = a[0]
    grad += b[0]  # in place: no copy of the gradient per combination
    return grad, a[1] + b[1], a[2] + b[2]


def _baseline_iterations(
    sc: Any,
    blocks: Any,
    steps: int,
    steps_per_epoch: int,
    world: int,
    threads: int,
) -> tuple[torch.nn.Module, list[float], list[float]]:
    """`steps` iterations from the initial weights; (model, seconds of each, mean losses)."""
    torch.manual_seed(SEED)
    model = make_model()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True)
    times: list[float] = []
    losses: list[float] = []
    for step in range(steps):
        start = time.perf_counter()
        weights = torch.nn.utils.parameters_to_vector(params).detach().numpy()
        broadcast = sc.broadcast(weights)

        def seq(
            acc: tuple[np.ndarray, float, int] | None,
            block: tuple[int, np.ndarray, np.ndarray],
            bc: Any = broadcast,
            i: int = step,
        ) -> tuple[np.ndarray, float, int] | None:
            part = _block_gradient(block, bc.value, i, steps_per_epoch, world, threads)
            return _combine(acc, part)

        total = blocks.treeAggregate(None, seq, _combine, depth=2)
        broadcast.destroy()
        if total is None:
            raise RuntimeError("treeAggregate returned no gradient")
        grad, loss, count = total
        mean = torch.from_numpy(grad / np.float32(count))
        offset = 0
        for p in params:
            p.grad = mean[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        optimizer.step()
        times.append(time.perf_counter() - start)
        losses.append(loss / count)
    return model, times, losses


def run_baseline(spark: Any, df: Any, world: int, epochs: int, warmup: int) -> dict[str, Any]:
    """MLlib-style training: per iteration one Spark job (broadcast, gradients in the tasks,
    treeAggregate to the driver, update on the driver)."""
    sc = spark.sparkContext
    threads = max(1, (os.cpu_count() or 1) // world)

    def to_block(index: int, rows: Any) -> Any:
        items = list(rows)
        x = np.asarray([r[0] for r in items], dtype=np.float32).reshape(len(items), -1)
        y = np.asarray([r[1] for r in items], dtype=np.int64)
        yield index, x, y

    start = time.perf_counter()
    blocks = df.rdd.mapPartitionsWithIndex(to_block).cache()
    sizes = blocks.map(lambda block: len(block[2])).collect()
    steps_per_epoch = sum(sizes) // BATCH
    steps = steps_per_epoch * epochs
    # Warm-up: starts the Python workers and builds their models; then training starts over.
    _baseline_iterations(sc, blocks, warmup, steps_per_epoch, world, threads)
    model, times, losses = _baseline_iterations(sc, blocks, steps, steps_per_epoch, world, threads)
    total = time.perf_counter() - start
    blocks.unpersist()
    return {
        "steps": steps,
        "per_iteration_s": statistics.mean(times),
        "per_iteration_median_s": statistics.median(times),
        "total_s": total,
        "final_loss": statistics.mean(losses[-steps_per_epoch:]),
        "state": model.state_dict(),
    }


def run_p2pdl(
    spark: Any, df: Any, world: int, epochs: int, group_size: int | str | None
) -> dict[str, Any]:
    """The same training through p2pdl.spark.fit: one barrier stage."""
    import p2pdl.spark

    start = time.perf_counter()
    result = p2pdl.spark.fit(
        df, TASK, num_nodes=world, epochs=epochs, global_batch=BATCH, group_size=group_size
    )
    total = time.perf_counter() - start
    summary = result.summary
    assert result.state_dict is not None
    return {
        "steps": summary["steps"],
        "per_iteration_s": 1.0 / summary["iterations_per_s"],
        "training_s": summary["wall_s"],
        "total_s": total,
        "final_loss": summary["loss"],
        "group_size": summary["group_size"],
        "weights_identical": summary["weights_identical"],
        "state": result.state_dict,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="p2pdl bench spark", description=__doc__)
    parser.add_argument("--partitions", type=int, default=2, help="N: tasks and partitions")
    parser.add_argument(
        "--master", help="Spark master (default local-cluster[N,1,1024]: N executors, 1 core)"
    )
    parser.add_argument("--epochs", type=int, default=5, help="epochs (21 iterations each)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed baseline iterations")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of both, in turn")
    parser.add_argument(
        "--group-size", help="p2pdl's steps per group: a number or auto (default: the job's, auto)"
    )
    parser.add_argument("--json", help="write the figures of every round to this file")
    args = parser.parse_args(argv)
    if args.partitions < 1 or args.epochs < 1 or args.repeat < 1 or args.warmup < 0:
        parser.error("--partitions, --epochs and --repeat must be >= 1, --warmup >= 0")
    group_size: int | str | None = args.group_size
    if group_size is not None and group_size != "auto":
        try:
            group_size = int(group_size)
        except ValueError:
            parser.error(f"--group-size must be a number or auto, not {group_size!r}")
    world = args.partitions
    master = args.master or f"local-cluster[{world},1,1024]"
    x_train, y_train, x_test, y_test = load_digits_split()
    spark = session(master, "p2pdl-bench-spark", conf={"spark.default.parallelism": str(world)})
    rounds: list[dict[str, Any]] = []
    try:
        rows = [(x.tolist(), int(y)) for x, y in zip(x_train, y_train, strict=True)]
        df = spark.createDataFrame(rows, "features array<float>, label long").repartition(world)
        df = df.cache()
        df.count()
        for _ in range(args.repeat):
            base = run_baseline(spark, df, world, args.epochs, args.warmup)
            ours = run_p2pdl(spark, df, world, args.epochs, group_size)
            figures: dict[str, Any] = {
                "master": master,
                "partitions": world,
                "group_size": group_size or "auto",
            }
            for name, run in (("spark_treeaggregate", base), ("p2pdl", ours)):
                state = run.pop("state")
                run["test_accuracy"] = accuracy(state, x_test, y_test)
                figures[name] = run
            figures["ratio"] = base["per_iteration_s"] / ours["per_iteration_s"]
            figures["ratio_whole_call"] = base["total_s"] / ours["total_s"]
            print(json.dumps(figures), file=sys.stderr, flush=True)
            rounds.append(figures)
    finally:
        stop(spark)
    params = sum(p.numel() for p in make_model().parameters())
    print(
        f"{master}, {world} partitions, MLP of {params:,} parameters, global batch {BATCH}, "
        f"{rounds[0]['p2pdl']['steps']} iterations, {len(rounds)} round(s)"
    )
    print()
    print(
        "| round | Spark treeAggregate ms/iteration | p2pdl.spark ms/iteration | ratio | "
        "whole call: Spark s / p2pdl s (ratio) | test accuracy: Spark / p2pdl |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for i, r in enumerate(rounds, 1):
        b, p = r["spark_treeaggregate"], r["p2pdl"]
        print(
            f"| {i} | {b['per_iteration_s'] * 1e3:.1f} | {p['per_iteration_s'] * 1e3:.2f} | "
            f"{r['ratio']:.0f}x | {b['total_s']:.1f} / {p['total_s']:.1f} "
            f"({r['ratio_whole_call']:.1f}x) | {b['test_accuracy']:.4f} / "
            f"{p['test_accuracy']:.4f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rounds}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

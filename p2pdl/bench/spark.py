"""`python -m p2pdl bench spark --partitions N [--master M] [--model small|large] [--json F]`.

The same training twice on one Spark cluster (default `local-cluster[N,1,1024]`: N executor
JVMs of one core each; `--standalone`: a Spark standalone cluster whose Master and driver run on
one namespace host and one Worker on each of N more, every host behind a `--rate` link), side
by side:

- **Spark's own way** (the per-iteration job of MLlib's `GradientDescent.runMiniBatchSGD`):
  every iteration broadcasts the weights, computes each partition's gradient in a task and
  `treeAggregate`s the sums to the driver, which updates the weights: one Spark job per
  iteration.
- **p2pdl.spark.fit**: one barrier stage for the whole training; inside it the nodes AllReduce
  peer to peer and run the leader's iteration groups, with no Spark job and no driver round
  trip per iteration.

Both train the same MLP on the digits training set (`--model small`: 64-1024-1024-10, 1.1M
parameters; `large`: 64-5000-5000-10, 25.4M) as a DataFrame of N partitions, with the same
global batch, the same SGD (momentum 0.9, Nesterov, lr 0.1), the same number of iterations and
the same rows at every step (each partition draws its share of a global batch from a per-epoch
permutation of its own rows, as `p2pdl.spark.data` does). Reported: time per iteration of
each (the baseline's warm-up iterations and p2pdl's stage start-up left out, and also the whole
call with them), their ratio, and the test accuracy each reached.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pdl.schedule.plan import epoch_permutation
from p2pdl.spark.session import session, stop
from p2pdl.torch import TorchTask

SEED = 0
BATCH = 64
OPTIMIZER = {"kind": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True}
HIDDEN = {"small": 1024, "large": 5000}
"""Width of the MLP's two hidden layers per `--model`: 1,126,410 or 25,380,010 parameters."""
TASKS = {"small": "p2pdl.bench.spark:task", "large": "p2pdl.bench.spark:task_large"}


def make_model(hidden: int = HIDDEN["small"]) -> torch.nn.Module:
    """The benchmark's MLP: 64-hidden-hidden-10, float32."""
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    )


def _task(hidden: int) -> TorchTask:
    return TorchTask(
        model_fn=functools.partial(make_model, hidden),
        loss_fn=torch.nn.functional.cross_entropy,
        dataset=None,  # p2pdl.spark.fit hands every node its partition's rows
        optimizer=OPTIMIZER,
        partitions=1,
        seed=SEED,
        global_batch=BATCH,
        epochs=5,
    )


task = _task(HIDDEN["small"])
"""What p2pdl.spark.fit trains for `--model small` (`p2pdl.bench.spark:task`)."""
task_large = _task(HIDDEN["large"])
"""`--model large` (`p2pdl.bench.spark:task_large`)."""


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


def accuracy(state: dict[str, torch.Tensor], x: np.ndarray, y: np.ndarray, hidden: int) -> float:
    model = make_model(hidden)
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


def _worker_model(threads: int, hidden: int) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """One model per Python worker process, reused across iterations (as MLlib reuses its
    gradient object); its weights are overwritten from the broadcast every iteration."""
    if _WORKER.get("hidden") != hidden:
        torch.set_num_threads(threads)
        model = make_model(hidden)
        _WORKER["hidden"] = hidden
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
    hidden: int,
) -> tuple[np.ndarray, float, int]:
    """One partition's summed gradient, summed loss and sample count at `step`."""
    rank, x, y = block
    model, params = _worker_model(threads, hidden)
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
    hidden: int,
) -> tuple[torch.nn.Module, list[float], list[float]]:
    """`steps` iterations from the initial weights; (model, seconds of each, mean losses)."""
    torch.manual_seed(SEED)
    model = make_model(hidden)
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
            part = _block_gradient(block, bc.value, i, steps_per_epoch, world, threads, hidden)
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


def run_baseline(
    spark: Any, df: Any, world: int, epochs: int, warmup: int, hidden: int
) -> dict[str, Any]:
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
    _baseline_iterations(sc, blocks, warmup, steps_per_epoch, world, threads, hidden)
    model, times, losses = _baseline_iterations(
        sc, blocks, steps, steps_per_epoch, world, threads, hidden
    )
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
    spark: Any, df: Any, world: int, epochs: int, group_size: int | str | None, task: str
) -> dict[str, Any]:
    """The same training through p2pdl.spark.fit: one barrier stage."""
    import p2pdl.spark

    start = time.perf_counter()
    result = p2pdl.spark.fit(
        df, task, num_nodes=world, epochs=epochs, global_batch=BATCH, group_size=group_size
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


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="p2pdl bench spark", description=__doc__)
    parser.add_argument(
        "--partitions", default="2", help="N: tasks and partitions; a list (2,4) runs each"
    )
    parser.add_argument(
        "--master", help="Spark master (default local-cluster[N,1,1024]: N executors, 1 core)"
    )
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="a standalone Spark cluster on N+1 namespace hosts (needs root): Master and "
        "driver on one, a Worker with one core on each other",
    )
    parser.add_argument("--rate", default="1gbit", help="--standalone: each host's link speed")
    parser.add_argument("--model", choices=sorted(HIDDEN), default="small", help="MLP size")
    parser.add_argument("--epochs", type=int, default=5, help="epochs (21 iterations each)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed baseline iterations")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of both, in turn")
    parser.add_argument(
        "--group-size", help="p2pdl's steps per group: a number or auto (default: the job's, auto)"
    )
    parser.add_argument(
        "--conf", action="append", default=[], metavar="KEY=VALUE", help="a Spark setting"
    )
    parser.add_argument(
        "--driver-timeout", type=float, default=3600.0, help="--standalone: seconds per N"
    )
    parser.add_argument("--json", help="write the figures of every round to this file")
    parser.add_argument("--plot", help="--standalone: draw time per iteration vs N here (.png)")
    args = parser.parse_args(argv)
    try:
        args.partitions = sorted({int(x) for x in args.partitions.split(",") if x.strip()})
    except ValueError:
        parser.error(f"--partitions {args.partitions!r}: expected a number or a list like 2,4")
    if not args.partitions or min(args.partitions) < 1:
        parser.error("--partitions must be >= 1")
    if args.epochs < 1 or args.repeat < 1 or args.warmup < 0:
        parser.error("--epochs and --repeat must be >= 1, --warmup >= 0")
    if args.standalone and args.master:
        parser.error("--standalone starts its own master: leave out --master")
    if args.plot and not args.standalone:
        parser.error("--plot draws the --standalone runs")
    if any("=" not in c for c in args.conf):
        parser.error("--conf takes KEY=VALUE")
    if args.group_size is not None and args.group_size != "auto":
        try:
            args.group_size = int(args.group_size)
        except ValueError:
            parser.error(f"--group-size must be a number or auto, not {args.group_size!r}")
    return args


def run_rounds(args: argparse.Namespace, world: int) -> list[dict[str, Any]]:
    """`args.repeat` rounds of both trainings on one session of `args.master`."""
    hidden = HIDDEN[args.model]
    master = args.master or f"local-cluster[{world},1,1024]"
    conf = {"spark.default.parallelism": str(world)}
    driver_host = os.environ.get("P2PDL_SPARK_DRIVER_HOST")  # set by StandaloneSpark
    if driver_host:
        conf |= {"spark.driver.host": driver_host, "spark.driver.bindAddress": driver_host}
    conf |= dict(c.split("=", 1) for c in args.conf)
    x_train, y_train, x_test, y_test = load_digits_split()
    spark = session(master, "p2pdl-bench-spark", conf=conf)
    rounds: list[dict[str, Any]] = []
    try:
        rows = [(x.tolist(), int(y)) for x, y in zip(x_train, y_train, strict=True)]
        df = spark.createDataFrame(rows, "features array<float>, label long").repartition(world)
        df = df.cache()
        df.count()
        for _ in range(args.repeat):
            base = run_baseline(spark, df, world, args.epochs, args.warmup, hidden)
            ours = run_p2pdl(spark, df, world, args.epochs, args.group_size, TASKS[args.model])
            figures: dict[str, Any] = {
                "master": master,
                "partitions": world,
                "model": args.model,
                "parameters": sum(p.numel() for p in make_model(hidden).parameters()),
                "group_size": args.group_size or "auto",
            }
            for name, run in (("spark_treeaggregate", base), ("p2pdl", ours)):
                state = run.pop("state")
                run["test_accuracy"] = accuracy(state, x_test, y_test, hidden)
                figures[name] = run
            figures["ratio"] = base["per_iteration_s"] / ours["per_iteration_s"]
            figures["ratio_whole_call"] = base["total_s"] / ours["total_s"]
            figures["loadavg_at_end"] = os.getloadavg()[0]
            print(json.dumps(figures), file=sys.stderr, flush=True)
            rounds.append(figures)
    finally:
        stop(spark)
    return rounds


def run_standalone(args: argparse.Namespace, world: int) -> list[dict[str, Any]]:
    """The rounds of `world` partitions on a standalone cluster of namespace hosts: this
    benchmark again, as the driver on the master's host (`--master spark://...`)."""
    from p2pdl.testing.netns import LinkSpec, NamespaceCluster
    from p2pdl.testing.spark_standalone import StandaloneSpark

    memory = {"spark.executor.memory": "2g", "spark.driver.memory": "2g"}
    confs = [f"{k}={v}" for k, v in memory.items()] + args.conf
    with (
        tempfile.TemporaryDirectory(prefix="p2pdl-bench-spark-") as folder,
        NamespaceCluster(world + 1, link=LinkSpec(rate=args.rate)) as hosts,
        StandaloneSpark(hosts, worker_cores=1, worker_memory="3g") as cluster,
    ):
        out = Path(folder) / "rounds.json"
        inner = [
            *("-m", "p2pdl", "bench", "spark", "--master", cluster.master_url),
            *("--partitions", str(world), "--model", args.model, "--epochs", str(args.epochs)),
            *("--warmup", str(args.warmup), "--repeat", str(args.repeat), "--json", str(out)),
            *(("--group-size", str(args.group_size)) if args.group_size is not None else ()),
            *(x for c in confs for x in ("--conf", c)),
        ]
        done = cluster.run_driver(inner, timeout=args.driver_timeout)
        sys.stderr.write(done.stderr)
        if done.returncode != 0 or not out.exists():
            raise SystemExit(
                f"the driver on the standalone cluster (N={world}) failed with status "
                f"{done.returncode}:\n{done.stderr[-3000:]}\n{cluster.logs()}"
            )
        rounds = json.loads(out.read_text())["rounds"]
    for figures in rounds:
        figures["standalone"] = {"workers": world, "rate": args.rate}
    return rounds


def print_table(rounds: list[dict[str, Any]]) -> None:
    first = rounds[0]
    print(
        f"MLP of {first['parameters']:,} parameters, global batch {BATCH}, "
        f"{first['p2pdl']['steps']} iterations, {len(rounds)} round(s)"
    )
    print()
    print(
        "| master | N | round | Spark treeAggregate ms/iteration | p2pdl.spark ms/iteration | "
        "ratio | whole call: Spark s / p2pdl s (ratio) | test accuracy: Spark / p2pdl |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    counts: dict[int, int] = {}
    for r in rounds:
        b, p = r["spark_treeaggregate"], r["p2pdl"]
        n = r["partitions"]
        counts[n] = counts.get(n, 0) + 1
        master = f"standalone, {r['standalone']['rate']}" if r.get("standalone") else r["master"]
        print(
            f"| {master} | {n} | {counts[n]} | {b['per_iteration_s'] * 1e3:.1f} | "
            f"{p['per_iteration_s'] * 1e3:.1f} | {r['ratio']:.1f}x | {b['total_s']:.1f} / "
            f"{p['total_s']:.1f} ({r['ratio_whole_call']:.1f}x) | {b['test_accuracy']:.4f} / "
            f"{p['test_accuracy']:.4f} |"
        )


def plot(rounds: list[dict[str, Any]], path: Path, rate: str) -> None:
    """Time per iteration vs N for both (median over rounds, bars from min to max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({r["partitions"] for r in rounds})
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for key, label in (
        ("spark_treeaggregate", "Spark: a job per iteration (treeAggregate)"),
        ("p2pdl", "p2pdl.spark.fit: one barrier stage"),
    ):
        values = [[r[key]["per_iteration_s"] for r in rounds if r["partitions"] == n] for n in ns]
        mid = [statistics.median(v) for v in values]
        low = [m - min(v) for m, v in zip(mid, values, strict=True)]
        high = [max(v) - m for m, v in zip(mid, values, strict=True)]
        ax.errorbar(ns, mid, yerr=[low, high], marker="o", capsize=4, label=label)
    ax.set_xlabel("executors N (one per host)")
    ax.set_ylabel("seconds per iteration")
    ax.set_xticks(ns)
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"MLP of {rounds[0]['parameters'] / 1e6:.1f}M parameters, standalone Spark, "
        f"{rate} per host",
        fontsize="medium",
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    args = _parse_args(argv)
    rounds: list[dict[str, Any]] = []
    for world in args.partitions:
        run = run_standalone if args.standalone else run_rounds
        rounds += run(args, world)
    print_table(rounds)
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rounds}, indent=1))
    if args.plot:
        plot(rounds, Path(args.plot), args.rate)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""`python -m p2pdl bench train --nodes 2,4 --compare ddp`: training throughput against torch DDP.

The same MLP (64 → 2048 → 2048 → 512 → 10, 5.3M parameters, float32), the same synthetic
data (seeded; a fixed random teacher labels Gaussian inputs), the same global batch and the
same process count run through:

* ``p2pdl-ddp``      — `p2pdl.torch.DistributedDataParallel` + an unchanged torch.optim.SGD
                       (the "two changed lines" mode; bucketed allreduce during backward);
* ``p2pdl-sharded``  — `p2pdl.torch.TorchTask` steps: forward/backward, then the sharded
                       optimizer (one sliced allreduce whose owners run SGD on their slice;
                       the all-gathered result is the new weights). This is the per-step work
                       of job mode, driven by `p2pdl.torch.train` (no leader on the path);
* ``p2pdl-sharded-sg`` — the same with reduce-scatter + separate all-gather of the weights;
* ``ddp``            — `torch.nn.parallel.DistributedDataParallel` on gloo + torch.optim.SGD;
* ``ddp-p2pdl``      — the same unmodified torch DDP on the ``"p2pdl"`` torch.distributed
                       backend (`init_process_group("p2pdl")`);

and, to see what bounds the throughput, with the same processes and CPU contention:

* ``compute``        — forward/backward/SGD with no communication at all;
* ``comm-p2pdl`` / ``comm-gloo`` — the gradient allreduce alone (one 5.3M float32 buffer);
* ``comm-backend``   — the same `dist.all_reduce` through the ``"p2pdl"`` backend, to set
                       against ``comm-p2pdl`` (p2pdl's own API on the same buffer).

``--comm-mb`` sets the buffer of the comm modes instead (``--comm-mb 1,64``: each size in
turn); the table then adds the backend's time over p2pdl's own for each size.

Every process gets ``cores // nodes`` torch threads (at least 1). Results: a table on stdout,
one JSON line per run, and `--json FILE` for all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODES = ("p2pdl-ddp", "p2pdl-sharded", "p2pdl-sharded-sg", "ddp", "ddp-p2pdl", "compute",
         "comm-p2pdl", "comm-gloo", "comm-backend")  # fmt: skip
DEFAULT_MODES = ("p2pdl-ddp", "p2pdl-sharded", "ddp", "ddp-p2pdl", "compute", "comm-p2pdl",
                 "comm-gloo", "comm-backend")  # fmt: skip
TORCH_BACKENDS = {"ddp": "gloo", "comm-gloo": "gloo", "ddp-p2pdl": "p2pdl",
                  "comm-backend": "p2pdl"}  # fmt: skip
"""Modes that run through torch.distributed, and on which backend."""
INPUT, CLASSES = 64, 10
HIDDEN = (2048, 2048, 512)


def build_model() -> Any:
    import torch

    layers: list[Any] = []
    width = INPUT
    for hidden in HIDDEN:
        layers += [torch.nn.Linear(width, hidden), torch.nn.ReLU()]
        width = hidden
    layers.append(torch.nn.Linear(width, CLASSES))
    return torch.nn.Sequential(*layers)


def make_data(n: int = 8192, seed: int = 0) -> tuple[Any, Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, INPUT, generator=gen)
    teacher = torch.randn(INPUT, CLASSES, generator=gen)
    return x, (x @ teacher).argmax(dim=1)


# ---------------------------------------------------------------------------- the worker
def _worker(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from p2pdl.bench._procs import worker_rank

    rank, world = worker_rank()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    mode = args.worker
    x, y = make_data()
    local_batch = args.batch // world
    torch.manual_seed(0)
    model = build_model()
    params = sum(p.numel() for p in model.parameters())
    lr, momentum = 0.01, 0.9

    def batch(step: int) -> tuple[Any, Any]:
        start = (step * args.batch + rank * local_batch) % (len(x) - local_batch)
        return x[start : start + local_batch], y[start : start + local_batch]

    def loss_of(m: Any, step: int) -> Any:
        inputs, target = batch(step)
        return torch.nn.functional.cross_entropy(m(inputs), target)

    gloo = mode in TORCH_BACKENDS  # through torch.distributed (on gloo or on p2pdl)
    if gloo:
        import torch.distributed as dist

        if TORCH_BACKENDS[mode] == "p2pdl":
            import p2pdl.torch  # registers the backend

        dist.init_process_group(
            TORCH_BACKENDS[mode],
            init_method=f"tcp://127.0.0.1:{args.gloo_port}",
            rank=rank,
            world_size=world,
        )
    node = None
    if mode.startswith(("p2pdl", "comm-p2pdl")):
        import p2pdl
        from p2pdl.config import take_env_secret

        settings = {"secret": take_env_secret()}
        if rank == 0:
            node = p2pdl.connect(0, world_size=world, port=args.p2pdl_port, **settings)
        else:
            node = p2pdl.connect(leader=("127.0.0.1", args.p2pdl_port), **settings)

    fwd_bwd: list[float] = []
    after: list[float] = []

    if mode in ("ddp", "ddp-p2pdl", "p2pdl-ddp", "compute"):
        if mode in ("ddp", "ddp-p2pdl"):
            wrapped = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=args.bucket_mb)
        elif mode == "p2pdl-ddp":
            from p2pdl.torch import DistributedDataParallel

            wrapped = DistributedDataParallel(model, node, bucket_mb=args.bucket_mb)
        else:
            wrapped = model
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

        def step(i: int) -> None:
            t0 = time.perf_counter()
            opt.zero_grad()
            loss_of(wrapped, i).backward()
            t1 = time.perf_counter()
            opt.step()
            fwd_bwd.append(t1 - t0)
            after.append(time.perf_counter() - t1)

    elif mode in ("p2pdl-sharded", "p2pdl-sharded-sg"):
        from p2pdl.torch import TorchTask

        task = TorchTask(
            model_fn=build_model,
            loss_fn=torch.nn.functional.cross_entropy,
            dataset=(x, y),
            optimizer={"kind": "sgd", "lr": lr, "momentum": momentum},
            partitions=1,
            strategy="allreduce" if mode == "p2pdl-sharded" else "scatter_gather",
        )
        task.setup(node)
        assert task.sharded is not None
        task.sharded.broadcast_weights()
        sharded = task.sharded

        def step(i: int) -> None:
            t0 = time.perf_counter()
            start = (i * args.batch + rank * local_batch) % (len(x) - local_batch)
            task._forward_backward(range(start, start + local_batch))
            t1 = time.perf_counter()
            sharded.attached.call(sharded.step_async(lr))
            fwd_bwd.append(t1 - t0)
            after.append(time.perf_counter() - t1)

    else:  # communication alone
        size = params if args.comm_mb is None else int(args.comm_mb * 2**20) // 4
        params = size
        grads = np.random.default_rng(rank).standard_normal(size).astype(np.float32)
        if mode in ("comm-gloo", "comm-backend"):
            tensor = torch.from_numpy(grads)
            op = dist.ReduceOp.SUM if mode == "comm-gloo" else dist.ReduceOp.AVG

            def step(i: int) -> None:
                t0 = time.perf_counter()
                dist.all_reduce(tensor, op=op)
                after.append(time.perf_counter() - t0)
                fwd_bwd.append(0.0)

        else:
            assert node is not None

            def step(i: int) -> None:
                t0 = time.perf_counter()
                node.allreduce(grads, "mean")
                after.append(time.perf_counter() - t0)
                fwd_bwd.append(0.0)

    for i in range(args.warmup):
        step(i)
    fwd_bwd.clear()
    after.clear()
    if gloo:
        dist.barrier()
    elif node is not None:
        node.barrier()
    begin = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    wall = time.perf_counter() - begin
    if gloo:
        dist.barrier()
        dist.destroy_process_group()
    if node is not None:
        node.barrier()
        node.close()
    if rank == 0:
        result = {
            "event": "bench_train",
            "mode": mode,
            "nodes": world,
            "params": params,
            "comm_mb": args.comm_mb,
            "global_batch": args.batch,
            "steps": args.steps,
            "torch_threads": torch.get_num_threads(),
            "samples_per_s": args.steps * args.batch / wall,
            "step_ms": 1000 * wall / args.steps,
            "fwd_bwd_ms": 1000 * float(np.mean(fwd_bwd)),
            "after_backward_ms": 1000 * float(np.mean(after)),
        }
        Path(args.out).write_text(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------- the parent
def _run(mode: str, nodes: int, args: argparse.Namespace) -> dict[str, Any] | None:
    import secrets

    from p2pdl.bench._procs import run_workers
    from p2pdl.launch.procs import free_port

    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "result.json")
        argv = [
            "-m", "p2pdl.bench.train", "--worker", mode, "--out", out,
            "--batch", str(args.batch), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--bucket-mb", str(args.bucket_mb),
            "--gloo-port", str(free_port()), "--p2pdl-port", str(free_port()),
        ]  # fmt: skip
        if args.comm_mb is not None:
            argv += ["--comm-mb", str(args.comm_mb)]
        code = run_workers(
            argv,
            nodes,
            use_mpirun=False,
            timeout=args.timeout,
            env={"P2PDL_SECRET": secrets.token_hex(32)},
        )
        if code != 0 or not os.path.exists(out):
            print(f"{mode} at n={nodes} failed (exit status {code})", file=sys.stderr)
            return None
        return json.loads(Path(out).read_text())


def _best(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (nodes, mode): the fastest run, with the median samples/s of all its runs."""
    import statistics

    groups: dict[tuple[int, str, Any], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["nodes"], run["mode"], run.get("comm_mb")), []).append(run)
    best = []
    for group in groups.values():
        top = dict(min(group, key=lambda r: r["step_ms"]))
        top["median_samples_per_s"] = statistics.median(r["samples_per_s"] for r in group)
        top["median_step_ms"] = statistics.median(r["step_ms"] for r in group)
        top["runs"] = len(group)
        best.append(top)
    return best


def _table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| nodes | mode | samples/s (best) | median | step ms | fwd+bwd ms | after bwd ms "
        "| ÷ DDP |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    ddp = {r["nodes"]: r["samples_per_s"] for r in results if r["mode"] == "ddp"}
    for r in results:
        base = ddp.get(r["nodes"])
        training = not r["mode"].startswith(("comm", "compute"))
        ratio = f"{r['samples_per_s'] / base:.2f}" if base and training else ""
        comm = r["mode"].startswith("comm")
        rate = f"{r['samples_per_s']:,.0f}" if not comm else "—"
        median = f"{r['median_samples_per_s']:,.0f}" if not comm else "—"
        size = r.get("comm_mb")
        label = f"{r['mode']} ({size:g} MiB)" if comm and size else r["mode"]
        lines.append(
            f"| {r['nodes']} | {label} | {rate} | {median} | {r['step_ms']:.1f} | "
            f"{r['fwd_bwd_ms']:.1f} | {r['after_backward_ms']:.1f} | {ratio} |"
        )
    ours = {(r["nodes"], r.get("comm_mb")): r for r in results if r["mode"] == "comm-p2pdl"}
    ratios = [
        f"n={r['nodes']}, {r['params'] * 4 / 2**20:.0f} MiB: dist.all_reduce on the p2pdl "
        f"backend takes {r['median_step_ms'] / base['median_step_ms']:.2f}x p2pdl's own "
        f"allreduce (medians {r['median_step_ms']:.2f} vs {base['median_step_ms']:.2f} ms)"
        for r in results
        if r["mode"] == "comm-backend"
        and (base := ours.get((r["nodes"], r.get("comm_mb")))) is not None
    ]
    return "\n".join(lines + (["", *ratios] if ratios else []))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m p2pdl bench train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--nodes", default="2,4", help="process counts, comma separated")
    parser.add_argument("--compare", default="ddp", choices=["ddp", "none"])
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"of {MODES}")
    parser.add_argument("--batch", type=int, default=256, help="global batch (default 256)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--bucket-mb", type=float, default=4.0, help="DDP bucket size, both")
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds over all modes (best of them is shown)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="per run, seconds")
    parser.add_argument(
        "--comm-mb", help="buffer MiB of the comm modes, comma separated (default: the model)"
    )
    parser.add_argument("--json", help="write every result to this file")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--gloo-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--p2pdl-port", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.worker:
        args.comm_mb = None if args.comm_mb is None else float(args.comm_mb)
        return _worker(args)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("bench train needs PyTorch: pip install 'p2pdl[torch]'", file=sys.stderr)
        return 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        print(f"unknown mode(s) {unknown}; choose from {MODES}", file=sys.stderr)
        return 2
    if args.compare == "none":
        modes = [m for m in modes if m not in ("ddp", "comm-gloo", "ddp-p2pdl", "comm-backend")]
    counts = [int(n) for n in str(args.nodes).split(",") if n.strip()]
    runs: list[dict[str, Any]] = []
    status = 0
    sizes = [float(v) for v in args.comm_mb.split(",")] if args.comm_mb else [None]
    plan = [(mode, None) for mode in modes if not mode.startswith("comm")] + [
        (mode, size) for size in sizes for mode in modes if mode.startswith("comm")
    ]
    for nodes in counts:
        # Modes take turns, round after round: a shared machine's noise hits all of them.
        for _round in range(max(1, args.repeat)):
            for mode, size in plan:
                args.comm_mb = size
                result = _run(mode, nodes, args)
                if result is None:
                    status = 1
                    continue
                print(json.dumps(result), flush=True)
                runs.append(result)
    results = _best(runs)
    print(_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"best": results, "runs": runs}, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`python -m p2pdl bench schedule --nodes 4 --group-sizes 1,10,100 [--bsp]`.

Runs the tiny numpy task (`examples.numpy_linear`, 1024 float32 weights: a 4 KiB gradient)
once per configuration, each time as `--nodes` real processes on loopback (the leader plus
workers, fresh processes per configuration), and prints one table: iterations/s, leader
messages per iteration (steady state: group plans + reports + pings, per worker), and the
time a worker spent waiting on the leader. The leader's own timer covers first group pushed
to last report; process start-up and JIT warm-up are outside it.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from p2pdl.launch.procs import stop_processes

TASK = "examples.numpy_linear:task"


def run_config(
    nodes: int, group_size: int | None, bsp: bool, steps: int, timeout: float
) -> dict[str, Any]:
    """One job; returns the leader's done summary."""
    epochs = max(1, steps // 64)
    node = [sys.executable, "-m", "p2pdl", "node"]
    lead = [*node, "--lead", "--job", TASK, "--nodes", str(nodes)]
    lead += ["--spec", f"epochs={epochs}", "--spec", "dataset_size=4096"]
    lead += ["--spec", "global_batch=64"]
    if bsp:
        lead.append("--bsp")
    elif group_size is not None:
        lead += ["--group-size", str(group_size)]
    # A fresh secret per run, in the environment (never on the command line).
    env = dict(os.environ, PYTHONUNBUFFERED="1", P2PDL_SECRET=secrets.token_hex(32))
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "leader.out"
        try:
            with out.open("wb") as handle:
                procs.append(
                    subprocess.Popen(
                        lead,
                        stdout=handle,
                        env=env,
                        cwd=root,
                        start_new_session=True,
                    )
                )
            deadline = time.monotonic() + timeout
            address = None
            while address is None:
                if time.monotonic() > deadline or procs[0].poll() is not None:
                    raise RuntimeError("the leader did not start")
                for line in out.read_text().splitlines():
                    if '"ready"' in line:
                        address = json.loads(line)["address"]
                time.sleep(0.02)  # polling for the ready line, under a deadline
            for _ in range(nodes - 1):
                procs.append(
                    subprocess.Popen(
                        [*node, "--leader", address, "--allow-task", TASK],
                        stdout=subprocess.DEVNULL,
                        env=env,
                        cwd=root,
                        start_new_session=True,
                    )
                )
            status = procs[0].wait(max(1.0, deadline - time.monotonic()))
            if status != 0:
                raise RuntimeError(f"the leader exited with {status}")
            for line in out.read_text().splitlines():
                if '"done"' in line:
                    return json.loads(line)
            raise RuntimeError("no summary from the leader")
        finally:
            stop_processes(procs, grace=0.0)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="p2pdl bench schedule", description=__doc__)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--group-sizes", default="1,10,100")
    parser.add_argument("--bsp", action="store_true", help="also run the BSP baseline")
    parser.add_argument("--steps", type=int, default=1024, help="iterations per run")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds; each round runs every configuration once, in turn, so a slow spell of "
        "the machine hits all of them (medians and per-round ratios are reported)",
    )
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--json", action="store_true", help="print the raw summaries too")
    args = parser.parse_args(argv)
    if args.nodes < 2 or args.steps < 1 or args.repeat < 1:
        parser.error("--nodes must be at least 2, --steps and --repeat at least 1")
    try:
        sizes = [int(s) for s in args.group_sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--group-sizes must be comma-separated integers, not {args.group_sizes!r}")
    if not sizes or min(sizes) < 1:
        parser.error("--group-sizes needs at least one size, each at least 1")
    configs: list[tuple[str, int | None, bool]] = []
    if args.bsp:
        configs.append(("BSP (1 step, leader round trip per step)", 1, True))
    configs += [(f"G={g}, lookahead 1", g, False) for g in sizes]
    runs: list[list[dict[str, Any]]] = [[] for _ in configs]
    for _ in range(args.repeat):
        for index, (_label, size, bsp) in enumerate(configs):
            summary = run_config(args.nodes, size, bsp, args.steps, args.timeout)
            if args.json:
                print(json.dumps(summary), file=sys.stderr)
            runs[index].append(summary)
    print(
        f"nodes={args.nodes}, {args.steps} iterations per run, 4 KiB gradient (1024 float32), "
        f"loopback; {args.repeat} round(s), configurations interleaved; medians, ratios taken "
        "within each round (min–max in brackets)"
    )
    print()
    print(
        "| schedule | iterations/s | vs BSP | leader msgs/iteration (per worker) | 2/G | "
        "worker wait on leader (s, mean/rank) | wait share of wall |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (label, size, _bsp), summaries in zip(configs, runs, strict=True):
        ips = _median([s["iterations_per_s"] for s in summaries])
        if args.bsp:
            ratios = [
                s["iterations_per_s"] / b["iterations_per_s"]
                for s, b in zip(summaries, runs[0], strict=True)
            ]
            ratio = f"{_median(ratios):.2f}× [{min(ratios):.2f}–{max(ratios):.2f}]"
        else:
            ratio = "–"
        two_over_g = f"{2 / size:.3f}" if size else "–"
        messages = _median([s["leader_messages_per_iteration"] for s in summaries])
        wait = _median([s["worker_wait_s"] for s in summaries])
        share = _median(
            [s["worker_wait_s"] / s["wall_s"] if s["wall_s"] else 0.0 for s in summaries]
        )
        print(
            f"| {label} | {ips:.0f} | {ratio} | {messages:.3f} | {two_over_g} | {wait:.3f} | "
            f"{share:.1%} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

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
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TASK = "examples.numpy_linear:task"


def _options(**values: Any) -> str:
    return json.dumps(values)


def run_config(
    nodes: int, group_size: int | None, bsp: bool, steps: int, timeout: float
) -> dict[str, Any]:
    """One job; returns the leader's done summary."""
    epochs = max(1, steps // 64)
    overrides = {"epochs": epochs, "dataset_size": 4096, "global_batch": 64}
    lead = {
        "lead": True,
        "job": TASK,
        "nodes": nodes,
        "bsp": bsp,
        "job_overrides": overrides,
        "secret": "bench-schedule-secret",
    }
    if group_size is not None and not bsp:
        lead["group_size"] = group_size
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    runtime = [sys.executable, "-m", "p2pdl.schedule.runtime"]
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "leader.out"
        try:
            with out.open("wb") as handle:
                procs.append(
                    subprocess.Popen(
                        [*runtime, _options(**lead)],
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
                worker = {"lead": False, "leader": address, "secret": "bench-schedule-secret"}
                procs.append(
                    subprocess.Popen(
                        [*runtime, _options(**worker)],
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
            for proc in procs:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="p2pdl bench schedule", description=__doc__)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--group-sizes", default="1,10,100")
    parser.add_argument("--bsp", action="store_true", help="also run the BSP baseline")
    parser.add_argument("--steps", type=int, default=1024, help="iterations per run")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--json", action="store_true", help="print the raw summaries too")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.group_sizes.split(",") if s.strip()]
    configs: list[tuple[str, int | None, bool]] = []
    if args.bsp:
        configs.append(("BSP (1 step, leader round trip per step)", 1, True))
    configs += [(f"G={g}, lookahead 1", g, False) for g in sizes]
    rows = []
    for label, size, bsp in configs:
        summary = run_config(args.nodes, size, bsp, args.steps, args.timeout)
        if args.json:
            print(json.dumps(summary), file=sys.stderr)
        rows.append((label, size, summary))
    base = next((s["iterations_per_s"] for _, _, s in rows if s["bsp"]), None)
    print(f"nodes={args.nodes}, {args.steps} iterations, 4 KiB gradient (1024 float32), loopback")
    print()
    print(
        "| schedule | iterations/s | vs BSP | leader msgs/iteration (per worker) | 2/G | "
        "worker wait on leader (s, mean/rank) | wait share of wall |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, size, s in rows:
        ips = s["iterations_per_s"]
        ratio = f"{ips / base:.2f}×" if base else "–"
        two_over_g = f"{2 / size:.3f}" if size else "–"
        share = s["worker_wait_s"] / s["wall_s"] if s["wall_s"] else 0.0
        print(
            f"| {label} | {ips:.0f} | {ratio} | {s['leader_messages_per_iteration']:.3f} | "
            f"{two_over_g} | {s['worker_wait_s']:.3f} | {share:.1%} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

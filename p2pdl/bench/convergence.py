"""Time to accuracy across namespace hosts: torch DDP on gloo next to p2pdl, same training.

    python -m p2pdl bench convergence --hosts 2,4 --rate 1gbit --steps 200 [--json PATH]

For each host count a fresh :class:`~p2pdl.testing.netns.NamespaceCluster` (one rank per host,
links shaped with tc tbf, p2pdl links encrypted) runs every system in turn on the same model,
seed, data order (`sample_plan`), global batch and learning rate: `examples/lm_stdlib.py`, a
5.5M-parameter byte-level language model on the standard library's text. Each rank records
the held-out loss against training wall time (evaluation excluded) and the bytes its host
sent per step (the kernel's interface counters), both from the end of the first step. The
target is the loss DDP-on-gloo reaches after the step budget; the table gives each system's
time to reach it.

Systems: `ddp-gloo` (the reference), `ddp-p2pdl` (the same DDP script on the p2pdl backend),
`p2pdl` (p2pdl's loop: sharded optimizer step), and `p2pdl:<compression>` for each wire
compression p2pdl's sharded step accepts. Needs root (namespaces) and a source checkout
(the example is not installed with the package).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lm_stdlib.py"
DEFAULT_SYSTEMS = ("ddp-gloo", "p2pdl")
P2PDL_PORT = 29400
GLOO_PORT = 29500
TOLERANCE = 1e-4
"""Relative slack on the target loss: sums in another order change the last bits."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"p2pdl bench convergence: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="p2pdl bench convergence", description=__doc__.splitlines()[0])
    p.add_argument("--hosts", default="2,4", help="host counts, e.g. 2,4")
    p.add_argument("--rate", default="1gbit", help="link rate of every host (tc syntax)")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS))
    p.add_argument("--steps", type=int, default=200, help="step budget of every system")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--batch", type=int, default=None, help="global batch (example's default)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per system run")
    p.add_argument("--json", dest="json_path")
    p.add_argument("--plot", dest="plot_path", help="loss vs seconds (PNG)")
    return p


@dataclass(frozen=True)
class Run:
    """One system's run on N hosts: rank 0's curve and the hosts' bytes per step."""

    system: str
    hosts: int
    curve: list[tuple[int, float, float]]
    wire_bytes_per_step: float

    @property
    def final_val_loss(self) -> float:
        return self.curve[-1][2]

    def time_to(self, target: float) -> float | None:
        """Training seconds until the held-out loss first reached `target` (None: never),
        within `TOLERANCE` (identical training on two backends differs in the last bits)."""
        for _step, seconds, loss in self.curve:
            if loss <= target * (1 + TOLERANCE):
                return seconds
        return None


def time_to_target(runs: list[Run], reference: str = "ddp-gloo") -> dict[str, Any]:
    """Per system: the reference's final loss as target, the time to reach it, the ratio."""
    ref = next((r for r in runs if r.system == reference), None)
    if ref is None:
        raise ValueError(f"no {reference} run to take the target from")
    target = ref.final_val_loss
    ref_time = ref.time_to(target)
    table = {}
    for run in runs:
        seconds = run.time_to(target)
        table[run.system] = {
            "time_to_target_s": seconds,
            "speedup_vs_reference": (ref_time / seconds) if seconds and ref_time else None,
            "final_val_loss": run.final_val_loss,
            "wire_bytes_per_step": run.wire_bytes_per_step,
        }
    return {"target_val_loss": target, "reference": reference, "systems": table}


def _argv(system: str, args: argparse.Namespace, out: str) -> list[str]:
    argv = [sys.executable, str(EXAMPLE), "--steps", str(args.steps)]
    argv += ["--eval-every", str(args.eval_every), "--json", out]
    if args.batch:
        argv += ["--batch", str(args.batch)]
    if system.startswith("ddp-"):
        argv += ["--ddp", "--backend", system.removeprefix("ddp-")]
    elif ":" in system:
        argv += ["--compression", system.split(":", 1)[1]]
    return argv


def _env(system: str, rank: int, addresses: list[str], secret: str) -> dict[str, str]:
    world = len(addresses)
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "eth0",
        "RANK": str(rank),
        "LOCAL_RANK": "0",
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": addresses[0],
        "MASTER_PORT": str(GLOO_PORT),
        "P2PDL_SECRET": secret,
    }
    if not system.startswith("ddp-"):
        env.update(
            P2PDL_RANK=str(rank),
            P2PDL_WORLD_SIZE=str(world),
            P2PDL_LEADER=f"{addresses[0]}:{P2PDL_PORT}",
            P2PDL_HOST=addresses[rank],
        )
    return env


def _run_system(cluster: Any, system: str, args: argparse.Namespace, tmp: Path) -> Run:
    n = len(cluster)
    secret = secrets.token_hex(32)
    out = str(tmp / f"{system.replace(':', '_')}-n{n}-{{rank}}.json")
    procs, logs = [], []
    for host in cluster:
        log_path = tmp / f"{system.replace(':', '_')}-n{n}-r{host.index}.log"
        logs.append(log_path)
        with open(log_path, "wb") as log:
            procs.append(
                host.popen(
                    _argv(system, args, out),
                    env=_env(system, host.index, cluster.addresses, secret),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )
    deadline = time.monotonic() + args.timeout
    failed = None
    for rank, proc in enumerate(procs):
        try:
            code = proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            failed = f"rank {rank} did not finish within {args.timeout:g} s"
            break
        if code != 0:
            failed = f"rank {rank} exited with {code}"
            break
    if failed:
        tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in logs)
        raise RuntimeError(f"{system} on {n} hosts: {failed}\n{tails}")
    results = [json.loads(Path(out.format(rank=r)).read_text()) for r in range(n)]
    curve = [(int(s), float(t), float(m["val_loss"])) for s, t, m in results[0]["curve"]]
    wire = sum(float(r["tx_bytes_per_step"]) for r in results)
    return Run(system, n, curve, wire)


def _plot(runs_by_n: dict[int, list[Run]], summaries: dict[int, dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs_by_n), figsize=(6 * len(runs_by_n), 4.5), squeeze=False)
    for ax, (n, runs) in zip(axes[0], sorted(runs_by_n.items()), strict=True):
        for run in runs:
            ax.plot([t for _s, t, _l in run.curve], [loss for _s, _t, loss in run.curve],
                    marker="o", markersize=3, label=run.system)  # fmt: skip
        ax.axhline(summaries[n]["target_val_loss"], color="grey", linestyle=":", label="target")
        ax.set_title(f"{n} hosts")
        ax.set_xlabel("training seconds")
        ax.set_ylabel("held-out loss (nats/byte)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(summaries: dict[int, dict[str, Any]], out: Any = sys.stdout) -> None:
    print("| hosts | system | time to target (s) | speed-up | final val loss | wire MB/step |",
          file=out)  # fmt: skip
    print("|---|---|---|---|---|---|", file=out)
    for n, summary in sorted(summaries.items()):
        for system, row in summary["systems"].items():
            t = row["time_to_target_s"]
            speedup = row["speedup_vs_reference"]
            print(
                f"| {n} | {system} | {'—' if t is None else f'{t:.1f}'} | "
                f"{'—' if speedup is None else f'{speedup:.2f}×'} | {row['final_val_loss']:.4f} | "
                f"{row['wire_bytes_per_step'] / 1e6:.2f} |",
                file=out,
            )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from p2pdl.testing import netns

    hosts = [int(h) for h in args.hosts.split(",") if h]
    systems = [s for s in args.systems.split(",") if s]
    if "ddp-gloo" not in systems:
        print("p2pdl bench convergence: error: ddp-gloo sets the target", file=sys.stderr)
        return 2
    if not EXAMPLE.is_file():
        print(f"p2pdl bench convergence: error: needs a source checkout ({EXAMPLE} is missing)",
              file=sys.stderr)  # fmt: skip
        return 2
    ok, reason = netns.available(rate=True)
    if not ok:
        print(f"p2pdl bench convergence: cannot build namespace hosts: {reason}", file=sys.stderr)
        return 2
    link = netns.LinkSpec(rate=args.rate)
    runs_by_n: dict[int, list[Run]] = {}
    summaries: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="p2pdl-convergence-") as tmp_dir:
        for n in hosts:
            with netns.NamespaceCluster(n, link=link) as cluster:
                runs = []
                for system in systems:
                    run = _run_system(cluster, system, args, Path(tmp_dir))
                    print(f"{n} hosts  {system:16s} final val loss {run.final_val_loss:.4f}  "
                          f"{run.curve[-1][1]:.1f} s  {run.wire_bytes_per_step / 1e6:.2f} MB/step",
                          flush=True)  # fmt: skip
                    runs.append(run)
            runs_by_n[n] = runs
            summaries[n] = time_to_target(runs)
    print_table(summaries)
    if args.plot_path:
        _plot(runs_by_n, summaries, args.plot_path)
    if args.json_path:
        payload = {
            "rate": args.rate,
            "steps": args.steps,
            "by_hosts": {
                str(n): {**summaries[n], "curves": {r.system: r.curve for r in runs_by_n[n]}}
                for n in hosts
            },
        }
        Path(args.json_path).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scaling benchmark: AllReduce on N namespace hosts with rate-limited links, against the bound.

    python -m p2pdl bench scaling --hosts 2,4,8 --rate 1gbit --size 16M \\
        --json bench-results/scaling.json --plot docs/scaling.png

For each N a fresh :class:`~p2pdl.testing.netns.NamespaceCluster` of N hosts is built, every
host's link shaped by tbf to ``--rate`` in both directions (a full-duplex NIC), and one worker
process started inside each host. The workers join one p2pdl cluster (rank 0 leads on host 0's
address, authenticated with a fresh secret) and one torch.distributed gloo group (TCP store on
host 0's address, ``GLOO_SOCKET_IFNAME=eth0``), in the same processes. Every repeat runs each
variant once, in turn (``sliced``, ``ring``, ``driver``, ``tree``, gloo), so whatever else loads
the machine hits all of them alike. A call starts after that library's barrier and is timed on
every rank; a repeat's time is the slowest rank's, and the table shows the median.

The bandwidth bound of an AllReduce of S bytes over N hosts whose links carry B bytes/s each
way is ``2·S·(N−1)/(N·B)``: every host must send (and receive) ``(N−1)/N`` of the buffer twice.
tbf counts every byte of the Ethernet frame, so TCP payload moves at most 1448/1514 of the rate
(MTU 1500, IP+TCP+timestamp headers 52 bytes, Ethernet header 14 bytes): the table shows the
bound both raw and header-adjusted; the targets are judged against the header-adjusted bound,
the fastest any TCP transport could go on these links.

CPU: each worker measures its own CPU time (user+system, all threads) around every call, and
rank 0 samples /proc/stat (the whole machine: user, system, softirq -- where the veth, bridge
and tbf work is charged -- and steal), so the table says whether a point was CPU-bound.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from p2pdl.bench.allreduce import format_size, parse_size

ALGORITHMS = ("sliced", "ring", "driver", "tree")
RANK_ENV = "P2PDL_BENCH_RANK"
P2PDL_PORT = 29400  # every run has fresh namespaces: these ports are always free there
GLOO_PORT = 29500
MTU = 1500
TCP_PAYLOAD = MTU - 20 - 20 - 12  # IPv4, TCP, TCP timestamps option
FRAME = MTU + 14  # what tbf counts per segment (Ethernet header included)
GOODPUT = TCP_PAYLOAD / FRAME  # ~0.956: payload share of the shaped rate
TARGET_BOUND_FACTOR = 1.25
TARGET_DRIVER_FACTOR = 3.0


class UsageError(Exception):
    """A bad command line: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="p2pdl bench scaling",
        description="AllReduce time vs number of namespace hosts on rate-limited links, "
        "p2pdl's algorithms and gloo, next to the bandwidth bound (root only).",
    )
    parser.add_argument("--hosts", default="2,4,8", help="host counts, e.g. 2,4,8")
    parser.add_argument("--rate", default="1gbit", help="link rate of every host (tc syntax)")
    parser.add_argument("--size", default="16M", help="AllReduce buffer (float32), e.g. 16M")
    parser.add_argument("--delay", default=None, help="added link delay (needs netem)")
    parser.add_argument("--repeat", type=int, default=5, help="timed repeats per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repeats per variant")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--no-gloo", action="store_true", help="leave torch/gloo out")
    parser.add_argument("--chunk-bytes", type=int, default=None, help="p2pdl chunk size")
    parser.add_argument("--burst", type=int, default=None, help="tbf bucket in bytes")
    parser.add_argument("--queue", default="20ms", help="tbf queue length (time at rate)")
    parser.add_argument("--json", dest="json_path", default="bench-results/scaling.json")
    parser.add_argument("--plot", dest="plot_path", default="bench-results/scaling.png")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per host count")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the workers under `nice -n NICE` (negative: ahead of other load; root)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


@dataclass
class Config:
    world: int
    addresses: list[str]
    size: int
    algorithms: list[str]
    gloo: bool
    repeat: int
    warmup: int
    chunk_bytes: int | None
    secret: str
    out: str
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- CPU accounting
def _cpu_self() -> float:
    """CPU seconds (user + system, every thread) this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def _proc_stat() -> list[int]:
    """The machine-wide jiffies of /proc/stat's first line (see _STAT_FIELDS)."""
    with open("/proc/stat", encoding="ascii") as stat:
        parts = stat.readline().split()
    return [int(x) for x in parts[1 : 1 + len(_STAT_FIELDS)]]


def _tcp_counters() -> tuple[int, int]:
    """(OutSegs, RetransSegs) of this network namespace's TCP (/proc/net/snmp)."""
    with open("/proc/net/snmp", encoding="ascii") as snmp:
        rows = [line.split() for line in snmp if line.startswith("Tcp:")]
    tcp = dict(zip(rows[0][1:], map(int, rows[1][1:]), strict=True))
    return tcp["OutSegs"], tcp["RetransSegs"]


def _stat_delta(before: list[int], after: list[int]) -> list[int]:
    return [b - a for a, b in zip(before, after, strict=True)]


# --------------------------------------------------------------------------- worker
async def _worker(cfg: Config, rank: int) -> None:
    import numpy as np

    from p2pdl.config import Timeouts
    from p2pdl.node import Node

    world = cfg.world
    dist = torch = None
    if cfg.gloo:
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{cfg.addresses[0]}:{GLOO_PORT}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=300),
        )
    kwargs: dict[str, Any] = {"secret": cfg.secret, "host": cfg.addresses[rank]}
    if cfg.chunk_bytes:
        kwargs["chunk_bytes"] = cfg.chunk_bytes
    kwargs["timeouts"] = Timeouts(connect=120.0, operation=300.0)

    def make(port: int, **extra: Any) -> Node:
        if rank == 0:
            return Node(world_size=world, port=port, **kwargs, **extra)
        return Node(rank, leader=(cfg.addresses[0], port), **kwargs, **extra)

    node = make(P2PDL_PORT)
    # `<algorithm>-plain`: the same ranks on a second cluster with encryption=False, for
    # encrypted-vs-plain ratios within one run.
    plain = (
        make(P2PDL_PORT + 1, encryption=False)
        if any(a.endswith("-plain") for a in cfg.algorithms)
        else None
    )
    if plain is not None:
        await plain.start()
    variants = [("p2pdl", a) for a in cfg.algorithms] + ([("gloo", "ring")] if cfg.gloo else [])
    elems = cfg.size // 4
    rng = np.random.default_rng(1000 + rank)
    src = rng.standard_normal(elems, dtype=np.float32)
    buf = np.empty_like(src)
    gbuf = torch.from_numpy(np.empty_like(src)) if torch is not None else None

    async with node:
        assert node.rank == rank, (node.rank, rank)

        async def gather_rows(row: np.ndarray) -> np.ndarray:
            """Every rank's `row`, stacked in rank order (an allgather made of a sum)."""
            table = np.zeros((world, row.size), dtype=np.float64)
            table[rank] = row
            await node.allreduce(table, algorithm="direct" if table.nbytes < 1 << 16 else "auto")
            return table

        async def call(library: str, algorithm: str) -> tuple[float, float, list[int], int]:
            """(wall s, own CPU s, machine /proc/stat delta, TCP retransmits) of one call."""
            if library == "p2pdl":
                on = plain if algorithm.endswith("-plain") and plain is not None else node
                np.copyto(buf, src)
                await on.barrier()
                tcp0 = _tcp_counters()
                stat0, cpu0, t0 = _proc_stat(), _cpu_self(), time.perf_counter()
                await on.allreduce(buf, algorithm=algorithm.removesuffix("-plain"))
            else:
                assert gbuf is not None and dist is not None
                gbuf.numpy()[:] = src
                dist.barrier()
                tcp0 = _tcp_counters()
                stat0, cpu0, t0 = _proc_stat(), _cpu_self(), time.perf_counter()
                dist.all_reduce(gbuf)
            wall = time.perf_counter() - t0
            cpu, stat = _cpu_self() - cpu0, _stat_delta(stat0, _proc_stat())
            return wall, cpu, stat, _tcp_counters()[1] - tcp0[1]

        for _ in range(cfg.warmup):
            for variant in variants:
                await call(*variant)
        # Correctness once per variant: identical on every rank, and equal to gloo's sum
        # (or, without gloo, to the sliced result) within float32 rounding.
        reference = None
        if gbuf is not None:
            await call("gloo", "ring")
            reference = gbuf.numpy().copy()
        checks: dict[str, dict[str, Any]] = {}
        for library, algorithm in variants:
            if library != "p2pdl":
                continue
            await call(library, algorithm)
            if reference is None:
                reference = buf.copy()
            digest = float(zlib.crc32(memoryview(buf).cast("B")))
            err = float(np.max(np.abs(buf - reference)))
            tol = float(np.max(np.abs(src))) * world * 1e-5
            rows = await gather_rows(np.array([digest, err, tol], dtype=np.float64))
            checks[algorithm] = {
                "identical_across_ranks": bool(np.all(rows[:, 0] == rows[0, 0])),
                "max_abs_err_vs_reference": float(rows[:, 1].max()),
                "per_rank": rows.tolist(),  # [crc32, max abs error, tolerance] of every rank
                "ok": bool(np.all(rows[:, 0] == rows[0, 0]) and np.all(rows[:, 1] <= rows[:, 2])),
            }
        nv, reps = len(variants), cfg.repeat
        wall = np.zeros((nv, reps))
        cpu = np.zeros((nv, reps))
        stat = np.zeros((nv, reps, len(_STAT_FIELDS)))
        retrans = np.zeros((nv, reps))
        for r in range(reps):
            for v, variant in enumerate(variants):
                wall[v, r], cpu[v, r], stat[v, r], retrans[v, r] = await call(*variant)
        walls = (await gather_rows(wall.reshape(-1))).reshape(world, nv, reps)
        cpus = (await gather_rows(cpu.reshape(-1))).reshape(world, nv, reps)
        retx = (await gather_rows(retrans.reshape(-1))).reshape(world, nv, reps)
        await node.barrier()
    if plain is not None:
        await plain.close()
    if dist is not None:
        dist.destroy_process_group()
    if rank == 0:
        report = {
            "variants": [
                {
                    "library": lib,
                    "algorithm": alg,
                    "seconds": walls[:, v].max(axis=0).tolist(),  # slowest rank per repeat
                    "cpu_seconds_sum": cpus[:, v].sum(axis=0).tolist(),  # all ranks
                    "cpu_seconds_max": cpus[:, v].max(axis=0).tolist(),  # busiest rank
                    "wall_rank0": wall[v].tolist(),
                    "proc_stat": stat[v].tolist(),
                    "tcp_retrans": retx[:, v]
                    .sum(axis=0)
                    .tolist(),  # segments, all hosts  # machine-wide jiffies during rank 0's call
                    "check": checks.get(alg) if lib == "p2pdl" else None,
                }
                for v, (lib, alg) in enumerate(variants)
            ],
            "clock_ticks": os.sysconf("SC_CLK_TCK"),
            "cpus": os.cpu_count(),
        }
        Path(cfg.out).write_text(json.dumps(report))


def _run_worker(config_path: str) -> int:
    import logging

    import uvloop

    logging.basicConfig(level=os.environ.get("P2PDL_LOG", "WARNING"))
    cfg = Config(**json.loads(Path(config_path).read_text()))
    uvloop.run(_worker(cfg, int(os.environ[RANK_ENV])))
    return 0


# --------------------------------------------------------------------------- one host count
def _run_hosts(n: int, args: argparse.Namespace, link: Any, base: Config, tmp: Path) -> dict:
    from p2pdl.testing.netns import NamespaceCluster

    with NamespaceCluster(n, link=link) as cluster:
        cfg = Config(**{**asdict(base), "world": n, "addresses": cluster.addresses})
        cfg.out = str(tmp / f"raw-n{n}.json")
        config_path = tmp / f"config-n{n}.json"
        config_path.write_text(json.dumps(asdict(cfg)))
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "GLOO_SOCKET_IFNAME": "eth0",
            "OMP_NUM_THREADS": "1",
        }
        cwd = os.getcwd()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (cwd, env.get("PYTHONPATH", "")) if p)
        argv = [sys.executable, "-m", "p2pdl.bench.scaling", "--worker", str(config_path)]
        if args.nice:
            argv = ["nice", "-n", str(args.nice), *argv]
        procs, logs = [], []
        for host in cluster:
            log_path = tmp / f"worker-n{n}-r{host.index}.log"
            logs.append(log_path)
            with open(log_path, "wb") as log:
                procs.append(
                    host.popen(
                        argv,
                        env={**env, RANK_ENV: str(host.index)},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        cwd=cwd,
                    )
                )
        stat0, t0 = _proc_stat(), time.monotonic()
        deadline = t0 + args.timeout
        status = _wait_all(procs, deadline)
        elapsed, stat = time.monotonic() - t0, _stat_delta(stat0, _proc_stat())
        if status != 0:
            tails = "\n".join(
                f"--- rank {i} ---\n{p.read_text(errors='replace')[-3000:]}"
                for i, p in enumerate(logs)
            )
            raise RuntimeError(f"N={n}: a worker failed (status {status})\n{tails}")
        raw = json.loads(Path(cfg.out).read_text())
    raw["run_seconds"] = elapsed
    raw["run_proc_stat"] = stat
    return raw


def _wait_all(procs: list[subprocess.Popen[Any]], deadline: float) -> int:
    """Exit status of the first worker that failed, 0 when all succeeded, 124 on timeout.

    The cluster's teardown kills whatever is left, so a failure or timeout just returns.
    """
    pending = list(procs)
    while pending:
        for proc in list(pending):
            try:
                code = proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            pending.remove(proc)
            if code != 0:
                return code
        if time.monotonic() > deadline:
            return 124
    return 0


# --------------------------------------------------------------------------- report
def bounds(size: int, n: int, rate_bps: int) -> tuple[float, float]:
    """(raw, header-adjusted) bandwidth bound in seconds: 2·S·(N−1)/(N·B)."""
    raw = 2 * size * (n - 1) / (n * rate_bps / 8)
    return raw, raw / GOODPUT


def _stat_summary(deltas: list[list[float]], cpus: int) -> dict[str, float]:
    """Machine-wide shares (of all CPUs) summed over the given /proc/stat deltas."""
    total = [sum(col) for col in zip(*deltas, strict=True)] if deltas else [0] * 8
    ticks = sum(total) or 1
    named = dict(zip(_STAT_FIELDS, total, strict=True))
    busy = ticks - named["idle"] - named["iowait"]
    return {
        "busy": busy / ticks,
        "user": (named["user"] + named["nice"]) / ticks,
        "system": named["system"] / ticks,
        "softirq": (named["softirq"] + named["irq"]) / ticks,
        "steal": named["steal"] / ticks,
        "busy_cores": busy / ticks * cpus,
    }


def summarize(args: argparse.Namespace, runs: dict[int, dict], rate_bps: int) -> dict[str, Any]:
    size = parse_size(args.size)
    rows = []
    for n, raw in sorted(runs.items()):
        raw_bound, adj_bound = bounds(size, n, rate_bps)
        cpus = raw["cpus"]
        for var in raw["variants"]:
            secs = var["seconds"]
            med = statistics.median(secs)
            cores = [c / w for c, w in zip(var["cpu_seconds_sum"], var["wall_rank0"], strict=True)]
            stat = _stat_summary(var["proc_stat"], cpus)
            name = var["algorithm"] if var["library"] == "p2pdl" else "gloo"
            rows.append(
                {
                    "hosts": n,
                    "name": name,
                    "library": var["library"],
                    "median_s": med,
                    "min_s": min(secs),
                    "samples_s": secs,
                    "bound_raw_s": raw_bound,
                    "bound_adj_s": adj_bound,
                    "x_bound_raw": med / raw_bound,
                    "x_bound_adj": med / adj_bound,
                    "goodput_gbit_per_host": 2 * size * (n - 1) / n / med * 8 / 1e9,
                    "worker_cpu_cores": statistics.median(cores),
                    "busiest_worker_cpu": statistics.median(
                        c / w
                        for c, w in zip(var["cpu_seconds_max"], var["wall_rank0"], strict=True)
                    ),
                    "machine": stat,
                    "other_cpu_cores": max(
                        0.0,
                        stat["busy_cores"] - statistics.median(cores) - stat["softirq"] * cpus,
                    ),
                    "tcp_retrans": statistics.median(var["tcp_retrans"]),
                    "check": var["check"],
                }
            )
    by = {(r["hosts"], r["name"]): r for r in rows}
    targets = []
    for n in sorted(runs):
        for name in ("sliced", "ring"):
            row = by.get((n, name))
            if row is not None:
                targets.append(
                    {
                        "target": f"{name} ≤ {TARGET_BOUND_FACTOR}× bound (header-adjusted)",
                        "hosts": n,
                        "value": round(row["x_bound_adj"], 3),
                        "value_raw_bound": round(row["x_bound_raw"], 3),
                        "pass": row["x_bound_adj"] <= TARGET_BOUND_FACTOR,
                    }
                )
        p2p = [r for r in rows if r["hosts"] == n and r["library"] == "p2pdl"]
        gloo = by.get((n, "gloo"))
        if p2p and gloo is not None:
            best = min(p2p, key=lambda r: r["median_s"])
            targets.append(
                {
                    "target": "p2pdl best ≤ gloo",
                    "hosts": n,
                    "value": round(best["median_s"] / gloo["median_s"], 3),
                    "best": best["name"],
                    "pass": best["median_s"] <= gloo["median_s"],
                }
            )
    if (8, "driver") in by and (8, "sliced") in by:
        ratio = by[(8, "driver")]["median_s"] / by[(8, "sliced")]["median_s"]
        targets.append(
            {
                "target": f"driver ≥ {TARGET_DRIVER_FACTOR}× sliced",
                "hosts": 8,
                "value": round(ratio, 3),
                "pass": ratio >= TARGET_DRIVER_FACTOR,
            }
        )
    return {
        "command": "python -m p2pdl bench scaling " + " ".join(args.argv),
        "size": size,
        "rate_bps": rate_bps,
        "goodput_factor": GOODPUT,
        "bound_formula": "2*S*(N-1)/(N*B); adjusted: divided by 1448/1514 (TCP payload share)",
        "targets_use": "header-adjusted bound",
        "repeat": args.repeat,
        "warmup": args.warmup,
        "nice": args.nice,
        "rows": rows,
        "targets": targets,
        "runs": {
            str(n): {
                "seconds": raw["run_seconds"],
                "machine": _stat_summary([raw["run_proc_stat"]], raw["cpus"]),
            }
            for n, raw in runs.items()
        },
        "host": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
    }


def print_table(summary: dict[str, Any], out: Any = sys.stdout) -> None:
    size, rate = summary["size"], summary["rate_bps"]
    cpus = summary["host"]["cpus"]
    print(
        f"\nallreduce of {format_size(size)} float32, hosts on {rate / 1e9:g} Gbit/s tbf links "
        f"(median of {summary['repeat']}, slowest rank)",
        file=out,
    )
    head = (
        f"{'N':>2} {'algorithm':<9} {'median ms':>9} {'min ms':>8} {'×bound':>7} "
        f"{'×raw':>6} {'Gbit/s':>6} {'wrk':>5} {'sirq':>5} {'other':>5} {'busy':>5} "
        f"{'retx':>5} {'ok':>3}"
    )
    print(head, file=out)
    last = None
    for row in summary["rows"]:
        n = row["hosts"]
        if n != last:
            print(
                f"{n:>2} {'bound':<9} {row['bound_adj_s'] * 1e3:>9.1f} "
                f"{'':>8} {'(raw':>7} {row['bound_raw_s'] * 1e3:>5.1f})",
                file=out,
            )
            last = n
        m = row["machine"]
        check = row["check"]
        ok = "" if check is None else ("ok" if check["ok"] else "BAD")
        print(
            f"{n:>2} {row['name']:<9} {row['median_s'] * 1e3:>9.1f} {row['min_s'] * 1e3:>8.1f} "
            f"{row['x_bound_adj']:>7.2f} {row['x_bound_raw']:>6.2f} "
            f"{row['goodput_gbit_per_host']:>6.3f} {row['worker_cpu_cores']:>5.2f} "
            f"{m['softirq'] * cpus:>5.2f} {row['other_cpu_cores']:>5.2f} {m['busy_cores']:>5.2f} "
            f"{row['tcp_retrans']:>5.0f} {ok:>3}",
            file=out,
        )
    print(
        "×bound: median / header-adjusted bound; ×raw: / raw 2·S·(N−1)/(N·B); Gbit/s: payload "
        "each host sends; CPU in cores (of "
        f"{cpus}) during the call: wrk = the workers' own (all ranks, user+sys), sirq = "
        "softirq+irq (veth/bridge/tbf), other = the rest of the machine, busy = all; retx: TCP "
        "segments retransmitted (all hosts, median per call)",
        file=out,
    )
    for t in summary["targets"]:
        verdict = "PASS" if t["pass"] else "MISS"
        extra = f" (vs raw bound {t['value_raw_bound']})" if "value_raw_bound" in t else ""
        best = f" (best: {t['best']})" if "best" in t else ""
        print(
            f"target N={t['hosts']}: {t['target']}: {t['value']}{extra}{best} {verdict}", file=out
        )


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = summary["rows"]
    ns = sorted({r["hosts"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["name"] for r in rows):
        pts = sorted((r["hosts"], r["median_s"] * 1e3) for r in rows if r["name"] == name)
        style = "--" if name == "gloo" else "-"
        ax.plot(*zip(*pts, strict=True), style, marker="o", label=name)
    first = {r["hosts"]: r for r in rows}
    ax.plot(ns, [first[n]["bound_raw_s"] * 1e3 for n in ns], ":", color="black", label="bound")
    ax.plot(
        ns,
        [first[n]["bound_adj_s"] * 1e3 for n in ns],
        "-.",
        color="gray",
        label="bound (TCP payload)",
    )
    ax.set_xlabel("hosts N")
    ax.set_ylabel("allreduce time (ms, median)")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xticks(ns)
    ax.set_title(
        f"AllReduce {format_size(summary['size'])} float32, "
        f"{summary['rate_bps'] / 1e9:g} Gbit/s per host (netns + tbf)"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def _parse_hosts(text: str) -> list[int]:
    try:
        hosts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--hosts {text!r}: expected a list like 2,4,8") from None
    if not hosts or any(not 2 <= h <= 64 for h in hosts):
        raise UsageError(f"--hosts {text!r}: each count must be in 2..64")
    return sorted(set(hosts))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        if args.worker:
            return _run_worker(args.worker)
        args.argv = argv
        return _main(args)
    except UsageError as exc:
        print(f"p2pdl bench scaling: error: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from p2pdl.errors import ConfigError
    from p2pdl.testing import netns

    hosts = _parse_hosts(args.hosts)
    size = parse_size(args.size)
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    if not algorithms or any(a.removesuffix("-plain") not in ALGORITHMS for a in algorithms):
        raise UsageError(f"--algorithms {args.algorithms!r}: choose from {', '.join(ALGORITHMS)}")
    if args.repeat < 1 or args.warmup < 0:
        raise UsageError("--repeat must be ≥ 1 and --warmup ≥ 0")
    try:
        link = netns.LinkSpec(rate=args.rate, delay=args.delay, burst=args.burst, queue=args.queue)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    ok, reason = netns.available(rate=True)
    if not ok:
        raise UsageError(f"namespace hosts are not available here: {reason}")
    if link.delay_us:
        ok, reason = netns.available(delay=True)
        if not ok:
            detail = reason.rsplit(": ", 1)[-1].strip()
            raise UsageError(
                f"--delay {args.delay}: link delay is not available on this kernel, it lacks "
                f"the netem qdisc (tc qdisc add … netem: {detail})"
            )
    gloo = not args.no_gloo
    if gloo:
        try:
            import torch.distributed  # noqa: F401
        except ImportError:
            print("torch is not installed: gloo is left out", file=sys.stderr)
            gloo = False
    rate_bps = link.rate_bps
    assert rate_bps is not None
    runs: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="p2pdl-scaling-") as tmp:
        base = Config(
            world=0,
            addresses=[],
            size=size,
            algorithms=algorithms,
            gloo=gloo,
            repeat=args.repeat,
            warmup=args.warmup,
            chunk_bytes=args.chunk_bytes,
            secret=secrets.token_hex(32),
            out="",
        )
        for n in hosts:
            print(f"scaling: N={n} hosts …", file=sys.stderr, flush=True)
            try:
                runs[n] = _run_hosts(n, args, link, base, Path(tmp))
            except RuntimeError as exc:
                print(f"p2pdl bench scaling: {exc}", file=sys.stderr)
                return 1
    summary = summarize(args, runs, rate_bps)
    print_table(summary)
    json_path = Path(args.json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, indent=1))
    plot(summary, Path(args.plot_path))
    print(f"results written to {json_path}, plot to {args.plot_path}")
    checks_ok = all(r["check"] is None or r["check"]["ok"] for r in summary["rows"])
    return 0 if checks_ok and all(math.isfinite(r["median_s"]) for r in summary["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""AllReduce benchmark: p2pdl's algorithms against torch.distributed (gloo) and Open MPI.

    python -m p2pdl bench allreduce --nodes 2 --sizes 4K,1M,16M,64M \\
        --algorithms auto,sliced,ring,direct --compression none,bf16 --compare gloo,mpi

Every library runs in the same worker processes (under `mpirun` when MPI is compared and
installed, plain subprocesses otherwise), interleaved: for each size and each repeat, every
p2pdl variant, then gloo, then MPI, so load from elsewhere on the host hits them alike. Each
call starts after that library's own barrier, is timed on every rank, and a repeat's time is
the slowest rank's; the table reports medians over the repeats and ratios to gloo measured
in the same run. The p2pdl result is checked once per size against gloo's for the same
inputs (bit-identical across ranks; equal to gloo within float rounding, or within bf16
rounding when compressed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import secrets
import statistics
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from p2pdl.bench import _procs
from p2pdl.launch.procs import free_port

KNOWN_ALGORITHMS = (
    "auto",
    "direct",
    "sliced",
    "ring",
    "shm",
    "hierarchical",
    "hierarchical-loopback",
    "driver",
    "tree",
)
"""`hierarchical-loopback`: the hierarchical allreduce with its phases within a host forced
onto loopback TCP instead of shared memory (for comparison; needs --host-layout). Any of
them with `-plain` (e.g. `sliced-plain`) runs on a second cluster of the same ranks with
`encryption=False`, for encrypted-vs-plain ratios in one run; with `-sync` (e.g. `auto-sync`)
on a third cluster driven through the blocking facade (`SyncNode`, the loop in its own thread,
as `p2pdl.connect()` gives users), called from the worker's main thread."""
PLAIN = "-plain"
SYNC = "-sync"
SUFFIXES = (PLAIN, SYNC)
UNCOMPRESSED_ONLY = ("shm", "driver", "tree")
"""Algorithms that send full precision only (shm sends nothing): no compressed variants."""
KNOWN_COMPRESSIONS = ("none", "bf16", "fp16")
KNOWN_PEERS = ("gloo", "mpi")
UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1 << 20, "MB": 1 << 20}
UNITS.update({"MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30})

# Targets: (nodes, size in bytes or None for every size, compression, max p2pdl/peer ratio).
TARGETS = (
    (2, 4 << 10, "none", 0.2),
    (2, 1 << 20, "none", 0.7),
    (2, 64 << 20, "none", 0.8),
    (2, 64 << 20, "bf16", 0.5),
    (4, None, "none", 0.9),
)
MPI_TARGETS = (
    (None, 4 << 10, "none", 4.0),
    (None, 1 << 20, "none", 1.5),
    (None, 64 << 20, "none", 1.0),
)


class UsageError(Exception):
    """A bad command line: reported on one line, exit status 2."""


# ------------------------------------------------------------------------ arguments
def parse_size(text: str) -> int:
    """'4K' -> 4096, '64M' -> 67108864 (binary units); a multiple of 4 bytes (float32)."""
    raw = text.strip().upper()
    digits = raw.rstrip("BKMGI")
    unit = raw[len(digits) :]
    if not digits.isdigit() or unit not in UNITS:
        raise UsageError(f"bad size {text!r} (use e.g. 4K, 1M, 64M)")
    size = int(digits) * UNITS[unit]
    if size < 4 or size % 4:
        raise UsageError(f"size {text!r} must be a positive multiple of 4 bytes (float32)")
    return size


def format_size(size: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size}B"


def _choices(text: str, known: tuple[str, ...], what: str) -> list[str]:
    items = [item.strip().lower() for item in text.split(",") if item.strip()]
    if not items:
        raise UsageError(f"--{what} needs at least one value")
    for item in items:
        if item not in known:
            raise UsageError(f"unknown {what} {item!r} (choose from {', '.join(known)})")
    return list(dict.fromkeys(items))


def default_repeats(size: int) -> int:
    if size <= 1 << 20:
        return 20
    if size <= 16 << 20:
        return 10
    return 7


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="p2pdl bench allreduce",
        description="Time p2pdl allreduce against gloo and Open MPI on local processes.",
    )
    parser.add_argument("--nodes", "-n", type=int, default=2, help="worker processes (ranks)")
    parser.add_argument("--sizes", default="4K,1M,16M,64M", help="buffer sizes in bytes")
    parser.add_argument("--algorithms", default="auto,sliced,ring,direct")
    parser.add_argument("--compression", default="none,bf16")
    parser.add_argument(
        "--compare", default="gloo,mpi", help="peers to time alongside: gloo, mpi, or 'none'"
    )
    parser.add_argument("--repeat", type=int, default=None, help="timed calls per size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per size")
    parser.add_argument("--json", dest="json_path", default=None, help="where to write results")
    parser.add_argument("--chunk-bytes", type=int, default=None, help="p2pdl chunk size")
    parser.add_argument(
        "--inline-bytes", type=int, default=None, help="p2pdl Compute.inline_bytes (tuning)"
    )
    parser.add_argument(
        "--sockbuf", type=int, default=None, help="SO_SNDBUF/SO_RCVBUF on p2pdl links (tuning)"
    )
    parser.add_argument(
        "--gc",
        choices=("on", "freeze", "off"),
        default="on",
        help="Python's cyclic GC in the workers: on (default), freeze after setup, off",
    )
    parser.add_argument(
        "--host-layout",
        default=None,
        help="comma-separated host label per rank (e.g. a,a,b,b): the ranks act as if they ran "
        "on those hosts (host identities), for the hierarchical allreduce",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for the run")
    parser.add_argument(
        "--launcher",
        choices=("auto", "mpirun", "subprocess"),
        default="auto",
        help="how to start the ranks (auto: mpirun when MPI is compared and installed)",
    )
    parser.add_argument(
        "--order",
        choices=("rotate", "fixed"),
        default="rotate",
        help="order of the libraries within a repeat (rotate: shift by one each repeat)",
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="also record where each shared-memory call spends its time (per phase)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


@dataclass
class Config:
    nodes: int
    sizes: list[int]
    algorithms: list[str]
    compressions: list[str]
    compare: list[str]
    repeat: int | None
    warmup: int
    chunk_bytes: int | None
    inline_bytes: int | None = None
    sockbuf: int | None = None
    gc: str = "on"
    order: str = "rotate"
    leader_port: int = 0
    plain_port: int = 0
    sync_port: int = 0
    gloo_port: int = 0
    phases: bool = False
    secret: str = ""
    out: str = ""
    mpi: bool = False
    mpi_status: str | None = None
    host_layout: list[str] | None = None


def parse_config(args: argparse.Namespace) -> Config:
    if args.nodes < 1 or args.nodes > 64:
        raise UsageError(f"--nodes must be in 1..64, got {args.nodes}")
    if args.repeat is not None and args.repeat < 1:
        raise UsageError(f"--repeat must be positive, got {args.repeat}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    if args.chunk_bytes is not None and args.chunk_bytes < 1024:
        raise UsageError(f"--chunk-bytes must be at least 1024, got {args.chunk_bytes}")
    sizes = list(dict.fromkeys(parse_size(s) for s in args.sizes.split(",") if s.strip()))
    if not sizes:
        raise UsageError("--sizes needs at least one size")
    compare = (
        []
        if args.compare.strip().lower() in ("", "none")
        else _choices(args.compare, KNOWN_PEERS, "compare")
    )
    layout = None
    if args.host_layout is not None:
        layout = [label.strip() for label in args.host_layout.split(",")]
        if len(layout) != args.nodes or not all(layout):
            raise UsageError(
                f"--host-layout needs one non-empty label per rank ({args.nodes}), "
                f"got {args.host_layout!r}"
            )
    known = (*KNOWN_ALGORITHMS, *(a + x for a in KNOWN_ALGORITHMS for x in SUFFIXES))
    algorithms = _choices(args.algorithms, known, "algorithms")
    if layout is None and any(a.startswith("hierarchical") for a in algorithms):
        raise UsageError("the hierarchical algorithms need --host-layout (e.g. a,a,b,b)")
    return Config(
        host_layout=layout,
        nodes=args.nodes,
        sizes=sizes,
        algorithms=algorithms,
        compressions=_choices(args.compression, KNOWN_COMPRESSIONS, "compression"),
        compare=compare,
        repeat=args.repeat,
        warmup=args.warmup,
        chunk_bytes=args.chunk_bytes,
        inline_bytes=args.inline_bytes,
        sockbuf=args.sockbuf,
        gc=args.gc,
        order=args.order,
        phases=args.phases,
    )


# --------------------------------------------------------------------------- worker
def _base(algorithm: str) -> str:
    """The algorithm a variant runs (without -plain / -sync)."""
    for suffix in SUFFIXES:
        algorithm = algorithm.removesuffix(suffix)
    return algorithm


def _variants(cfg: Config) -> list[tuple[str, str, str]]:
    """(library, algorithm, compression) in the order each repeat runs them."""
    out = [
        ("p2pdl", a, c)
        for a in cfg.algorithms
        for c in cfg.compressions
        if not (_base(a) in UNCOMPRESSED_ONLY and c != "none")
    ]
    if "gloo" in cfg.compare:
        out.append(("gloo", "-", "none"))
    if "mpi" in cfg.compare and cfg.mpi:
        out.append(("mpi", "-", "none"))
    return out


async def _worker(cfg: Config) -> None:
    import numpy as np

    from p2pdl.node import Node

    rank, world = _procs.worker_rank()
    assert world == cfg.nodes
    comm = None
    mpi = None
    if cfg.mpi:
        from mpi4py import MPI as mpi

        comm = mpi.COMM_WORLD
    dist = None
    if "gloo" in cfg.compare:
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{cfg.gloo_port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=300),
        )
    kwargs: dict[str, Any] = {"secret": cfg.secret}
    if cfg.chunk_bytes:
        kwargs["chunk_bytes"] = cfg.chunk_bytes

    def make(port: int, **extra: Any) -> Node:
        if rank == 0:
            return Node(world_size=world, host="127.0.0.1", port=port, **kwargs, **extra)
        return Node(rank, leader=("127.0.0.1", port), **kwargs, **extra)

    sync = None
    if any(a.endswith(SYNC) for a in cfg.algorithms):
        from p2pdl.sync import SyncNode

        # Formed before the async clusters, in the same order on every rank: the blocking
        # start holds this thread, and the peers' handshakes wait in the listen backlog.
        sync = SyncNode(lambda: make(cfg.sync_port))
    from p2pdl.collectives import shm as shm_module

    node = make(cfg.leader_port)
    plain = (
        make(cfg.plain_port, encryption=False)
        if any(a.endswith(PLAIN) for a in cfg.algorithms)
        else None
    )

    async def call(
        bufs: SimpleNamespace, library: str, algorithm: str, compression: str
    ) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process, all threads) of one call."""
        if library == "p2pdl" and algorithm.endswith(SYNC):
            assert sync is not None
            np.copyto(bufs.buf, bufs.src)
            sync.barrier()
            marks = _start_phases(cfg, shm_module)
            c0, t0 = time.process_time(), time.perf_counter()
            sync.allreduce(
                bufs.buf,
                algorithm=_base(algorithm),
                compression=None if compression == "none" else compression,
            )
            elapsed = time.perf_counter() - t0, time.process_time() - c0
            _keep_phases(bufs, (library, algorithm, compression), marks, t0, elapsed[0])
            return elapsed
        if library == "p2pdl":
            on = plain if algorithm.endswith(PLAIN) else node
            assert on is not None
            algorithm = algorithm.removesuffix(PLAIN)
            np.copyto(bufs.buf, bufs.src)
            arena = on.collectives.shm
            kept = arena.host_usable if arena is not None else None
            if algorithm == "hierarchical-loopback" and arena is not None:
                arena.host_usable = False  # every rank alike: phases 1 and 3 over loopback
            await on.barrier()
            marks = _start_phases(cfg, shm_module)
            c0, t0 = time.process_time(), time.perf_counter()
            await on.allreduce(
                bufs.buf,
                algorithm=algorithm.removesuffix("-loopback"),
                compression=None if compression == "none" else compression,
            )
            elapsed = time.perf_counter() - t0, time.process_time() - c0
            _keep_phases(bufs, (library, algorithm, compression), marks, t0, elapsed[0])
            if algorithm == "hierarchical-loopback" and arena is not None:
                arena.host_usable = kept
            return elapsed
        if library == "gloo":
            assert bufs.gbuf is not None and dist is not None
            bufs.gbuf.numpy()[:] = bufs.src
            dist.barrier()
            c0, t0 = time.process_time(), time.perf_counter()
            dist.all_reduce(bufs.gbuf)
            return time.perf_counter() - t0, time.process_time() - c0
        assert comm is not None and bufs.mbuf is not None and mpi is not None
        np.copyto(bufs.mbuf, bufs.src)
        comm.Barrier()
        c0, t0 = time.process_time(), time.perf_counter()
        comm.Allreduce(mpi.IN_PLACE, bufs.mbuf, op=mpi.SUM)
        return time.perf_counter() - t0, time.process_time() - c0

    variants = _variants(cfg)
    report: dict[str, Any] = {"sizes": []}
    if plain is not None:
        await plain.start()
    from p2pdl.kernels import shmcall

    if shmcall.available():
        shmcall.compiled("f")  # (users' first calls take the Python steps while it compiles)
    async with node:
        assert node.rank == rank, (node.rank, rank)
        if cfg.host_layout is not None and node.collectives is not None:
            node.collectives.host_ids = list(cfg.host_layout)
        _tune(node, cfg)
        if cfg.gc == "freeze":
            import gc

            gc.collect()
            gc.freeze()
        elif cfg.gc == "off":
            import gc

            gc.disable()

        async def gather_rows(row: np.ndarray) -> np.ndarray:
            """Every rank's `row`, stacked in rank order (an allgather made of a sum)."""
            table = np.zeros((world, row.size), dtype=np.float64)
            table[rank] = row
            await node.allreduce(table, algorithm="direct" if table.nbytes < 1 << 16 else "auto")
            return table

        async def stream_speed(src: np.ndarray) -> float:
            """GB/s one rank moves (read + write) copying (n-1)/n of a buffer between private
            arrays while every rank does the same: what the memory gives a rank when all of
            them stream at once, as they do in a shared-memory call. Median of 9 copies."""
            part = src[: max(1, src.size * (world - 1) // world)]
            scratch = np.empty_like(part)
            np.copyto(scratch, part)  # (its pages faulted in first)
            seconds = []
            for _ in range(9):
                await node.barrier()
                t0 = time.perf_counter()
                np.copyto(scratch, part)
                seconds.append(time.perf_counter() - t0)
            return 2 * part.nbytes / statistics.median(seconds) / 1e9

        for size in cfg.sizes:
            elems = size // 4
            rng = np.random.default_rng(1000 * rank + elems % 997)
            src = rng.standard_normal(elems, dtype=np.float32)
            buf = np.empty_like(src)
            gbuf = torch.from_numpy(np.empty_like(src)) if dist is not None else None
            mbuf = np.empty_like(src) if comm is not None else None
            bufs = SimpleNamespace(src=src, buf=buf, gbuf=gbuf, mbuf=mbuf, phases=None)

            for _ in range(cfg.warmup):
                for variant in variants:
                    await call(bufs, *variant)
            # Correctness, once per size and variant: same bits on every rank, and equal to
            # gloo's sum of the same inputs (within bf16/fp16 rounding when compressed).
            reference = None
            if dist is not None:
                await call(bufs, "gloo", "-", "none")
                reference = gbuf.numpy().copy()
            checks: list[dict[str, Any]] = []
            for library, algorithm, compression in variants:
                if library != "p2pdl":
                    continue
                await call(bufs, library, algorithm, compression)
                if algorithm.endswith(SYNC) and sync is not None:
                    chosen = sync.node.collectives.last_algorithm
                else:
                    on = plain if algorithm.endswith(PLAIN) and plain is not None else node
                    chosen = on.collectives.last_algorithm
                crc = zlib.crc32(memoryview(buf).cast("B"))
                err = float(np.max(np.abs(buf - reference))) if reference is not None else 0.0
                tol = 0.0
                if reference is not None:
                    bound = float(np.max(np.abs(src))) * world
                    tol = bound * (2.0**-7 if compression != "none" else 1e-6)
                rows = await gather_rows(np.array([crc, err, tol], dtype=np.float64))
                same = bool(np.all(rows[:, 0] == rows[0, 0]))
                close = bool(np.all(rows[:, 1] <= rows[:, 2]))
                checks.append(
                    {
                        "algorithm": algorithm,
                        "chosen": chosen,
                        "compression": compression,
                        "identical_across_ranks": same,
                        "max_abs_err_vs_gloo": float(rows[:, 1].max())
                        if reference is not None
                        else None,
                        "ok": same and close,
                    }
                )
            repeats = cfg.repeat or default_repeats(size)
            times = np.zeros((2, len(variants), repeats), dtype=np.float64)
            bufs.phases = {} if cfg.phases else None
            for r in range(repeats):
                shift = r % len(variants) if cfg.order == "rotate" else 0
                for v in [*range(shift, len(variants)), *range(shift)]:
                    times[:, v, r] = await call(bufs, *variants[v])
            table = (await gather_rows(times.reshape(-1))).reshape(world, 2, len(variants), repeats)
            if cfg.phases:  # the same gathers on every rank: one per p2pdl variant
                phases = _phase_medians(bufs.phases or {})
                for variant in variants:
                    if variant[0] != "p2pdl":
                        continue
                    key = "/".join(variant)
                    mine = phases.get(key, {})
                    row = np.array([mine.get(p, -1.0) for p in PHASE_NAMES])
                    per_rank = await gather_rows(row)
                    if rank == 0 and np.all(per_rank[:, -1] >= 0):
                        report.setdefault("_phases", {})[f"{size}|{key}"] = {
                            p: round(float(per_rank[:, i].mean()), 4)
                            for i, p in enumerate(PHASE_NAMES)
                            if np.all(per_rank[:, i] >= 0)
                        }
            stream_gbs = None
            if cfg.phases and world > 1:  # the memory bound (see `shm_traffic_bytes`)
                speeds = await gather_rows(np.array([await stream_speed(src)]))
                stream_gbs = float(speeds.mean())
            slowest = table[:, 0].max(axis=0)
            cpu_total = table[:, 1].sum(axis=0)
            if rank == 0:
                report["sizes"].append(
                    {
                        "size": size,
                        "repeats": repeats,
                        "variants": [
                            {
                                "library": lib,
                                "algorithm": alg,
                                "compression": comp,
                                "samples_ms": [round(t * 1e3, 4) for t in slowest[v]],
                                "cpu_ms": [round(t * 1e3, 4) for t in cpu_total[v]],
                            }
                            for v, (lib, alg, comp) in enumerate(variants)
                        ],
                        "checks": checks,
                        "phases": {},
                        "stream_gbs": stream_gbs,
                    }
                )
                print(f"  {format_size(size)} done", file=sys.stderr, flush=True)
            del src, buf, gbuf, mbuf, bufs
        await node.barrier()
    if sync is not None:
        sync.close()
    if plain is not None:
        await plain.close()
    if dist is not None:
        dist.destroy_process_group()
    if rank == 0:
        for entry in report["sizes"]:
            for key, value in report.get("_phases", {}).items():
                size_text, variant = key.split("|", 1)
                if int(size_text) == entry["size"]:
                    entry["phases"][variant] = value
        report.pop("_phases", None)
        Path(cfg.out).write_text(json.dumps(report))


def shm_traffic_bytes(nbytes: int, n: int) -> float:
    """Bytes one rank reads and writes in a shared-memory allreduce of `nbytes` (`shm`):
    copy-in (n-1)/n of the buffer (read + write), the owner's reduce (n slices of 1/n read,
    1/n written — and written twice with the two-rank fused sum, which needs no copy-own),
    copy-own 1/n (read + write), copy-out (n-1)/n (read + write)."""
    if n < 2:
        return 0.0
    part, slice_ = nbytes * (n - 1) / n, nbytes / n
    if n == 2:
        return 2 * part + 4 * slice_ + 2 * part
    return 2 * part + (n + 1) * slice_ + 2 * slice_ + 2 * part


PHASE_NAMES = (
    "before",
    "setup",
    "copy-in",
    "wait-enter",
    "reduce",
    "copy-own",
    "wait-out",
    "copy-out",
    "compiled",
    "after",
    "total",
)
"""A shared-memory call's phases (`shm.PHASES` marks), with what the API does before the
first mark and after the last (argument checks, `auto`, operation setup, the sync facade's
thread hops), and the call's whole time. A call that the compiled small call
(`kernels.shmcall`) finished has one step, "compiled", between "before" and "after"; the
median of each phase is over the calls that had it."""


def _start_phases(cfg: Config, shm_module: Any) -> list[Any] | None:
    if not cfg.phases:
        return None
    marks: list[Any] = []
    shm_module.PHASES = marks
    return marks


def _keep_phases(
    bufs: SimpleNamespace,
    key: tuple[str, str, str],
    marks: list[Any] | None,
    t0: float,
    wall: float,
) -> None:
    """Per-phase durations (ms) of the call just timed, when it ran through shared memory."""
    if marks is None or bufs.phases is None or len(marks) != 1:
        return  # phases off, warm-up, or the call did not run through shared memory
    points = marks[0]
    sample = {"before": points[0][1] - t0}
    for (_, a), (name, b) in itertools.pairwise(points):
        sample[name] = b - a
    sample["after"] = t0 + wall - points[-1][1]
    sample["total"] = wall
    bufs.phases.setdefault("/".join(key), []).append(sample)


def _phase_medians(phases: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for key, samples in phases.items():
        names = {name for sample in samples for name in sample}
        out[key] = {
            name: statistics.median(s[name] for s in samples if name in s) * 1e3 for name in names
        }
    return out


def _tune(node: Any, cfg: Config) -> None:
    """Apply the tuning knobs (experiments only; the defaults are what users get)."""
    import socket

    if cfg.inline_bytes is not None:
        node.collectives.compute.inline_bytes = cfg.inline_bytes
    mesh = node.session.mesh
    if cfg.sockbuf is not None:
        for peer in range(node.world_size):
            if peer == node.rank:
                continue
            transport = mesh.link(peer)._transport
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, cfg.sockbuf)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, cfg.sockbuf)


def _run_worker(config_path: str) -> int:
    import logging

    import uvloop

    logging.basicConfig(level=os.environ.get("P2PDL_LOG", "WARNING"))
    cfg = Config(**json.loads(Path(config_path).read_text()))
    uvloop.run(_worker(cfg))
    return 0


# --------------------------------------------------------------------------- report
def summarize(cfg: Config, raw: dict[str, Any]) -> dict[str, Any]:
    """Medians, bus bandwidth and ratios to gloo from the workers' raw samples."""
    n = cfg.nodes
    rows = []
    for entry in raw["sizes"]:
        size = entry["size"]
        gloo_ms = mpi_ms = None
        for var in entry["variants"]:
            if var["library"] == "gloo":
                gloo_ms = statistics.median(var["samples_ms"])
            if var["library"] == "mpi":
                mpi_ms = statistics.median(var["samples_ms"])
        checks = {(c["algorithm"], c["compression"]): c for c in entry["checks"]}
        for var in entry["variants"]:
            med = statistics.median(var["samples_ms"])
            busbw = 2 * size * (n - 1) / n / (med / 1e3) / 1e9 if n > 1 and med > 0 else None
            row = {
                "size": size,
                "library": var["library"],
                "algorithm": var["algorithm"],
                "chosen": checks.get((var["algorithm"], var["compression"]), {}).get("chosen")
                if var["algorithm"] == "auto"
                else None,
                "compression": var["compression"],
                "median_ms": round(med, 4),
                "min_ms": round(min(var["samples_ms"]), 4),
                "cpu_ms": round(statistics.median(var["cpu_ms"]), 3),
                "busbw_gbs": round(busbw, 3) if busbw is not None else None,
                "ratio_vs_gloo": round(med / gloo_ms, 3) if gloo_ms else None,
                "ratio_vs_mpi": round(med / mpi_ms, 3) if mpi_ms else None,
                "samples_ms": var["samples_ms"],
            }
            key = "/".join((var["library"], var["algorithm"], var["compression"]))
            if key in entry.get("phases", {}):
                row["phases_ms"] = entry["phases"][key]
                if entry.get("stream_gbs"):
                    traffic = shm_traffic_bytes(size, n)
                    row["memory_bound_ms"] = round(traffic / entry["stream_gbs"] / 1e6, 4)
                    row["stream_gbs"] = round(entry["stream_gbs"], 2)
            check = checks.get((var["algorithm"], var["compression"]))
            if var["library"] == "p2pdl" and check is not None:
                row["correct"] = check["ok"]
                row["identical_across_ranks"] = check["identical_across_ranks"]
                row["max_abs_err_vs_gloo"] = check["max_abs_err_vs_gloo"]
            rows.append(row)
    targets = []
    for nodes, tsize, comp, limit in TARGETS:
        if nodes != n:
            continue
        for row in rows:
            if (
                row["library"] == "p2pdl"
                and row["algorithm"] == "auto"
                and row["compression"] == comp
                and (tsize is None or row["size"] == tsize)
            ):
                ratio = row["ratio_vs_gloo"]
                targets.append(
                    {
                        "nodes": n,
                        "size": row["size"],
                        "compression": comp,
                        "peer": "gloo",
                        "limit": limit,
                        "ratio": ratio,
                        "pass": ratio is not None and ratio <= limit,
                    }
                )
    for _nodes, tsize, comp, limit in MPI_TARGETS:
        for row in rows:
            if (
                row["library"] == "p2pdl"
                and row["algorithm"] == "auto"
                and row["compression"] == comp
                and row["size"] == tsize
                and row["ratio_vs_mpi"] is not None
            ):
                ratio = row["ratio_vs_mpi"]
                targets.append(
                    {
                        "nodes": n,
                        "size": row["size"],
                        "compression": comp,
                        "peer": "mpi",
                        "limit": limit,
                        "ratio": ratio,
                        "pass": ratio <= limit,
                    }
                )
    return {
        "nodes": n,
        "sizes": cfg.sizes,
        "mpi": "measured" if cfg.mpi else cfg.mpi_status,
        "rows": rows,
        "targets": targets,
        "host": {"cpus": os.cpu_count(), "loadavg_at_end": list(os.getloadavg())},
    }


def print_table(summary: dict[str, Any], out: Any = sys.stdout) -> None:
    n = summary["nodes"]
    print(
        f"\nallreduce, {n} ranks on loopback: median over repeats of the slowest rank's time; "
        "cpu ms = CPU time of all ranks (all threads) per call",
        file=out,
    )
    head = f"{'size':>6} {'library/algorithm':<22} {'compr':<6} {'ms':>9} {'busbw GB/s':>10}"
    print(head + f" {'p2pdl/gloo':>10} {'p2pdl/mpi':>9} {'cpu ms':>8} {'check':>6}", file=out)
    for row in summary["rows"]:
        name = row["library"]
        if row["library"] == "p2pdl":
            name += f"/{row['algorithm']}"
            if row["chosen"]:
                name += f"→{row['chosen']}"
        ratio = mpi_ratio = ""
        if row["library"] == "p2pdl":
            ratio = "-" if row["ratio_vs_gloo"] is None else f"{row['ratio_vs_gloo']:.3f}"
            mpi = row.get("ratio_vs_mpi")
            mpi_ratio = "-" if mpi is None else f"{mpi:.3f}"
        busbw = f"{row['busbw_gbs']:.2f}" if row["busbw_gbs"] is not None else "-"
        check = ("ok" if row["correct"] else "FAIL") if "correct" in row else ""
        print(
            f"{format_size(row['size']):>6} {name:<22} {row['compression']:<6} "
            f"{row['median_ms']:>9.3f} {busbw:>10} {ratio:>10} {mpi_ratio:>9} "
            f"{row['cpu_ms']:>8.2f} {check:>6}",
            file=out,
        )
    if summary["mpi"] != "measured" and summary["mpi"]:
        print(f"{'':>6} {'mpi':<22} {'none':<6} {'not installed':>9}  ({summary['mpi']})", file=out)
    phased = [row for row in summary["rows"] if "phases_ms" in row]
    if phased:
        print(
            "\nwhere a shared-memory call's time goes (ms; each rank's median, mean over ranks)",
            file=out,
        )
        print(f"{'size':>6} {'variant':<22} " + " ".join(f"{p:>10}" for p in PHASE_NAMES), file=out)
        for row in phased:
            cells = " ".join(
                f"{row['phases_ms'][p]:>10.4f}" if p in row["phases_ms"] else f"{'-':>10}"
                for p in PHASE_NAMES
            )
            print(f"{format_size(row['size']):>6} {row['algorithm']:<22} {cells}", file=out)
        bounded = {row["size"]: row for row in phased if "memory_bound_ms" in row}
        for size, row in sorted(bounded.items()):
            print(
                f"memory bound {format_size(size)}: {shm_traffic_bytes(size, n) / 2**20:.3g} MiB "
                f"moved per rank at {row['stream_gbs']} GB/s (each rank copying while all do) "
                f"= {row['memory_bound_ms']} ms",
                file=out,
            )
    for t in summary["targets"]:
        verdict = "PASS" if t["pass"] else "FAIL"
        ratio = "n/a" if t["ratio"] is None else f"{t['ratio']:.3f}"
        print(
            f"target n={t['nodes']} {format_size(t['size'])} {t['compression']}: "
            f"p2pdl/{t['peer']} {ratio} <= {t['limit']} {verdict}",
            file=out,
        )


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.worker:
            return _run_worker(args.worker)
        cfg = parse_config(args)
    except UsageError as exc:
        print(f"p2pdl bench allreduce: error: {exc}", file=sys.stderr)
        return 2
    if "gloo" in cfg.compare:
        try:
            import torch.distributed  # noqa: F401
        except ImportError:
            print("torch is not installed: gloo is left out", file=sys.stderr)
            cfg.compare.remove("gloo")
    mpi_missing = _procs.mpi_status()
    if args.launcher == "mpirun" and mpi_missing:
        print(f"p2pdl bench allreduce: error: --launcher mpirun: {mpi_missing}", file=sys.stderr)
        return 2
    use_mpirun = args.launcher == "mpirun" or (
        args.launcher == "auto" and "mpi" in cfg.compare and mpi_missing is None
    )
    if "mpi" in cfg.compare:
        cfg.mpi = use_mpirun
        cfg.mpi_status = mpi_missing or (None if use_mpirun else "not launched under mpirun")
    cfg.leader_port = free_port()
    cfg.plain_port = free_port()
    cfg.sync_port = free_port()
    cfg.gloo_port = free_port()
    cfg.secret = secrets.token_hex(32)
    json_path = Path(args.json_path or f"bench-results/allreduce-n{cfg.nodes}.json")
    with tempfile.TemporaryDirectory(prefix="p2pdl-bench-") as tmp:
        cfg.out = str(Path(tmp) / "raw.json")
        config_path = Path(tmp) / "config.json"
        config_path.write_text(json.dumps(cfg.__dict__))
        worker_argv = ["-m", "p2pdl.bench.allreduce", "--worker", str(config_path)]
        print(
            f"allreduce: {cfg.nodes} ranks, sizes {','.join(map(format_size, cfg.sizes))}, "
            f"{'mpirun' if use_mpirun else 'subprocesses'}",
            file=sys.stderr,
        )
        status = _procs.run_workers(
            worker_argv, cfg.nodes, use_mpirun=use_mpirun, timeout=args.timeout
        )
        if status != 0:
            print(f"p2pdl bench allreduce: a worker failed (status {status})", file=sys.stderr)
            return 1
        raw = json.loads(Path(cfg.out).read_text())
    summary = summarize(cfg, raw)
    print_table(summary)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, indent=1))
    print(f"results written to {json_path}")
    return 0 if all(math.isfinite(r["median_ms"]) for r in summary["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

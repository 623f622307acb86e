"""The benchmark commands run end to end at toy sizes and reject bad arguments.

They assert behaviour only (rows present, message counts), never speed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(
    *args: str, timeout: float = 240.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pdl", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=None if env is None else {**os.environ, **env},
    )


def test_schedule_bench_interleaves_rounds_and_counts_leader_messages() -> None:
    done = _bench(
        "schedule", "--nodes", "2", "--group-sizes", "4", "--bsp", "--steps", "32", "--repeat", "2"
    )
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in rows] == [
        "| BSP (1 step, leader round trip per step)",
        "| G=4, lookahead 1",
    ]
    assert "2 round(s)" in done.stdout
    bsp, grouped = (row.split(" | ") for row in rows)
    assert float(bsp[3]) == pytest.approx(2.0, abs=0.01)  # a plan and a report per step
    assert float(grouped[3]) <= 2 / 4 + 0.01  # Drizzle: at most two messages per group


@pytest.mark.parametrize(
    "args",
    [
        ["--group-sizes", "x"],
        ["--group-sizes", "0"],
        ["--nodes", "1"],
        ["--repeat", "0"],
    ],
)
def test_schedule_bench_rejects_bad_arguments(args: list[str]) -> None:
    done = _bench("schedule", *args, timeout=60.0)
    assert done.returncode == 2
    assert "error:" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--algorithms", "hierarchical"], "need --host-layout"),
        (["--nodes", "4", "--host-layout", "a,a,b"], "one non-empty label per rank"),
        (["--algorithms", "bogus"], "algorithms"),
    ],
)
def test_allreduce_bench_rejects_bad_arguments(args: list[str], message: str) -> None:
    done = _bench("allreduce", "--compare", "none", *args, timeout=60.0)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--partitions", "2,x"], "--partitions"),
        (["--partitions", "0"], "--partitions must be >= 1"),
        (["--standalone", "--master", "local[2]"], "leave out --master"),
        (["--plot", "out.png"], "--plot draws the --standalone runs"),
        (["--model", "huge"], "invalid choice"),
        (["--conf", "spark.x"], "KEY=VALUE"),
        (["--group-size", "many"], "--group-size"),
    ],
)
def test_spark_bench_rejects_bad_arguments(args: list[str], message: str) -> None:
    done = _bench("spark", *args, timeout=60.0)  # refused before Spark or a namespace starts
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_allreduce_bench_with_a_host_layout_runs_the_hierarchical_variants(tmp_path) -> None:
    done = _bench(
        "allreduce", "--nodes", "4", "--host-layout", "a,a,b,b", "--sizes", "256K",
        "--algorithms", "hierarchical,hierarchical-loopback", "--compression", "none",
        "--compare", "none", "--repeat", "3", "--warmup", "1",
        "--json", str(tmp_path / "allreduce.json"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()]
    rows = [row for row in rows if len(row) > 1 and row[1].startswith("p2pdl/")]
    assert [row[1] for row in rows] == ["p2pdl/hierarchical", "p2pdl/hierarchical-loopback"]
    assert all(row[-1] == "ok" for row in rows)  # bit-identical on every rank, right sum


def test_storm_bench_measures_a_flood_and_a_joiner() -> None:
    done = _bench("storm", "--idle", "100", "--rounds", "1")
    assert done.returncode == 0, done.stderr
    import json

    (line,) = [line for line in done.stdout.splitlines() if line.startswith('{"event"')]
    (row,) = json.loads(line)["rounds"]
    assert row["idle"] == 100 and row["join_s"] > 0
    assert row["leader_fds"] < 100  # the flood was turned away, not kept


def test_allreduce_bench_runs_encrypted_and_plain_side_by_side() -> None:
    done = _bench(
        "allreduce", "--nodes", "2", "--sizes", "64K", "--algorithms", "sliced,sliced-plain",
        "--compression", "none", "--compare", "none", "--repeat", "3", "--warmup", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "p2pdl/sliced-plain" in done.stdout and "p2pdl/sliced " in done.stdout


def test_allreduce_bench_times_the_sync_facade_and_breaks_shm_calls_into_phases(
    tmp_path,
) -> None:
    import json

    out = tmp_path / "phases.json"
    done = _bench(
        "allreduce", "--nodes", "2", "--sizes", "4K,256K", "--algorithms", "shm,shm-sync",
        "--compression", "none", "--compare", "none", "--repeat", "5", "--warmup", "1",
        "--phases", "--json", str(out),
        env={"P2PDL_SHM_COMPILED": "0"},  # every step in Python, so each has its mark
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "where a shared-memory call's time goes" in done.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {(r["algorithm"], r["size"]) for r in rows} == {
        (a, s) for a in ("shm", "shm-sync") for s in (4096, 262144)
    }
    for row in rows:
        assert row["correct"], row
        phases = row["phases_ms"]
        # Every phase of the call was seen, and the phases fit in the call's time.
        assert {"before", "copy-in", "wait-enter", "reduce", "copy-out", "after"} <= set(phases)
        assert all(v >= 0 for v in phases.values())
        assert phases["copy-in"] + phases["reduce"] <= phases["total"]
        # The memory bound: the bytes the call moves at what the memory gave each rank.
        assert row["stream_gbs"] > 0 and row["memory_bound_ms"] > 0, row
    assert "memory bound 256K: 1 MiB moved per rank" in done.stdout


def test_allreduce_bench_phases_show_the_compiled_call_as_one_step(tmp_path) -> None:
    import json

    from p2pdl.kernels import shmcall

    if not shmcall.available():
        pytest.skip("the compiled call needs the JIT on x86-64")
    out = tmp_path / "phases.json"
    done = _bench(
        "allreduce", "--nodes", "2", "--sizes", "4K", "--algorithms", "shm", "--compression",
        "none", "--compare", "none", "--repeat", "9", "--warmup", "2", "--phases", "--json",
        str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["correct"], row
    # Calls that finished in the compiled call have "compiled" between before and after;
    # any resumed in Python have their own steps' marks.
    assert {"before", "after"} <= set(row["phases_ms"]), row
    assert "compiled" in row["phases_ms"] or "wait-out" in row["phases_ms"], row


def test_shm_traffic_model_counts_each_pass_over_the_buffer() -> None:
    from p2pdl.bench.allreduce import shm_traffic_bytes

    mib = 1 << 20
    # n = 2: copy-in 1/2 (r+w), fused reduce (2 reads, 2 writes of 1/2), copy-out 1/2 (r+w).
    assert shm_traffic_bytes(64 * mib, 2) == 256 * mib
    # n = 4: copy-in 3/4 (r+w), reduce 4 reads + 1 write of 1/4, copy-own, copy-out 3/4.
    assert shm_traffic_bytes(4 * mib, 4) == (6 + 5 + 2 + 6) * mib
    assert shm_traffic_bytes(mib, 1) == 0

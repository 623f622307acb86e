"""Real node processes on loopback: the fixture, peer loss, the CLI and the launcher."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from p2pdl.testing.cluster import pid_alive

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_allreduce_in_processes(local_cluster) -> None:
    cluster = local_cluster(3, run="tests.workers:allreduce_ranks", run_args={"size": 5000})
    results = cluster.results()
    expected = [0.0, 6.0, 6.0 * 4999]
    assert results == {0: expected, 1: expected, 2: expected}


@pytest.mark.parametrize("victim", [0, 2])
def test_sigkill_fails_barrier_with_peer_lost(local_cluster, victim: int) -> None:
    op_timeout = 10.0
    cluster = local_cluster(
        3,
        run="tests.workers:barrier_until_lost",
        run_args={"victim": victim},
        op_timeout=op_timeout,
    )
    codes = cluster.wait()
    assert codes[victim] == -signal.SIGKILL
    for node in cluster.nodes:
        if node.rank == victim:
            continue
        result = [e for e in node.events if e["event"] == "result"][-1]["value"]
        assert result["error"] == "PeerLostError", result
        assert result["ranks"] == [victim]
        assert f"rank {victim}" in result["message"]
        assert result["seconds"] < op_timeout


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="no memfd_create on this system")
def test_sigkill_between_shm_allreduces_names_the_victim_and_leaves_no_segment(
    local_cluster,
) -> None:
    """Segments are memfds: a killed rank leaves no file anywhere (no sweep needed)."""
    op_timeout = 10.0
    cluster = local_cluster(
        3, run="tests.workers:shm_until_lost", run_args={"victim": 1}, op_timeout=op_timeout
    )
    pids = cluster.pids()
    codes = cluster.wait()
    assert codes[1] == -signal.SIGKILL
    for node in cluster.nodes:
        if node.rank == 1:
            continue
        result = [e for e in node.events if e["event"] == "result"][-1]["value"]
        assert result["first"] == 0.0 + 1.0 + 2.0
        assert result["error"] == "PeerLostError", result
        assert result["ranks"] == [1]
        assert result["seconds"] < op_timeout
    shm_dir = "/dev/shm"
    left = os.listdir(shm_dir) if os.path.isdir(shm_dir) else []
    assert [f for f in left if any(f.startswith(f"p2pdl-{p}-") for p in pids)] == []


def test_fixture_leaves_no_process(local_cluster) -> None:
    cluster = local_cluster(2, run="tests.workers:exit_with", run_args={"rank": -1})
    pids = cluster.pids()
    assert all(pid_alive(pid) for pid in pids)
    cluster.close()
    assert not any(pid_alive(pid) for pid in pids)


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pdl", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        **kwargs,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["node", "--bogus"],
        ["node", "--lead"],
        ["node", "--peers", "nonsense", "--rank", "0"],
        ["node", "--leader", "host-without-port"],
        ["node", "--lead", "--nodes", "2", "--port", "99999"],
        ["node", "--lead", "--nodes", "2", "--host", "0.0.0.0"],
        ["launch", "-n", "0", "x.py"],
        ["launch", "-n", "2"],
        ["bench", "nothing"],
        ["frobnicate"],
    ],
)
def test_bad_arguments_exit_2_with_one_line(args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "P2PDL_SECRET"}
    done = _run(args, env=env)
    assert done.returncode == 2, done
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "error" in lines[0]


@pytest.mark.parametrize("command", ["node", "launch", "bench"])
def test_help_on_every_command(command: str) -> None:
    done = _run([command, "--help"])
    assert done.returncode == 0
    assert "usage" in done.stdout


def test_node_prints_ready_line_and_stops_cleanly_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2pdl", "node", "--lead", "--nodes", "1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "P2PDL_SECRET": secrets.token_hex(32)},
    )
    try:
        assert proc.stdout is not None
        events = []
        for line in proc.stdout:
            events.append(json.loads(line))
            if events[-1]["event"] == "ready":
                break
        ready = events[-1]
        assert ready["event"] == "ready"
        assert ready["rank"] == 0 and ready["world_size"] == 1
        host, port = ready["address"].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_launch_runs_a_cluster_and_prefixes_output(tmp_path: Path) -> None:
    script = _script(
        tmp_path,
        """
        import numpy as np
        import p2pdl

        with p2pdl.connect() as node:
            data = np.full(10, node.rank + 1.0)
            node.allreduce(data)
            print("sum", node.rank, node.world_size, data[0])
        """,
    )
    done = _run(["launch", "-n", "3", str(script)])
    assert done.returncode == 0, done.stderr
    lines = sorted(line for line in done.stdout.splitlines() if " sum " in line)
    assert lines == [f"[rank {r}] sum {r} 3 6.0" for r in range(3)]


def test_launch_takes_exits_in_reaped_order_even_before_their_callbacks_ran() -> None:
    """Two exits can land in one wake-up with the second's done callback still queued: it
    sorts after the reaped ones instead of failing the launcher (seen in CI)."""
    from p2pdl.launch import reaped_order

    a, b, c = "a", "b", "c"
    assert reaped_order({b, a}, [b, a]) == [b, a]
    assert reaped_order({a, b}, [b]) == [b, a]
    assert reaped_order({c}, []) == [c]


def test_launch_propagates_failure_and_leaves_no_process(tmp_path: Path) -> None:
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    script = _script(
        tmp_path,
        f"""
        import os, sys, pathlib
        import p2pdl

        rank = int(os.environ["P2PDL_RANK"])
        pathlib.Path({str(pid_dir)!r}, str(rank)).write_text(str(os.getpid()))
        with p2pdl.connect() as node:
            node.barrier()
            if rank == 1:
                os._exit(7)  # a crash: the others see the lost connection after it exits
            node.barrier()   # fails once rank 1 is gone, or the launcher stops us first
        """,
    )
    started = time.monotonic()
    done = _run(["launch", "-n", "3", "--grace", "2", str(script)])
    assert done.returncode == 7, (done.stdout, done.stderr)
    assert "rank 1 exited with 7" in done.stderr
    assert time.monotonic() - started < 90
    pids = [int(p.read_text()) for p in pid_dir.iterdir()]
    assert len(pids) == 3
    assert not any(pid_alive(pid) for pid in pids)


def _start_node(args: list[str], secret: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "p2pdl", "node", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "P2PDL_SECRET": secret},
    )


def _events_until(proc: subprocess.Popen[str], event: str) -> dict:
    assert proc.stdout is not None
    for line in proc.stdout:
        item = json.loads(line)
        if item["event"] == event:
            return item
    raise AssertionError(f"no {event} line; stderr: {proc.stderr.read() if proc.stderr else ''}")


def test_plain_rendezvous_through_the_cli_and_clean_sigterm() -> None:
    """`node --lead --nodes 2` and `node --leader H:P` (no job) form a cluster and stop on
    SIGTERM with exit 0; the joiner listens on port 0 and advertises its real port."""
    secret = "s" * 16
    leader = _start_node(["--lead", "--nodes", "2", "--port", "0"], secret)
    procs = [leader]
    try:
        address = _events_until(leader, "listening")["address"]
        worker = _start_node(["--leader", address, "--port", "0"], secret)
        procs.append(worker)
        ready = [_events_until(p, "ready") for p in procs]
        assert sorted(r["rank"] for r in ready) == [0, 1]
        assert all(r["world_size"] == 2 for r in ready)
        assert int(ready[1]["address"].rsplit(":", 1)[1]) > 0
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(30) for proc in procs] == [0, 0]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_launch_runs_a_whole_job_locally() -> None:
    done = _run(["launch", "-n", "3", "--job", "examples.numpy_linear:task"])
    assert done.returncode == 0, done.stderr
    summaries = [
        json.loads(line.split("] ", 1)[1])
        for line in done.stdout.splitlines()
        if '"event": "done"' in line
    ]
    assert len(summaries) == 3
    leader = next(s for s in summaries if "accounting" in s)
    assert leader["accounting"]["exact"] is True
    assert len({s["weights_sha256"] for s in summaries}) == 1

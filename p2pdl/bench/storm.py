"""`python -m p2pdl bench storm --idle 1000`: what a flood of idle connections costs a node.

Starts a leader node process (`python -m p2pdl node --lead --nodes 2`), opens `--idle`
unauthenticated connections to it that never say a word, and reports the leader's resident
memory before and after (VmRSS from /proc) and how long a real joiner then takes to join:
from the joiner's `listening` event (its process is up) to its `ready` event (it has
authenticated with the leader and formed the cluster). Rounds repeat the whole thing.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from typing import Any

from p2pdl.launch.procs import stop_processes


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _events(
    proc: subprocess.Popen[str], want: str, deadline: float
) -> dict[str, tuple[float, dict[str, Any]]]:
    """Read JSON lines until `want`: every event seen, with the time it arrived."""
    seen: dict[str, tuple[float, dict[str, Any]]] = {}
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the node exited ({proc.wait()}) before {want!r}")
        if line.startswith("{"):
            event = json.loads(line)
            seen[event["event"]] = (time.monotonic(), event)
            if event["event"] == want:
                return seen
    raise RuntimeError(f"no {want!r} before the deadline")


def _settled_fds(pid: int, deadline: float) -> int:
    """The node's open descriptors once their count has stopped changing (it has accepted
    and turned away what the storm sent), polled under a deadline."""
    last, steady = -1, 0
    while time.monotonic() < deadline and steady < 5:
        count = len(os.listdir(f"/proc/{pid}/fd"))
        steady = steady + 1 if count == last else 0
        last = count
        time.sleep(0.05)  # polling a condition under a deadline, not a synchronisation
    return last


def one_round(idle: int, timeout: float) -> dict[str, Any]:
    env = {**os.environ, "P2PDL_SECRET": secrets.token_hex(32), "PYTHONUNBUFFERED": "1"}
    node = [sys.executable, "-m", "p2pdl", "node"]
    procs: list[subprocess.Popen[str]] = []
    sockets: list[socket.socket] = []
    deadline = time.monotonic() + timeout
    try:
        leader = subprocess.Popen(
            [*node, "--lead", "--nodes", "2", "--connect-timeout", str(timeout)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        procs.append(leader)
        address = str(_events(leader, "listening", deadline)["listening"][1]["address"])
        host, port = address.rsplit(":", 1)
        before = _rss_kib(leader.pid)
        for _ in range(idle):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sockets.append(sock)
        fds = _settled_fds(leader.pid, deadline)
        storm = _rss_kib(leader.pid)
        joiner = subprocess.Popen(
            [*node, "--leader", address, "--rank", "1", "--run", "p2pdl.bench.storm:nothing"],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        procs.append(joiner)
        seen = _events(joiner, "ready", deadline)
        return {
            "idle": idle,
            "rss_before_mib": round(before / 1024, 1),
            "rss_growth_mib": round((storm - before) / 1024, 2),
            "leader_fds": fds,
            "join_s": round(seen["ready"][0] - seen["listening"][0], 3),
        }
    finally:
        for sock in sockets:
            sock.close()
        stop_processes(procs, grace=5.0)


async def nothing(node: Any) -> None:
    """The joiner's `--run` function: it has joined; nothing more to do."""
    return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="p2pdl bench storm", description=__doc__)
    parser.add_argument("--idle", type=int, default=1000, help="idle connections to open")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    if args.idle < 0 or args.rounds < 1:
        parser.error("--idle must be >= 0 and --rounds >= 1")
    rows = [one_round(args.idle, args.timeout) for _ in range(args.rounds)]
    print(f"{args.idle} idle unauthenticated connections to a leader node, {args.rounds} rounds")
    print(
        "| round | leader RSS before (MiB) | growth with the storm (MiB) | leader fds | "
        "join time (s) |"
    )
    print("|---:|---:|---:|---:|---:|")
    for i, row in enumerate(rows, 1):
        print(
            f"| {i} | {row['rss_before_mib']} | {row['rss_growth_mib']} | {row['leader_fds']} "
            f"| {row['join_s']} |"
        )
    print(json.dumps({"event": "bench_storm", "rounds": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

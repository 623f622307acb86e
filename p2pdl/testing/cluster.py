"""A local cluster of real node processes on 127.0.0.1, for tests.

    with LocalCluster(3, run="tests.workers:allreduce_ones") as cluster:
        results = cluster.results()          # {rank: value returned by the function}

Rank 0 leads the rendezvous on port 0; the others join it. Every process runs in its own
session so teardown can kill it and anything it started, by pid. Each rank's stdout and
stderr are kept, so a failing test can show them; every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from p2pdl.errors import P2PDLError
from p2pdl.launch.procs import signal_group, stop_processes
from p2pdl.testing.output import ProcessOutput


class ClusterError(P2PDLError):
    """A cluster process failed, or did not reach a state within its deadline."""


def _event(line: str) -> dict[str, Any] | None:
    """The JSON event a node printed on this line, if it is one."""
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


@dataclass
class NodeProcess:
    """One rank's process, its parsed JSON events and its raw output."""

    rank: int
    popen: subprocess.Popen[bytes]
    output: ProcessOutput

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.output.items

    def log(self) -> str:
        return self.output.text()


class LocalCluster:
    """n `python -m p2pdl node` processes forming one cluster through a leader."""

    def __init__(
        self,
        n: int,
        *,
        run: str | None = None,
        run_args: dict[str, Any] | None = None,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        timeout: float = 60.0,
        op_timeout: float = 20.0,
        connect_timeout: float = 20.0,
        cwd: str | None = None,
    ) -> None:
        if n < 1:
            raise ValueError(f"a cluster needs at least one node, got {n}")
        self.n = n
        self.run = run
        self.run_args = run_args or {}
        self.extra_args = list(extra_args)
        self.timeout = timeout
        self.op_timeout = op_timeout
        self.connect_timeout = connect_timeout
        self.cwd = cwd or os.getcwd()
        self.secret = secrets.token_hex(32)
        self.env = {
            **os.environ,
            **(env or {}),
            "P2PDL_SECRET": self.secret,
            "PYTHONUNBUFFERED": "1",
        }
        path = self.env.get("PYTHONPATH", "")
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (self.cwd, path) if p)
        self.nodes: list[NodeProcess] = []
        self.leader_address: str | None = None
        self._deadline = 0.0

    # --------------------------------------------------------------------- processes
    def command(self, rank: int) -> list[str]:
        """The command line of `rank`'s node process (subclasses add options)."""
        argv = [
            sys.executable,
            "-m",
            "p2pdl",
            "node",
            "--port",
            "0",
            "--op-timeout",
            str(self.op_timeout),
            "--connect-timeout",
            str(self.connect_timeout),
        ]
        if rank == 0:
            argv += ["--lead", "--nodes", str(self.n)]
        else:
            assert self.leader_address is not None
            argv += ["--leader", self.leader_address, "--rank", str(rank)]
        if self.run:
            argv += ["--run", self.run, "--run-args", json.dumps(self.run_args)]
        return argv + self.extra_args

    def popen(self, rank: int, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start `rank`'s process in its own session (subclasses start it elsewhere)."""
        return subprocess.Popen(argv, start_new_session=True, **kwargs)

    def _spawn(self, rank: int) -> NodeProcess:
        popen = self.popen(
            rank,
            self.command(rank),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=self.cwd,
        )
        node = NodeProcess(rank, popen, ProcessOutput(f"rank {rank}", popen, parse=_event))
        self.nodes.append(node)
        return node

    def wait_event(self, rank: int, event: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until `rank` printed `event` (or fail if it exited / the deadline passed)."""
        node = self.nodes[rank]
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)

        def printed() -> dict[str, Any] | None:
            return next((item for item in node.events if item["event"] == event), None)

        return node.output.wait_for(printed, repr(event), deadline, error=ClusterError)

    def start(self) -> LocalCluster:
        """Start every rank and wait until all of them are connected."""
        self._deadline = time.monotonic() + self.timeout
        self._spawn(0)
        listening = self.wait_event(0, "listening")
        self.leader_address = listening["address"]
        for rank in range(1, self.n):
            self._spawn(rank)
        for rank in range(self.n):
            self.wait_event(rank, "ready")
        return self

    # ------------------------------------------------------------------------ results
    def wait(self, timeout: float | None = None) -> dict[int, int]:
        """Wait for every process to exit; returns {rank: exit code}."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        codes = {}
        for node in self.nodes:
            left = max(0.1, deadline - time.monotonic())
            try:
                codes[node.rank] = node.popen.wait(left)
            except subprocess.TimeoutExpired:
                raise ClusterError(
                    f"rank {node.rank} still running after the deadline\n{self.logs()}"
                ) from None
        return codes

    def results(self, timeout: float | None = None) -> dict[int, Any]:
        """Wait for all ranks; return what each `--run` function returned (or raise)."""
        codes = self.wait(timeout)
        failed = {rank: code for rank, code in codes.items() if code != 0}
        if failed:
            raise ClusterError(f"ranks failed with exit codes {failed}\n{self.logs()}")
        out = {}
        for node in self.nodes:
            node_results = [e for e in node.events if e["event"] == "result"]
            if not node_results:
                raise ClusterError(f"rank {node.rank} returned no result\n{self.logs()}")
            out[node.rank] = node_results[-1]["value"]
        return out

    def kill(self, rank: int, signum: int = signal.SIGKILL) -> None:
        """Send `signum` to rank's process group."""
        signal_group(self.nodes[rank].popen, signum)

    def logs(self) -> str:
        return "\n".join(
            f"--- rank {n.rank} (exit {n.popen.poll()}) ---\n{n.log()}" for n in self.nodes
        )

    def pids(self) -> list[int]:
        return [node.popen.pid for node in self.nodes]

    def close(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL) and reap it."""
        stop_processes([node.popen for node in self.nodes], grace=5.0)
        for node in self.nodes:
            if node.popen.stdout is not None:
                node.popen.stdout.close()

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False

"""The one process-group kill (`p2pdl.launch.procs`), on real child processes.

Nothing sleeps to synchronise: a child says it is ready on its stdout, and an exit is waited
for on a pidfd, each under a deadline.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from p2pdl.launch.procs import free_port, signal_group, stop_processes

DEADLINE = 10.0

# Ignores SIGTERM, says so, then waits for signals forever.
IGNORES_TERM = """
import signal
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
while True:
    signal.pause()
"""
# Dies of SIGTERM; its child (same process group) ignores SIGTERM. Prints the grandchild's pid
# once the grandchild ignores SIGTERM.
WITH_GRANDCHILD = """
import os, signal
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.write(w, b"x")
    while True:
        signal.pause()
os.read(r, 1)
print(pid, flush=True)
while True:
    signal.pause()
"""

Spawn = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start `python -c script` (in its own session unless told otherwise); all are stopped at
    teardown."""
    procs: list[subprocess.Popen[str]] = []

    def start(script: str, *, own_session: bool = True) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=own_session,
        )
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        stop_processes(procs, grace=0.0)
        for proc in procs:
            assert proc.stdout is not None
            proc.stdout.close()


def _line(proc: subprocess.Popen[str]) -> str:
    """The child's first line of output, waited for at most DEADLINE seconds."""
    assert proc.stdout is not None
    if not select.select([proc.stdout], [], [], DEADLINE)[0]:
        raise AssertionError(f"no line from {proc.args} within {DEADLINE}s")
    return proc.stdout.readline().strip()


def test_child_ignoring_sigterm_is_sigkilled_after_the_grace(spawn: Spawn) -> None:
    proc = spawn(IGNORES_TERM)
    assert _line(proc) == "ready"
    started = time.monotonic()
    stop_processes([proc], grace=0.5)
    elapsed = time.monotonic() - started
    assert proc.returncode == -signal.SIGKILL
    assert 0.45 <= elapsed < DEADLINE


def test_one_deadline_for_all_children(spawn: Spawn) -> None:
    procs = [spawn(IGNORES_TERM) for _ in range(3)]
    assert [_line(p) for p in procs] == ["ready"] * 3
    started = time.monotonic()
    stop_processes(procs, grace=1.0)
    elapsed = time.monotonic() - started
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 3
    assert 0.95 <= elapsed < 2.5  # one grace in all, not one per child


def test_process_group_with_a_grandchild_is_all_gone(spawn: Spawn) -> None:
    proc = spawn(WITH_GRANDCHILD)
    grandchild = int(_line(proc))
    pidfd = os.pidfd_open(grandchild)  # pins the grandchild: readable once it has exited
    try:
        started = time.monotonic()
        stop_processes([proc], grace=30.0)
        # The leader died of SIGTERM at once: no waiting out the grace for the grandchild, which
        # ignores SIGTERM and still got the group's SIGKILL.
        assert time.monotonic() - started < DEADLINE
        assert proc.returncode == -signal.SIGTERM
        assert select.select([pidfd], [], [], DEADLINE)[0], "the grandchild outlived its group"
    finally:
        os.close(pidfd)


def test_child_without_a_session_of_its_own_is_still_killed(spawn: Spawn) -> None:
    proc = spawn(IGNORES_TERM, own_session=False)
    assert _line(proc) == "ready"
    assert signal_group(proc, 0) is False  # it leads no process group
    stop_processes([proc], grace=0.1)
    assert proc.returncode == -signal.SIGKILL


def test_signal_group_on_a_reaped_child_returns_false(spawn: Spawn) -> None:
    proc = spawn("pass")
    assert proc.wait(timeout=DEADLINE) == 0
    assert signal_group(proc, signal.SIGTERM) is False
    assert signal_group(proc.pid, signal.SIGTERM) is False
    stop_processes([proc], grace=5.0)  # nothing left to stop: returns at once
    assert proc.returncode == 0


def test_signal_group_reaches_a_live_group(spawn: Spawn) -> None:
    proc = spawn(IGNORES_TERM)
    assert _line(proc) == "ready"
    assert signal_group(proc, 0) is True
    assert signal_group(proc.pid, signal.SIGKILL) is True
    assert proc.wait(timeout=DEADLINE) == -signal.SIGKILL


def test_free_port_can_be_bound() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.create_server(("127.0.0.1", port)) as server:
        assert server.getsockname()[1] == port

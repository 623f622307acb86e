"""Child processes: the one process-group kill, and a free port to hand a child.

Every child we stop runs in its own session (``start_new_session=True``), so its pid is its
process group id and one signal reaches it and everything it started. A group is signalled
only while its leader is not reaped: until then the leader's pid, and so the group id, cannot
be taken by an unrelated process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from typing import Any, Protocol

__all__ = ["free_port", "signal_group", "stop_processes"]

_log = logging.getLogger(__name__)

_REAP_TIMEOUT = 5.0
"""How long :func:`stop_processes` waits for the SIGKILLed; only a process stuck in the
kernel takes longer, and it is then left unreaped rather than waited on forever."""


class _Child(Protocol):
    """A child we started: a :class:`subprocess.Popen` or an ``asyncio.subprocess.Process``."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...


def signal_group(pid_or_popen: int | _Child, signum: int) -> bool:
    """Send ``signum`` to the process group led by a pid or by a child we started.

    Returns whether it was sent: False when the child was reaped already (its pid may be
    someone else's by now), when no such group exists, or when it is not ours to signal.
    """
    if isinstance(pid_or_popen, int):
        pid = pid_or_popen
    elif pid_or_popen.returncode is not None:
        return False
    else:
        pid = pid_or_popen.pid
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_processes(popens: Iterable[subprocess.Popen[Any]], *, grace: float) -> None:
    """Stop children and everything in their process groups, and reap them; never hangs.

    SIGTERM goes to every group; the leaders get ``grace`` seconds (one deadline for all) to
    exit. Then every group gets SIGKILL, also one whose leader exited of the SIGTERM, so that
    nothing it started outlives it, and every leader is reaped. A child that leads no group
    (started without a session of its own) is SIGKILLed by itself.
    """
    procs = list(popens)
    for proc in procs:
        signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        _wait_exited(proc, deadline)
    for proc in procs:
        if not signal_group(proc, signal.SIGKILL) and proc.returncode is None:
            with contextlib.suppress(OSError):
                proc.kill()
    deadline = time.monotonic() + _REAP_TIMEOUT
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _log.warning("process %d did not die of SIGKILL; left unreaped", proc.pid)


def _wait_exited(proc: subprocess.Popen[Any], deadline: float) -> None:
    """Wait until ``proc`` exits or ``deadline`` passes, without reaping it (a pidfd turns
    readable at exit), so that its group id stays ours for the SIGKILL that follows."""
    if proc.returncode is not None:
        return
    try:
        pidfd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return  # reaped behind our back: nothing left to wait for
    except (AttributeError, OSError):  # no pidfds here: wait by reaping
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, deadline - time.monotonic()))
        return
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.poll(max(0, round((deadline - time.monotonic()) * 1000)))
    finally:
        os.close(pidfd)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago; whoever gets it must bind it soon."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])

"""The ip/tc commands a run is built and removed with, each under a deadline.

Every command is one :func:`_cmd` call that raises :class:`NetnsError` naming the command and
its stderr; :func:`_shape_commands` turns a :class:`LinkSpec` into tc commands (netem root with
a tbf child), and :func:`_delete_namespaces` removes namespaces after killing what runs in them.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from p2pdl.errors import P2PDLError
from p2pdl.testing.netns.spec import LinkSpec

_NETNS_DIR = Path("/run/netns")
_CMD_TIMEOUT = 20.0


class NetnsError(P2PDLError):
    """A namespace, link or qdisc command failed, or namespaces cannot be used here."""

    def __init__(self, message: str, *, command: Sequence[str] = (), stderr: str = "") -> None:
        super().__init__(message)
        self.command = tuple(command)
        self.stderr = stderr


def _cmd(argv: Sequence[str], *, timeout: float = _CMD_TIMEOUT) -> str:
    """Run one setup command; return its stdout or raise NetnsError naming it and its stderr."""
    text = shlex.join(argv)
    try:
        done = subprocess.run(
            list(argv), check=True, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.CalledProcessError as exc:
        stderr = (exc.stderr or "").strip()
        raise NetnsError(
            f"`{text}` failed with exit status {exc.returncode}: {stderr or '(no stderr)'}",
            command=argv,
            stderr=stderr,
        ) from None
    except subprocess.TimeoutExpired:
        raise NetnsError(f"`{text}` timed out after {timeout:g}s", command=argv) from None
    except OSError as exc:
        raise NetnsError(f"`{text}` could not start: {exc}", command=argv) from None
    return done.stdout


def _netns_list() -> set[str]:
    out = _cmd(["ip", "-j", "netns", "list"]).strip()
    return {entry["name"] for entry in json.loads(out)} if out else set()


def _shape_commands(ns: str, dev: str, link: LinkSpec, *, with_delay: bool) -> list[list[str]]:
    """tc commands for ``dev`` in ``ns``: netem root (if delayed) with tbf child (if rated)."""
    tc = ["tc", "-n", ns, "qdisc", "replace", "dev", dev]
    rate, burst, limit = link.rate_bps, link.burst_bytes, link.limit_bytes
    tbf = (
        []
        if rate is None
        else ["tbf", "rate", f"{rate}bit", "burst", str(burst), "limit", str(limit)]
    )
    delay_us = link.delay_us if with_delay else 0
    if delay_us == 0:
        return [[*tc, "root", "handle", "1:", *tbf]] if tbf else []
    # netem keeps packets in flight during the delay: room for ``rate * delay`` worth of
    # minimum-size-ish packets plus a full tbf queue, and plenty when unshaped.
    packets = 10_000 if rate is None else 2 * ((rate // 8 * delay_us // 10**6 + limit) // 500)
    netem = ["netem", "delay", f"{delay_us}us", "limit", str(max(1000, packets))]
    cmds = [[*tc, "root", "handle", "1:", *netem]]
    if tbf:
        cmds.append([*tc, "parent", "1:1", "handle", "10:", *tbf])
    return cmds


def _disable_ipv6(ns: str) -> None:
    if Path("/proc/sys/net/ipv6").exists():
        settings = ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
        _cmd(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *settings])


# --------------------------------------------------------------------------- teardown helpers


def _ns_inode(ns: str) -> int | None:
    try:
        return (_NETNS_DIR / ns).stat().st_ino
    except OSError:
        return None


def _kill_namespace_processes(ns: str) -> int:
    """SIGKILL every process inside ``ns`` (all are ours); return how many were signalled.

    Each pid is pinned with a pidfd and re-checked to still live in ``ns`` before the signal, so
    a pid reused by an unrelated process in the meantime is never hit.
    """
    ino = _ns_inode(ns)
    if ino is None:
        return 0
    try:
        pids = [int(p) for p in _cmd(["ip", "netns", "pids", ns]).split()]
    except NetnsError:
        return 0
    killed = 0
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue  # gone already
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == ino:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                killed += 1
        except OSError:
            pass
        finally:
            os.close(pidfd)
    return killed


def _delete_namespaces(names: Sequence[str], errors: list[str]) -> None:
    existing = _netns_list()
    for ns in names:
        if ns not in existing:
            continue
        _kill_namespace_processes(ns)
        try:
            _cmd(["ip", "netns", "del", ns])
        except NetnsError as exc:
            errors.append(str(exc))

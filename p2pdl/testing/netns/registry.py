"""Which runs exist: run ids and namespace names, lock files, stale cleanup, live teardown.

A run flocks its lock file under ``/run/p2pdl-netns`` from before its first namespace exists
until its last is gone; the kernel releases the lock when the run dies, however it dies.
Live clusters of this process are torn down on SIGTERM (if SIGTERM had its default disposition,
the cluster cleans up and then dies of the signal as it would have) and at interpreter exit.
:func:`cleanup_stale` removes what a crashed (SIGKILLed) run left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import re
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from p2pdl.errors import ConfigError
from p2pdl.testing.netns.commands import NetnsError, _delete_namespaces, _netns_list

if TYPE_CHECKING:
    from p2pdl.testing.netns.cluster import NamespaceCluster

_log = logging.getLogger(__name__)

DEFAULT_PREFIX = "p2"
"""Namespaces are named ``<prefix>h-<rid>-<i>`` (hosts) and ``<prefix>s-<rid>`` (switch)."""

_STATE_DIR = Path("/run/p2pdl-netns")
_RUN_ID_BYTES = 4
_PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,5}")
_NAME_RE_TEMPLATE = r"(?P<prefix>{prefix})(?P<kind>[hst])-(?P<rid>[0-9a-f]{{{n}}})(?:-\d+)?"


def _take_lock(rid: str) -> int:
    """Create and flock ``<rid>.lock``; held for the run's life, released by the kernel on death."""
    path = _STATE_DIR / f"{rid}.lock"
    try:
        _STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise NetnsError(f"cannot create the run lock {path}: {exc}") from None
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fresh file (O_EXCL): cannot block
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _release_lock(rid: str, fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(FileNotFoundError):
            (_STATE_DIR / f"{rid}.lock").unlink()
        os.close(fd)


def cleanup_stale(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Delete namespaces (and their links, qdiscs, processes) of runs that are no longer alive.

    Only names of our exact pattern (``<prefix>h-<rid>-<i>``, ``<prefix>s-<rid>``, and the
    ``<prefix>t-<rid>`` of :func:`available`'s probe) are touched,
    and only when no live process holds the run's lock file (a live run keeps it flocked).
    Returns the deleted namespace names.
    """
    _check_prefix(prefix)
    pattern = re.compile(_NAME_RE_TEMPLATE.format(prefix=re.escape(prefix), n=2 * _RUN_ID_BYTES))
    by_run: dict[str, list[str]] = {}
    for ns in sorted(_netns_list()):
        if match := pattern.fullmatch(ns):
            by_run.setdefault(match.group("rid"), []).append(ns)
    removed: list[str] = []
    errors: list[str] = []
    for rid, names in sorted(by_run.items()):
        if _run_is_alive(rid):
            continue
        names.sort(key=lambda n: n.startswith(f"{prefix}s-"))  # the switch last
        _delete_namespaces(names, errors)
        left = _netns_list()
        removed.extend(n for n in names if n not in left)
        with contextlib.suppress(FileNotFoundError):
            (_STATE_DIR / f"{rid}.lock").unlink()
    if errors:
        raise NetnsError("cleanup_stale: " + "; ".join(errors))
    return removed


def _run_is_alive(rid: str) -> bool:
    with _live_lock:
        if rid in _live:
            return True
    try:
        fd = os.open(_STATE_DIR / f"{rid}.lock", os.O_RDWR)
    except FileNotFoundError:
        return False  # the lock is taken before any namespace exists: no lock, no owner
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the lock we may have just taken
    return False


def _check_prefix(prefix: str) -> None:
    if not _PREFIX_RE.fullmatch(prefix):
        raise ConfigError(
            f"prefix {prefix!r}: 1-6 lowercase letters/digits, starting with a letter"
        )


# --------------------------------------------------------------------------- live registry

_live_lock = threading.RLock()
_live: dict[str, NamespaceCluster] = {}
_atexit_registered = False
_sigterm_installed = False


def _register(cluster: NamespaceCluster) -> None:
    global _atexit_registered, _sigterm_installed
    with _live_lock:
        _live[cluster.run_id] = cluster
        if not _atexit_registered:
            atexit.register(_close_all)
            _atexit_registered = True
        if (
            not _sigterm_installed
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        ):
            signal.signal(signal.SIGTERM, _on_sigterm)
            _sigterm_installed = True


def _unregister(cluster: NamespaceCluster) -> None:
    global _sigterm_installed
    with _live_lock:
        _live.pop(cluster.run_id, None)
        if (
            not _live
            and _sigterm_installed
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is _on_sigterm
        ):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _sigterm_installed = False


def _close_all() -> None:
    with _live_lock:
        clusters = [c for c in _live.values() if c._owner_pid == os.getpid()]
    for cluster in clusters:
        try:
            cluster.close()
        except Exception:
            _log.exception("netns teardown of run %s failed", cluster.run_id)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Tear down every live cluster, then die of SIGTERM as the default disposition would."""
    global _sigterm_installed
    _close_all()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _sigterm_installed = False
    os.kill(os.getpid(), signal.SIGTERM)

"""Several "hosts" on one machine: Linux network namespaces behind one bridge, with shaped links.

Layout of one run (run id ``<rid>``, 8 hex digits, prefix ``p2`` by default)::

    netns p2s-<rid>   ("switch"): bridge br0, ports h0, h1, ... (no address, IPv6 off)
    netns p2h-<rid>-0 (host 0):   lo up, eth0 = peer of h0, 198.18.<k>.1/24
    netns p2h-<rid>-1 (host 1):   lo up, eth0 = peer of h1, 198.18.<k>.2/24
    ...

Nothing is created in the root namespace (no link, no route, no qdisc); only the namespace
files under ``/run/netns`` and a lock file under ``/run/p2pdl-netns`` appear there. Each run
picks a random /24 out of the benchmarking block 198.18.0.0/15. Inside a host the only route is
the on-link route of that /24 (no default route), and IPv6 is disabled in every namespace, so
a host can reach only the addresses of its run.

Shaping (see :class:`LinkSpec`): ``rate`` is applied as a token bucket (``tbf``) on *both*
directions of a host's link -- on the host's ``eth0`` egress and on the switch port's egress
toward the host -- which models a full-duplex NIC of that speed: a host can neither send nor
receive faster than its rate, and traffic of several senders to one receiver queues (and may be
dropped) at the receiver's switch port as it would on a real switch. ``delay`` (``netem``) is
added to every packet a host sends, on its ``eth0`` egress only, so the round-trip time between
hosts A and B grows by ``delay(A) + delay(B)``. With both, netem is the root qdisc and tbf its
child (delay first, then the rate limit).

Processes started through :meth:`Host.popen` / :meth:`Host.run` run in their own process group
and are killed at teardown, as is anything else still running inside the run's namespaces.
Teardown runs in ``__exit__`` (also on KeyboardInterrupt), on SIGTERM (if SIGTERM had its default
disposition, the cluster cleans up and then dies of the signal as it would have), and at
interpreter exit. :func:`cleanup_stale` removes what a crashed (SIGKILLed) run left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

from p2pdl.errors import ConfigError, P2PDLError

__all__ = [
    "DEFAULT_PREFIX",
    "Host",
    "HostSpec",
    "LinkSpec",
    "NamespaceCluster",
    "NetnsError",
    "available",
    "cleanup_stale",
    "cluster_factory",
]

_log = logging.getLogger(__name__)

DEFAULT_PREFIX = "p2"
"""Namespaces are named ``<prefix>h-<rid>-<i>`` (hosts) and ``<prefix>s-<rid>`` (switch)."""

_SUPERNET = ipaddress.IPv4Network("198.18.0.0/15")  # RFC 2544 benchmarking block
_MAX_HOSTS = 254  # one /24 per run
_STATE_DIR = Path("/run/p2pdl-netns")
_NETNS_DIR = Path("/run/netns")
_CMD_TIMEOUT = 20.0
_STOP_GRACE = 2.0
_RUN_ID_BYTES = 4
_PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,5}")

_RATE_UNITS: dict[str, float] = {
    "bit": 1,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "tbit": 1e12,
    "kibit": 2**10,
    "mibit": 2**20,
    "gibit": 2**30,
    "bps": 8,  # tc's "bps" means bytes per second
    "kbps": 8e3,
    "mbps": 8e6,
    "gbps": 8e9,
}
_TIME_UNITS: dict[str, float] = {"us": 1, "usec": 1, "ms": 1e3, "msec": 1e3, "s": 1e6, "sec": 1e6}
_QUANTITY_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*")


class NetnsError(P2PDLError):
    """A namespace, link or qdisc command failed, or namespaces cannot be used here."""

    def __init__(self, message: str, *, command: Sequence[str] = (), stderr: str = "") -> None:
        super().__init__(message)
        self.command = tuple(command)
        self.stderr = stderr


# --------------------------------------------------------------------------- configuration


def _parse_quantity(value: str, units: dict[str, float], what: str) -> float:
    match = _QUANTITY_RE.fullmatch(value.lower())
    if match is None or match.group(2) not in units:
        raise ConfigError(f"{what} {value!r}: expected a number with one of {sorted(units)}")
    return float(match.group(1)) * units[match.group(2)]


def _parse_rate(value: str | int) -> int:
    """Bits per second from ``"1gbit"``, ``"100mbit"``, ``"12.5mbps"`` (bytes/s) or an int."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(f"rate {value!r}: expected a string such as '1gbit' or int bits/s")
    bits = value if isinstance(value, int) else _parse_quantity(value, _RATE_UNITS, "rate")
    if not 8_000 <= bits <= 1e12:
        raise ConfigError(f"rate {value!r}: must be between 8kbit and 1tbit")
    return round(bits)


def _parse_time_us(value: str | float, what: str, *, upper_s: float) -> int:
    """Microseconds from ``"1ms"``, ``"250us"``, ``"0.5s"`` or a number of seconds."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{what} {value!r}: expected a string such as '1ms' or seconds")
    if isinstance(value, str):
        us = _parse_quantity(value, _TIME_UNITS, what)
    else:
        us = float(value) * 1e6
    if not (math.isfinite(us) and 0 <= us <= upper_s * 1e6):
        raise ConfigError(f"{what} {value!r}: must be between 0 and {upper_s:g}s")
    return round(us)


@dataclass(frozen=True)
class LinkSpec:
    """Shaping of one host's link; the defaults leave the link unshaped (veth speed).

    ``rate``: full-duplex link speed (``"1gbit"``; ints are bits/s), enforced by tbf on the
    host's egress and on the switch port's egress toward the host. ``delay``: extra latency
    added by netem to every packet the host sends (``"1ms"``; numbers are seconds).
    ``burst``: tbf bucket in bytes (default: 4 ms worth of ``rate``, at least 64 KiB).
    ``queue``: longest a packet may wait in a tbf queue before it is dropped (tail drop).
    """

    rate: str | int | None = None
    delay: str | float | None = None
    burst: int | None = None
    queue: str | float = "20ms"

    def __post_init__(self) -> None:
        rate_bps = None if self.rate is None else _parse_rate(self.rate)
        if self.delay is not None:
            _parse_time_us(self.delay, "delay", upper_s=10.0)
        if _parse_time_us(self.queue, "queue", upper_s=10.0) < 1000:
            raise ConfigError(f"queue {self.queue!r}: must be at least 1ms")
        if self.burst is not None:
            if isinstance(self.burst, bool) or not isinstance(self.burst, int):
                raise ConfigError(f"burst {self.burst!r}: expected an int number of bytes")
            if not 2048 <= self.burst <= 1 << 30:
                raise ConfigError(f"burst {self.burst}: must be between 2048 bytes and 1 GiB")
            if rate_bps is None:
                raise ConfigError("burst without rate: the bucket needs a rate")

    @property
    def rate_bps(self) -> int | None:
        """Rate in bits per second, or None when unshaped."""
        return None if self.rate is None else _parse_rate(self.rate)

    @property
    def delay_us(self) -> int:
        """Added one-way delay in microseconds (0 when none)."""
        return 0 if self.delay is None else _parse_time_us(self.delay, "delay", upper_s=10.0)

    @property
    def burst_bytes(self) -> int | None:
        """tbf bucket size in bytes (None when unshaped)."""
        rate = self.rate_bps
        if rate is None:
            return None
        if self.burst is not None:
            return self.burst
        return max(64 * 1024, rate // 8 * 4 // 1000)

    @property
    def limit_bytes(self) -> int | None:
        """tbf queue length in bytes: the bucket plus ``queue`` worth of ``rate``."""
        rate, burst = self.rate_bps, self.burst_bytes
        if rate is None or burst is None:
            return None
        return burst + rate // 8 * _parse_time_us(self.queue, "queue", upper_s=10.0) // 10**6


@dataclass(frozen=True)
class HostSpec:
    """One host of a cluster; ``link=None`` takes the cluster's default link."""

    link: LinkSpec | None = None


# --------------------------------------------------------------------------- commands


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


# --------------------------------------------------------------------------- availability

_probe_lock = threading.Lock()
_probe_cache: dict[str, tuple[bool, str]] = {}


def _probe() -> dict[str, tuple[bool, str]]:
    """Create a throwaway namespace once: can we make namespaces, veths, tbf and netem?"""
    with _probe_lock:
        if _probe_cache:
            return _probe_cache
        result = {"netns": (False, ""), "rate": (False, ""), "delay": (False, "")}
        if os.geteuid() != 0:
            result["netns"] = (False, f"network namespaces need root (euid is {os.geteuid()})")
        elif missing := [t for t in ("ip", "tc", "sysctl") if shutil.which(t) is None]:
            result["netns"] = (False, f"missing tools: {', '.join(missing)} (iproute2, procps)")
        else:
            rid = secrets.token_hex(_RUN_ID_BYTES)
            ns = f"{DEFAULT_PREFIX}t-{rid}"
            lock_fd = None
            try:
                lock_fd = _take_lock(rid)  # so that cleanup_stale leaves a running probe alone
                _cmd(["ip", "netns", "add", ns])
                try:
                    _disable_ipv6(ns)
                    _cmd(["ip", "-n", ns, "link", "add", "br0", "type", "bridge"])
                    _cmd(
                        ["ip", "-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1"]
                    )
                    result["netns"] = (True, "")
                    probes = (("rate", LinkSpec(rate="1gbit")), ("delay", LinkSpec(delay="1ms")))
                    for key, spec in probes:
                        try:
                            for argv in _shape_commands(ns, "v0", spec, with_delay=True):
                                _cmd(argv)
                            _cmd(["tc", "-n", ns, "qdisc", "del", "dev", "v0", "root"])
                            result[key] = (True, "")
                        except NetnsError as exc:
                            qdisc = "tbf" if key == "rate" else "netem"
                            result[key] = (False, f"kernel lacks the {qdisc} qdisc: {exc}")
                finally:
                    _cmd(["ip", "netns", "del", ns])
            except NetnsError as exc:
                result["netns"] = (False, f"cannot create a network namespace: {exc}")
            finally:
                _release_lock(rid, lock_fd)
        if not result["netns"][0]:
            result["rate"] = result["delay"] = result["netns"]
        _probe_cache.update(result)
        return _probe_cache


def available(*, rate: bool = False, delay: bool = False) -> tuple[bool, str]:
    """``(True, "")`` if namespace clusters work here (and, when asked, tbf rate / netem delay);
    else ``(False, reason)``. Probes once per process by creating and deleting a namespace."""
    probe = _probe()
    for key, wanted in (("netns", True), ("rate", rate), ("delay", delay)):
        ok, reason = probe[key]
        if wanted and not ok:
            return False, reason
    return True, ""


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


# --------------------------------------------------------------------------- hosts and cluster


@dataclass(frozen=True)
class Host:
    """One namespace host: ``name`` is its namespace, ``address`` its IPv4 address on eth0."""

    name: str
    index: int
    address: str
    link: LinkSpec
    _cluster: NamespaceCluster = field(repr=False, compare=False)

    def popen(self, argv: Sequence[str | os.PathLike[str]], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside this host (``ip netns exec``) in its own process group.

        ``kwargs`` go to :class:`subprocess.Popen`; the process is killed at teardown.
        """
        return self._cluster._popen(self, argv, kwargs)

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        timeout: float = 30.0,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside this host to completion; text stdout/stderr are captured.

        Raises NetnsError on timeout (after killing its process group) or, with ``check``, on
        a non-zero exit status (the message carries the stderr).
        """
        proc = self.popen(
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        text = f"{shlex.join(map(os.fspath, argv))} in {self.name}"
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc, signal.SIGKILL)
            proc.communicate()
            raise NetnsError(f"`{text}` timed out after {timeout:g}s", command=proc.args) from None
        if check and proc.returncode != 0:
            raise NetnsError(
                f"`{text}` failed with exit status {proc.returncode}: {stderr.strip()}",
                command=proc.args,
                stderr=stderr,
            )
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _killpg(proc: subprocess.Popen[Any], sig: int) -> None:
    if proc.returncode is None:  # not reaped: the pid (= its process group id) is still ours
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


class NamespaceCluster:
    """N namespace hosts on one bridge, created on ``__enter__``/:meth:`start`, removed on exit.

    ``hosts``: a count, or one :class:`HostSpec` per host. ``link``: the default shaping of every
    host without its own. ``prefix``: first letters of the namespace names (see
    :func:`cleanup_stale`).
    """

    def __init__(
        self,
        hosts: int | Sequence[HostSpec] = 2,
        *,
        link: LinkSpec | None = None,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        specs = [HostSpec()] * hosts if isinstance(hosts, int) else list(hosts)
        if isinstance(hosts, bool) or not 1 <= len(specs) <= _MAX_HOSTS:
            raise ConfigError(f"hosts: need between 1 and {_MAX_HOSTS}, got {hosts!r}")
        _check_prefix(prefix)
        default = link if link is not None else LinkSpec()
        self.run_id = secrets.token_hex(_RUN_ID_BYTES)
        self.switch = f"{prefix}s-{self.run_id}"
        block = secrets.randbelow(_SUPERNET.num_addresses // 256)
        self.network = ipaddress.IPv4Network((int(_SUPERNET.network_address) + 256 * block, 24))
        self.hosts: tuple[Host, ...] = tuple(
            Host(
                name=f"{prefix}h-{self.run_id}-{i}",
                index=i,
                address=str(self.network.network_address + i + 1),
                link=spec.link if spec.link is not None else default,
                _cluster=self,
            )
            for i, spec in enumerate(specs)
        )
        self._procs: list[subprocess.Popen[Any]] = []
        self._procs_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._owner_pid = os.getpid()
        self._state = "new"  # new -> up -> closed

    # ------------------------------------------------------------------ public

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace name of this run (hosts, then the switch)."""
        return (*(h.name for h in self.hosts), self.switch)

    @property
    def addresses(self) -> list[str]:
        return [h.address for h in self.hosts]

    def __len__(self) -> int:
        return len(self.hosts)

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]

    def __repr__(self) -> str:
        return f"NamespaceCluster(run_id={self.run_id!r}, hosts={len(self)}, {self.network})"

    def __enter__(self) -> NamespaceCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # keep the body's exception; log the teardown one
            _log.exception("netns teardown of run %s failed", self.run_id)

    def start(self) -> None:
        """Create the namespaces, bridge, links and qdiscs. On any failure, undo and raise."""
        if self._state != "new":
            raise NetnsError(f"run {self.run_id} was already started")
        ok, reason = available(
            rate=any(h.link.rate is not None for h in self.hosts),
            delay=any(h.link.delay_us > 0 for h in self.hosts),
        )
        if not ok:
            raise NetnsError(f"cannot build a namespace cluster here: {reason}")
        self._lock_fd = _take_lock(self.run_id)
        _register(self)
        self._state = "up"
        try:
            self._build()
        except BaseException:
            try:
                self.close()
            except Exception:
                _log.exception("netns teardown after a failed start of run %s", self.run_id)
            raise

    def close(self) -> None:
        """Kill our processes, delete links, qdiscs and namespaces. Idempotent.

        Raises NetnsError listing what could not be removed (after trying everything).
        """
        if self._state != "up" or os.getpid() != self._owner_pid:
            return
        errors: list[str] = []
        self._stop_processes()
        with contextlib.suppress(NetnsError):
            if self.switch in _netns_list():
                for host in self.hosts:  # removes both veth ends and their qdiscs at once
                    with contextlib.suppress(NetnsError):
                        _cmd(["ip", "-n", self.switch, "link", "del", f"h{host.index}"])
        _delete_namespaces(self.namespaces, errors)
        fd, self._lock_fd = self._lock_fd, None
        _release_lock(self.run_id, fd)
        self._state = "closed"
        _unregister(self)
        if errors:
            raise NetnsError(f"teardown of run {self.run_id} incomplete: " + "; ".join(errors))

    # ------------------------------------------------------------------ internals

    def _build(self) -> None:
        sw = self.switch
        _cmd(["ip", "netns", "add", sw])
        _disable_ipv6(sw)
        _cmd(["ip", "-n", sw, "link", "set", "lo", "up"])
        _cmd(["ip", "-n", sw, "link", "add", "br0", "type", "bridge", "stp_state", "0"])
        _cmd(["ip", "-n", sw, "link", "set", "br0", "up"])
        prefixlen = self.network.prefixlen
        for host in self.hosts:
            ns, port = host.name, f"h{host.index}"
            _cmd(["ip", "netns", "add", ns])
            _disable_ipv6(ns)
            _cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
            veth = ["type", "veth", "peer", "name", "eth0", "netns", ns]
            _cmd(["ip", "-n", sw, "link", "add", port, *veth])
            _cmd(["ip", "-n", sw, "link", "set", port, "master", "br0"])
            _cmd(["ip", "-n", ns, "addr", "add", f"{host.address}/{prefixlen}", "dev", "eth0"])
            for argv in _shape_commands(ns, "eth0", host.link, with_delay=True):
                _cmd(argv)
            for argv in _shape_commands(sw, port, host.link, with_delay=False):
                _cmd(argv)
            _cmd(["ip", "-n", sw, "link", "set", port, "up"])
            _cmd(["ip", "-n", ns, "link", "set", "eth0", "up"])

    def _popen(
        self, host: Host, argv: Sequence[str | os.PathLike[str]], kwargs: dict[str, Any]
    ) -> subprocess.Popen[Any]:
        if self._state != "up":
            raise NetnsError(f"run {self.run_id} is not up ({self._state})")
        if {"start_new_session", "process_group", "preexec_fn"} & kwargs.keys():
            raise ConfigError("popen: the cluster owns the process group of what it starts")
        full = ["ip", "netns", "exec", host.name, *map(os.fspath, argv)]
        with self._procs_lock:
            proc = subprocess.Popen(full, start_new_session=True, **kwargs)
            self._procs.append(proc)
        return proc

    def _stop_processes(self) -> None:
        with self._procs_lock:
            procs, self._procs = self._procs, []
        for proc in procs:
            proc.poll()
            _killpg(proc, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _killpg(proc, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5.0)
            streams: tuple[IO[Any] | None, ...] = (proc.stdin, proc.stdout, proc.stderr)
            for stream in streams:
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()


@contextlib.contextmanager
def cluster_factory() -> Iterator[Callable[..., NamespaceCluster]]:
    """Yield ``make(hosts, link=..., prefix=...)`` returning started clusters; all are torn down
    when the block ends. Wire it as a fixture: ``with cluster_factory() as make: yield make``."""
    with contextlib.ExitStack() as stack:

        def make(*args: Any, **kwargs: Any) -> NamespaceCluster:
            return stack.enter_context(NamespaceCluster(*args, **kwargs))

        yield make

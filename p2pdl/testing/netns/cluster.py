"""Namespace hosts on one bridge: :class:`Host`, :class:`NamespaceCluster` and a factory of them.

Processes started through :meth:`Host.popen` / :meth:`Host.run` run in their own process group
and are killed at teardown, as is anything else still running inside the run's namespaces.
Teardown runs in ``__exit__`` (also on KeyboardInterrupt), on SIGTERM and at interpreter exit
(see :mod:`p2pdl.testing.netns.registry`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import shlex
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Any

from p2pdl.errors import ConfigError
from p2pdl.launch.procs import signal_group, stop_processes
from p2pdl.testing.netns.commands import (
    NetnsError,
    _cmd,
    _delete_namespaces,
    _disable_ipv6,
    _netns_list,
    _shape_commands,
)
from p2pdl.testing.netns.probe import available
from p2pdl.testing.netns.registry import (
    _RUN_ID_BYTES,
    DEFAULT_PREFIX,
    _check_prefix,
    _register,
    _release_lock,
    _take_lock,
    _unregister,
)
from p2pdl.testing.netns.spec import HostSpec, LinkSpec

_log = logging.getLogger(__name__)

_SUPERNET = ipaddress.IPv4Network("198.18.0.0/15")  # RFC 2544 benchmarking block
_MAX_HOSTS = 254  # one /24 per run
_STOP_GRACE = 2.0


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
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside this host to completion (with ``env``, the whole environment);
        text stdout/stderr are captured.

        Raises NetnsError on timeout (after killing its process group) or, with ``check``, on
        a non-zero exit status (the message carries the stderr).
        """
        proc = self.popen(
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        text = f"{shlex.join(map(os.fspath, argv))} in {self.name}"
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            signal_group(proc, signal.SIGKILL)
            proc.communicate()
            raise NetnsError(f"`{text}` timed out after {timeout:g}s", command=proc.args) from None
        if check and proc.returncode != 0:
            raise NetnsError(
                f"`{text}` failed with exit status {proc.returncode}: {stderr.strip()}",
                command=proc.args,
                stderr=stderr,
            )
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


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
        stop_processes(procs, grace=_STOP_GRACE)
        for proc in procs:
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

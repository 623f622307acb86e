"""What this machine supports (:func:`available`): namespaces at all, the tbf and netem qdiscs."""

from __future__ import annotations

import os
import secrets
import shutil
import threading

from p2pdl.testing.netns.commands import NetnsError, _cmd, _disable_ipv6, _shape_commands
from p2pdl.testing.netns.registry import (
    _RUN_ID_BYTES,
    DEFAULT_PREFIX,
    _release_lock,
    _take_lock,
)
from p2pdl.testing.netns.spec import LinkSpec

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

"""What a namespace cluster is made of: link shaping and host specs, parsed and validated.

Shaping (see :class:`LinkSpec`): ``rate`` is applied as a token bucket (``tbf``) on *both*
directions of a host's link -- on the host's ``eth0`` egress and on the switch port's egress
toward the host -- which models a full-duplex NIC of that speed: a host can neither send nor
receive faster than its rate, and traffic of several senders to one receiver queues (and may be
dropped) at the receiver's switch port as it would on a real switch. ``delay`` (``netem``) is
added to every packet a host sends, on its ``eth0`` egress only, so the round-trip time between
hosts A and B grows by ``delay(A) + delay(B)``. With both, netem is the root qdisc and tbf its
child (delay first, then the rate limit).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from p2pdl.errors import ConfigError

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

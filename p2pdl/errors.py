"""Typed errors of p2pdl: one base class, one subclass per way a distributed operation fails.

Messages name the ranks involved so that a log line on any node says who to look at.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "AuthenticationError",
    "CollectiveMismatchError",
    "CollectiveTimeoutError",
    "ConfigError",
    "P2PDLError",
    "PeerLostError",
    "ProtocolError",
    "SharedMemoryError",
]


def _ranks_text(ranks: Iterable[int]) -> str:
    ordered = sorted(set(ranks))
    if not ordered:
        return "no rank"
    word = "rank" if len(ordered) == 1 else "ranks"
    return f"{word} {', '.join(str(r) for r in ordered)}"


class P2PDLError(Exception):
    """Base class of every error p2pdl raises on purpose."""


class ConfigError(P2PDLError, ValueError):
    """Settings, arguments, environment or job specs that cannot work."""


class ProtocolError(P2PDLError):
    """A peer sent bytes that break the wire protocol (bad magic, sizes, tags, headers)."""

    def __init__(self, message: str, *, rank: int | None = None) -> None:
        self.rank = rank
        prefix = f"rank {rank}: " if rank is not None else ""
        super().__init__(prefix + message)


class AuthenticationError(P2PDLError):
    """The handshake failed: wrong secret, wrong cluster, wrong version or wrong rank.

    `retry` marks a refusal that may pass later (an authenticated peer dialled for a
    membership epoch the listener has not reached yet).
    """

    def __init__(self, message: str, *, rank: int | None = None, retry: bool = False) -> None:
        self.rank = rank
        self.retry = retry
        super().__init__(message)


class PeerLostError(P2PDLError):
    """A peer's connection closed or broke while an operation needed it."""

    def __init__(self, ranks: Iterable[int], detail: str = "", *, operation: str = "") -> None:
        self.ranks = tuple(sorted(set(ranks)))
        self.detail = detail
        self.operation = operation
        what = f" during {operation}" if operation else ""
        more = f": {detail}" if detail else ""
        super().__init__(f"lost {_ranks_text(self.ranks)}{what}{more}")


class CollectiveTimeoutError(P2PDLError):
    """An operation's deadline passed; `missing` names the ranks that had not delivered.

    Deliberately not a `TimeoutError`: asyncio's own timeouts are `TimeoutError`s, and code
    that waits on something else must never mistake a collective's timeout for its own.
    """

    def __init__(
        self, operation: str, timeout: float, missing: Iterable[int], *, detail: str = ""
    ) -> None:
        self.operation = operation
        self.timeout = timeout
        self.missing = tuple(sorted(set(missing)))
        self.detail = detail
        super().__init__(
            f"{operation} timed out after {timeout:.3g}s waiting for "
            f"{_ranks_text(self.missing)}{detail}"
        )


class CollectiveMismatchError(P2PDLError, ValueError):
    """Ranks called the same collective with different sizes, dtypes, ops or algorithms."""

    def __init__(self, operation: str, detail: str, ranks: Iterable[int]) -> None:
        self.operation = operation
        self.detail = detail
        self.ranks = tuple(sorted(set(ranks)))
        super().__init__(f"{operation}: {detail} (disagreeing: {_ranks_text(self.ranks)})")


class SharedMemoryError(P2PDLError):
    """The shared-memory allreduce between ranks on one host could not get its memory
    (no memfd_create, or a memory cgroup that cannot hold its segment)."""

"""The scheduling layer's error: a job that cannot go on."""

from __future__ import annotations

from p2pdl.errors import P2PDLError

__all__ = ["JobError"]


class JobError(P2PDLError):
    """The job cannot go on (told by the leader, the leader is gone, or state was lost)."""

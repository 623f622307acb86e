"""Policy for `group_size="auto"`: how many steps the leader plans per iteration group.

Larger groups amortise the coordination done at group boundaries (Drizzle's argument), smaller
groups redo less work after a failure. The controller grows the group while the measured
coordination overhead per step is above a target fraction of the step time, keeps it otherwise,
and shrinks it after a failure. It is pure: it returns a `Decision` whose `reason` the caller
logs; it measures and logs nothing itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from p2pdl.errors import ConfigError

__all__ = ["Decision", "GroupSizeController"]


@dataclass(frozen=True, slots=True)
class Decision:
    """The group size to use next, and why (one human-readable line for the log)."""

    size: int
    reason: str


def _check_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0.0:
        raise ConfigError(f"{name} must be finite and >= 0, got {value!r}")
    return number


def _check_int(value: object, name: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class GroupSizeController:
    """Frozen settings of the auto group-size policy, with its two decisions.

    target_overhead: acceptable coordination time per step as a fraction of the step time.
    growth / shrink: factors applied when growing (> 1) and after a failure (< 1).
    Sizes always stay within [min_size, max_size]; `initial` is the first group's size.
    """

    target_overhead: float = 0.05
    min_size: int = 1
    max_size: int = 1000
    initial: int = 10
    growth: float = 2.0
    shrink: float = 0.5

    def __post_init__(self) -> None:
        target = _check_number(self.target_overhead, "target_overhead")
        if target <= 0.0:
            raise ConfigError(f"target_overhead must be > 0, got {self.target_overhead!r}")
        min_size = _check_int(self.min_size, "min_size", 1)
        max_size = _check_int(self.max_size, "max_size", min_size)
        _check_int(self.initial, "initial", min_size)
        if self.initial > max_size:
            raise ConfigError(f"initial must be <= max_size ({max_size}), got {self.initial}")
        if _check_number(self.growth, "growth") <= 1.0:
            raise ConfigError(f"growth must be > 1, got {self.growth!r}")
        if not 0.0 < _check_number(self.shrink, "shrink") < 1.0:
            raise ConfigError(f"shrink must be in (0, 1), got {self.shrink!r}")

    def _clamp(self, size: int) -> int:
        return max(self.min_size, min(self.max_size, size))

    def first(self) -> Decision:
        """The size of the first group."""
        return Decision(self.initial, f"initial group size {self.initial}")

    def next_size(
        self, current: int, coordination_seconds: float, step_seconds: float, steps: int
    ) -> Decision:
        """Decide the next group's size from the group just measured.

        current: that group's planned size. coordination_seconds: boundary time of that group
        that was not hidden behind training (waiting for the plan, the boundary barrier).
        step_seconds: mean seconds of one step. steps: steps the group ran.
        Overhead = coordination_seconds / steps / step_seconds. Above the target, the size grows
        by `growth`, but no further than the size that would just meet the target (assuming
        the coordination time per group stays the same); otherwise it is kept.
        """
        current = _check_int(current, "current", 1)
        coordination = _check_number(coordination_seconds, "coordination_seconds")
        step_time = _check_number(step_seconds, "step_seconds")
        steps = _check_int(steps, "steps", 0)
        size = self._clamp(current)
        clamped = "" if size == current else f" (clamped from {current})"
        if steps == 0 or step_time == 0.0:
            return Decision(size, f"no step time measured; keeping group size {size}{clamped}")
        overhead = coordination / steps / step_time
        measured = f"coordination overhead {overhead:.1%} of step time"
        if overhead <= self.target_overhead:
            return Decision(
                size,
                f"{measured} <= target {self.target_overhead:.1%}; keeping group size "
                f"{size}{clamped}",
            )
        if size >= self.max_size:
            return Decision(
                size,
                f"{measured} > target {self.target_overhead:.1%}, but group size {size} is at "
                f"the maximum{clamped}",
            )
        denominator = self.target_overhead * step_time
        needed_f = coordination / denominator if denominator > 0.0 else math.inf
        needed = self.max_size if needed_f >= self.max_size else math.ceil(needed_f)
        grown = math.ceil(size * self.growth)
        new = self._clamp(min(grown, max(needed, size + 1)))
        return Decision(
            new,
            f"{measured} > target {self.target_overhead:.1%}; growing group size {size} -> "
            f"{new}{clamped}",
        )

    def after_failure(self, current: int) -> Decision:
        """Shrink after a failed group, so that the next failure costs fewer redone steps."""
        current = _check_int(current, "current", 1)
        size = self._clamp(current)
        new = self._clamp(math.floor(size * self.shrink))
        if new == size:
            return Decision(size, f"failure; group size {size} is already at the minimum")
        return Decision(new, f"failure; shrinking group size {size} -> {new}")

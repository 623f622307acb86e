"""The pure iteration-group planner: which samples each rank uses at each step, and the lr.

Step `s` of a job always trains on the same global batch: positions [i*B, (i+1)*B) of data
epoch e's permutation, where e = s // steps_per_epoch and i = s % steps_per_epoch. Only the
split of that batch across ranks depends on the membership the group was planned for. So a
group aborted by a failure is simply planned again from its first step with the new membership:
its samples are redone, none lost and none counted twice. Plans carry (epoch, offset, count)
triples, not index lists; `sample_indices` turns one into dataset indices on the worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from p2pdl.errors import ConfigError, ProtocolError
from p2pdl.membership import Membership
from p2pdl.schedule.job import Job

__all__ = [
    "IterationGroup",
    "RankSamples",
    "StepPlan",
    "epoch_permutation",
    "plan_groups",
    "sample_indices",
    "split_batch",
]

_GROUP_FIELDS = frozenset({"group_id", "epoch", "start_step", "world_size", "steps"})


@dataclass(frozen=True, slots=True)
class RankSamples:
    """One rank's share of one step: `count` positions from `offset` in data epoch `epoch`'s
    permutation (see `epoch_permutation`)."""

    epoch: int
    offset: int
    count: int


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One global step: its index, learning rate, and each rank's samples (indexed by rank)."""

    step: int
    lr: float
    per_rank: tuple[RankSamples, ...]

    @property
    def batch(self) -> int:
        """Samples in this step over all ranks: divide summed gradients by this for a mean."""
        return sum(r.count for r in self.per_rank)


@dataclass(frozen=True, slots=True)
class IterationGroup:
    """A run of consecutive steps planned for one membership epoch (`epoch`, `world_size`)."""

    group_id: int
    epoch: int
    start_step: int
    world_size: int
    steps: tuple[StepPlan, ...]

    @property
    def end_step(self) -> int:
        """One past the last step of the group (the next group's start_step)."""
        return self.start_step + len(self.steps)

    def for_rank(self, rank: int) -> tuple[RankSamples, ...]:
        """The samples of `rank` at each step of the group, in step order."""
        if not 0 <= rank < self.world_size:
            raise ConfigError(f"rank {rank} is not in a group of world size {self.world_size}")
        return tuple(s.per_rank[rank] for s in self.steps)

    def to_wire(self) -> dict[str, Any]:
        """Plain msgpack types; each step is [step, lr, [epoch, offset, count] * world_size]."""
        return {
            "group_id": self.group_id,
            "epoch": self.epoch,
            "start_step": self.start_step,
            "world_size": self.world_size,
            "steps": [
                [s.step, s.lr, [v for r in s.per_rank for v in (r.epoch, r.offset, r.count)]]
                for s in self.steps
            ],
        }

    @classmethod
    def from_wire(cls, data: object, *, rank: int | None = None) -> IterationGroup:
        """Validate and rebuild a group; ProtocolError (naming `rank`, the sender) if malformed."""

        def bad(message: str) -> ProtocolError:
            return ProtocolError(f"malformed iteration group: {message}", rank=rank)

        def nonneg(value: object, name: str) -> int:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad(f"{name} must be a non-negative integer, got {value!r}")
            return value

        if not isinstance(data, dict):
            raise bad(f"expected a map, got {type(data).__name__}")
        if set(data) != _GROUP_FIELDS:
            raise bad(f"fields {sorted(map(str, data))}, expected {sorted(_GROUP_FIELDS)}")
        group_id = nonneg(data["group_id"], "group_id")
        epoch = nonneg(data["epoch"], "epoch")
        start_step = nonneg(data["start_step"], "start_step")
        world_size = nonneg(data["world_size"], "world_size")
        if world_size < 1:
            raise bad("world_size must be >= 1")
        raw_steps = data["steps"]
        if not isinstance(raw_steps, list) or not raw_steps:
            raise bad("steps must be a non-empty list")
        steps: list[StepPlan] = []
        for k, raw in enumerate(raw_steps):
            if not isinstance(raw, list) or len(raw) != 3:
                raise bad(f"steps[{k}] must be [step, lr, samples]")
            step, lr, flat = raw
            if nonneg(step, f"steps[{k}].step") != start_step + k:
                raise bad(f"steps[{k}].step is {step}, expected {start_step + k}")
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
                raise bad(f"steps[{k}].lr must be a finite number, got {lr!r}")
            if lr < 0:
                raise bad(f"steps[{k}].lr must be >= 0, got {lr!r}")
            if not isinstance(flat, list) or len(flat) != 3 * world_size:
                raise bad(f"steps[{k}].samples must be a list of {3 * world_size} integers")
            values = [nonneg(v, f"steps[{k}].samples") for v in flat]
            per_rank = tuple(
                RankSamples(values[j], values[j + 1], values[j + 2])
                for j in range(0, len(values), 3)
            )
            steps.append(StepPlan(step=step, lr=float(lr), per_rank=per_rank))
        return cls(
            group_id=group_id,
            epoch=epoch,
            start_step=start_step,
            world_size=world_size,
            steps=tuple(steps),
        )


def split_batch(offset: int, count: int, world_size: int, epoch: int) -> tuple[RankSamples, ...]:
    """Balanced contiguous slices in rank order; the first count % world_size get one more."""
    base, extra = divmod(count, world_size)
    return tuple(
        RankSamples(
            epoch=epoch, offset=offset + r * base + min(r, extra), count=base + int(r < extra)
        )
        for r in range(world_size)
    )


def plan_groups(
    job: Job, membership: Membership, start_step: int, group_size: int, group_id: int = 0
) -> IterationGroup:
    """Plan steps [start_step, min(start_step + group_size, job.total_steps)) for `membership`.

    Pure and deterministic. Raises ConfigError for a start_step outside the job, a group_size
    below 1, or a membership whose world size is outside [job.min_nodes, job.max_nodes].
    """
    for name, value in (("start_step", start_step), ("group_size", group_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not isinstance(group_id, int) or isinstance(group_id, bool) or group_id < 0:
        raise ConfigError(f"group_id must be a non-negative integer, got {group_id!r}")
    if not 0 <= start_step < job.total_steps:
        raise ConfigError(f"start_step must be in [0, {job.total_steps}), got {start_step}")
    if group_size < 1:
        raise ConfigError(f"group_size must be >= 1, got {group_size}")
    world_size = membership.world_size
    if not job.min_nodes <= world_size <= job.max_nodes:
        raise ConfigError(
            f"membership epoch {membership.epoch} has {world_size} ranks, the job needs "
            f"between {job.min_nodes} and {job.max_nodes}"
        )
    per_epoch = job.steps_per_epoch
    steps = []
    for step in range(start_step, min(start_step + group_size, job.total_steps)):
        data_epoch, i = divmod(step, per_epoch)
        offset = i * job.global_batch
        count = min(job.global_batch, job.dataset_size - offset)
        steps.append(
            StepPlan(
                step=step,
                lr=job.lr_at(step),
                per_rank=split_batch(offset, count, world_size, data_epoch),
            )
        )
    return IterationGroup(
        group_id=group_id,
        epoch=membership.epoch,
        start_step=start_step,
        world_size=world_size,
        steps=tuple(steps),
    )


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The shuffle of range(n) for data epoch `epoch`: a fresh int64 array, same on every node.

    Built from the raw PCG64 stream of SeedSequence([seed, epoch]) (an argsort of n raw 64-bit
    draws), which NumPy keeps stable across versions; `Generator.permutation` carries no such
    guarantee, and nodes with different NumPy versions must still agree on every batch.
    """
    for name, value in (("seed", seed), ("epoch", epoch), ("n", n)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    bits = np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)]))
    keys = bits.random_raw(int(n))
    return np.argsort(keys, kind="stable").astype(np.int64, copy=False)


@lru_cache(maxsize=2)
def _cached_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """Read-only permutation; two entries because a group may cross one epoch boundary."""
    perm = epoch_permutation(seed, epoch, n)
    perm.flags.writeable = False
    return perm


def sample_indices(job: Job, rank_samples: RankSamples) -> np.ndarray:
    """Dataset indices of `rank_samples` under `job` (a read-only int64 view; may be empty).

    Permutations are cached (the last two data epochs), since workers call this every step.
    """
    rs = rank_samples
    if not 0 <= rs.epoch < job.epochs:
        raise ConfigError(f"data epoch {rs.epoch} is outside the job's {job.epochs} epochs")
    if rs.offset < 0 or rs.count < 0 or rs.offset + rs.count > job.dataset_size:
        raise ConfigError(
            f"samples [{rs.offset}, {rs.offset + rs.count}) are outside the dataset of "
            f"{job.dataset_size}"
        )
    perm = _cached_permutation(job.seed, rs.epoch, job.dataset_size)
    return perm[rs.offset : rs.offset + rs.count]

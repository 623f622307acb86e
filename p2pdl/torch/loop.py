"""A plain training loop for a `TorchTask` on a blocking node (no scheduling runtime), and
the sample plan every rank derives on its own — the runtime's version-stable planner."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from p2pdl.schedule.plan import epoch_permutation, split_batch
from p2pdl.torch.attach import Attached
from p2pdl.torch.task import TorchTask

__all__ = ["Progress", "sample_plan", "train"]


def sample_plan(
    n_samples: int, global_batch: int, step: int, world_size: int, seed: int = 0
) -> list[list[int]]:
    """The samples each rank uses at `step`: the job runtime's shuffle of each data epoch
    (`epoch_permutation`, stable across NumPy versions) cut into its balanced shares.

    Pure and identical on every rank.
    """
    if global_batch < world_size:
        raise ValueError(f"global batch {global_batch} is smaller than {world_size} ranks")
    per_epoch = n_samples // global_batch
    if per_epoch < 1:
        raise ValueError(f"global batch {global_batch} exceeds the {n_samples} samples")
    epoch, within = divmod(step, per_epoch)
    order = epoch_permutation(seed, epoch, n_samples)
    shares = split_batch(within * global_batch, global_batch, world_size, epoch)
    return [order[s.offset : s.offset + s.count].tolist() for s in shares]


class Progress:
    """A one-line progress bar (steps, samples/s, loss) on stderr; plain lines when piped."""

    def __init__(self, total: int, stream: Any = None, every: float = 0.2) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every if self.tty else max(2.0, every)
        self.start = time.perf_counter()
        self._last = 0.0
        self._lock = threading.Lock()

    def update(self, step: int, samples: int, loss: float, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last < self.every and step < self.total:
            return
        self._last = now
        elapsed = max(now - self.start, 1e-9)
        width = 24
        filled = int(width * step / max(1, self.total))
        bar = "#" * filled + "-" * (width - filled)
        text = (
            f"[{bar}] {step}/{self.total} steps  {samples / elapsed:,.0f} samples/s  "
            f"loss {loss:.4f}"
        )
        with self._lock:
            if self.tty:
                self.stream.write("\r" + text + ("\n" if step >= self.total else ""))
            else:
                self.stream.write(text + "\n")
            self.stream.flush()


def train(
    task: TorchTask,
    node: Any,
    *,
    steps: int,
    global_batch: int,
    lr: float | Callable[[int], float] | None = None,
    progress: bool = False,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    start_step: int = 0,
) -> dict[str, float]:
    """Run `task` for `steps` steps on a blocking node, without the scheduling runtime.

    Each rank takes its share of every global batch from :func:`sample_plan`. Returns the
    throughput figures (samples/s counted over the whole cluster, wall time, last loss).
    """
    attached = Attached(node)
    if task.sharded is None:
        task.setup(node)
        assert task.sharded is not None
        task.sharded.broadcast_weights()
    n = len(task)
    bar = Progress(steps) if progress and attached.rank == 0 else None
    begin = time.perf_counter()
    loss = float("nan")
    done = 0
    for step in range(start_step, start_step + steps):
        share = sample_plan(n, global_batch, step, attached.world_size, task.seed)[attached.rank]
        rate = lr(step) if callable(lr) else (lr if lr is not None else task.config.lr)
        metrics = task.local_step(node, share, rate)
        loss = metrics["loss"]
        done += 1
        if on_step is not None:
            on_step(step, metrics)
        if bar is not None:
            bar.update(done, done * global_batch, loss, force=done == steps)
    wall = time.perf_counter() - begin
    return {
        "steps": float(done),
        "samples_per_s": done * global_batch / max(wall, 1e-9),
        "wall_s": wall,
        "loss": loss,
    }

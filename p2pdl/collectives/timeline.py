"""A timeline of what every rank does, written as one Chrome/Perfetto trace.

`P2PDL_TIMELINE=trace.json` (or `enable("trace.json")`) turns it on for a process: every
instrumented phase — forward/backward, phase 1, reduce-scatter, owner update, all-gather,
compression, waits on peers and on the leader, group boundaries — becomes a span
(`with span("reduce-scatter", "collective", rank): ...`). Spans are kept in memory (a tuple
each) and appended to `<trace>.part-<pid>.jsonl` when the process flushes (at exit, or when a
node closes); `merge(trace)` then writes the Chrome trace JSON with one process per rank and one
row per kind of work, and removes the parts. `python -m p2pdl launch` and the local clusters
merge after their ranks exit; elsewhere (one `p2pdl node` per host) copy the parts together and
run `python -m p2pdl timeline merge trace.json`. Timestamps are wall-clock microseconds, so
ranks on one host line up exactly and ranks on different hosts as well as their clocks do.

Off, a span costs one global lookup.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

ENV = "P2PDL_TIMELINE"
PART = ".part-"
KINDS = ("compute", "collective", "network", "wait", "schedule")
"""Rows of each rank's process in the trace, top to bottom (spans of other kinds go last)."""


@dataclass(frozen=True)
class Span:
    """One finished span: what ran, of which kind, on which rank, from when, for how long."""

    name: str
    kind: str
    rank: int
    start_us: float
    duration_us: float
    args: tuple[tuple[str, Any], ...] = ()


class Recorder:
    """Spans of this process, flushed to its part file next to the trace."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.part = f"{self.path}{PART}{os.getpid()}.jsonl"
        self._spans: list[Span] = []
        self._lock = threading.Lock()
        # Wall-clock anchor for a monotonic clock: ranks in one trace share wall time.
        self._wall_us = time.time_ns() / 1000
        self._mono_ns = time.perf_counter_ns()

    def now_us(self) -> float:
        return self._wall_us + (time.perf_counter_ns() - self._mono_ns) / 1000

    def add(self, span: Span) -> None:
        with self._lock:
            self._spans.append(span)

    def flush(self) -> int:
        """Append the spans recorded since the last flush to the part file; returns how many."""
        with self._lock:
            spans, self._spans = self._spans, []
        if not spans:
            return 0
        with open(self.part, "a", encoding="utf-8") as out:
            for s in spans:
                out.write(json.dumps(_encode(s), separators=(",", ":")) + "\n")
        return len(spans)


_recorder: Recorder | None = None


def enable(path: str) -> Recorder:
    """Record this process's spans for the trace at `path` (flushed at exit too)."""
    global _recorder
    if _recorder is not None and _recorder.path == os.path.abspath(path):
        return _recorder
    if _recorder is not None:
        _recorder.flush()
    _recorder = Recorder(path)
    return _recorder


def disable() -> None:
    """Flush and stop recording."""
    global _recorder
    if _recorder is not None:
        _recorder.flush()
    _recorder = None


def active() -> Recorder | None:
    """The recorder, or None when the timeline is off."""
    return _recorder


def flush() -> None:
    if _recorder is not None:
        _recorder.flush()


@contextlib.contextmanager
def span(name: str, kind: str, rank: int, **args: Any) -> Iterator[None]:
    """Record the time spent inside the block as `name` (a kind of work from `KINDS`)."""
    recorder = _recorder
    if recorder is None:
        yield
        return
    start = recorder.now_us()
    try:
        yield
    finally:
        end = recorder.now_us()
        recorder.add(Span(name, kind, rank, start, end - start, tuple(args.items())))


def record(name: str, kind: str, rank: int, start_us: float, end_us: float, **args: Any) -> None:
    """Record a span whose times were taken with `now_us()` (work that ends elsewhere)."""
    if _recorder is not None:
        _recorder.add(Span(name, kind, rank, start_us, end_us - start_us, tuple(args.items())))


def now_us() -> float:
    """The timeline's clock (0.0 when it is off)."""
    return _recorder.now_us() if _recorder is not None else 0.0


def _encode(s: Span) -> dict[str, Any]:
    return {
        "n": s.name,
        "k": s.kind,
        "r": s.rank,
        "t": s.start_us,
        "d": s.duration_us,
        "a": dict(s.args),
    }


def _decode(d: dict[str, Any]) -> Span:
    return Span(
        str(d["n"]),
        str(d["k"]),
        int(d["r"]),
        float(d["t"]),
        float(d["d"]),
        tuple(sorted(dict(d.get("a", {})).items())),
    )


# ------------------------------------------------------------------ merging (pure, then I/O)


def assign_rows(spans: Sequence[Span]) -> list[int]:
    """A row per span such that spans sharing a (rank, kind, row) never overlap partially.

    Perfetto draws the spans of one thread as a stack, so two collectives in flight at once
    (DDP's buckets) must not share a row unless one contains the other. Greedy by start time:
    each span takes the first row of its (rank, kind) whose last span has ended, or that
    contains it entirely (nesting), else a new row. Pure; property-tested.
    """
    order = sorted(range(len(spans)), key=lambda i: (spans[i].start_us, -spans[i].duration_us))
    rows: dict[tuple[int, str], list[list[tuple[float, float]]]] = {}
    out = [0] * len(spans)
    for i in order:
        s = spans[i]
        start, end = s.start_us, s.start_us + s.duration_us
        stacks = rows.setdefault((s.rank, s.kind), [])
        for row, stack in enumerate(stacks):
            while stack and stack[-1][1] <= start:
                stack.pop()  # ended before this one starts
            if not stack or stack[-1][1] >= end:  # free, or this span nests in the open one
                stack.append((start, end))
                out[i] = row
                break
        else:
            stacks.append([(start, end)])
            out[i] = len(stacks) - 1
    return out


def chrome_trace(spans: Sequence[Span]) -> dict[str, Any]:
    """The Chrome trace-event JSON of `spans`: process = rank, thread = kind and row."""
    rows = assign_rows(spans)
    kind_index = {k: i for i, k in enumerate(KINDS)}
    extra = sorted({s.kind for s in spans} - set(KINDS))
    kind_index.update({k: len(KINDS) + i for i, k in enumerate(extra)})
    events: list[dict[str, Any]] = []
    threads: set[tuple[int, str, int]] = set()
    for s, row in zip(spans, rows, strict=True):
        tid = kind_index[s.kind] * 100 + row
        threads.add((s.rank, s.kind, row))
        events.append(
            {
                "name": s.name,
                "cat": s.kind,
                "ph": "X",
                "ts": s.start_us,
                "dur": s.duration_us,
                "pid": s.rank,
                "tid": tid,
                "args": dict(s.args),
            }
        )
    for rank in sorted({s.rank for s in spans}):
        events.append(
            {
                "name": "process_name",
                "ph": "M",
                "pid": rank,
                "tid": 0,
                "args": {"name": f"rank {rank}"},
            }
        )
        events.append(
            {
                "name": "process_sort_index",
                "ph": "M",
                "pid": rank,
                "tid": 0,
                "args": {"sort_index": rank},
            }
        )
    for rank, kind, row in sorted(threads):
        tid = kind_index[kind] * 100 + row
        label = kind if row == 0 else f"{kind} {row + 1}"
        events.append(
            {"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": label}}
        )
        events.append(
            {
                "name": "thread_sort_index",
                "ph": "M",
                "pid": rank,
                "tid": tid,
                "args": {"sort_index": tid},
            }
        )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def parts_of(path: str) -> list[str]:
    return sorted(glob.glob(glob.escape(os.path.abspath(path)) + PART + "*.jsonl"))


def read_parts(paths: Iterable[str]) -> list[Span]:
    """Every span in the part files; a torn last line (a killed process) is skipped."""
    spans: list[Span] = []
    for part in paths:
        with open(part, encoding="utf-8") as lines:
            for line in lines:
                try:
                    spans.append(_decode(json.loads(line)))
                except (ValueError, KeyError, TypeError):
                    continue
    return spans


def clear(path: str) -> None:
    """Remove the trace at `path` and any parts left from an earlier run (before a new one)."""
    for stale in [*parts_of(path), path]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)


def merge(path: str) -> int:
    """Write the trace at `path` from its part files (flushing this process's first) and
    remove the parts; returns the number of spans written (0: nothing written)."""
    if _recorder is not None and _recorder.path == os.path.abspath(path):
        _recorder.flush()
    parts = parts_of(path)
    spans = read_parts(parts)
    if not spans:
        return 0
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(chrome_trace(spans), out)
    os.replace(tmp, path)
    for part in parts:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)
    return len(spans)


def render(trace_path: str, image_path: str, *, width_s: float | None = None) -> None:
    """Draw the trace at `trace_path` as a PNG: one band per rank, one row per kind of work
    (Perfetto's UI needs the internet; this needs matplotlib). `width_s` limits the picture
    to the first seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(trace_path, encoding="utf-8") as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    if not events:
        raise ValueError(f"{trace_path} holds no spans")
    t0 = min(e["ts"] for e in events)
    ranks = sorted({e["pid"] for e in events})
    kinds = [k for k in KINDS if any(e["cat"] == k for e in events)]
    kinds += sorted({e["cat"] for e in events} - set(kinds))
    lanes = {(r, k): i for i, (r, k) in enumerate((r, k) for r in ranks for k in kinds)}
    colours = plt.get_cmap("tab10")
    names = sorted({e["name"] for e in events})
    fig, ax = plt.subplots(figsize=(14, 0.35 * len(lanes) + 1.5))
    for e in events:
        start = (e["ts"] - t0) / 1e6
        if width_s is not None and start > width_s:
            continue
        lane = lanes[(e["pid"], e["cat"])]
        colour = colours(names.index(e["name"]) % 10)
        width = max(e["dur"] / 1e6, 1e-6)
        ax.barh(lane, width, left=start, height=0.8, color=colour, edgecolor="none")
    ax.set_yticks(range(len(lanes)), [f"rank {r} {k}" for r, k in lanes])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours(i % 10)) for i in range(len(names))]
    ax.legend(handles, names, loc="upper right", fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(image_path, dpi=110)
    plt.close(fig)


def from_env(env: dict[str, str] | None = None) -> Recorder | None:
    """Enable the timeline if `P2PDL_TIMELINE` names a trace; returns the recorder."""
    path = (os.environ if env is None else env).get(ENV, "")
    return enable(path) if path else None


atexit.register(flush)
from_env()

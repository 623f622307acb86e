"""The timeline: spans recorded per process, merged into one valid Chrome trace across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pdl.collectives import timeline
from p2pdl.collectives.timeline import Span, assign_rows, chrome_trace


@pytest.fixture
def recording(tmp_path: Path):
    trace = tmp_path / "trace.json"
    previous = timeline.active()
    timeline.enable(str(trace))
    try:
        yield trace
    finally:
        timeline.disable()
        if previous is not None:
            timeline.enable(previous.path)


spans_strategy = st.lists(
    st.builds(
        Span,
        name=st.sampled_from(["a", "b"]),
        kind=st.sampled_from(["compute", "collective"]),
        rank=st.integers(0, 2),
        start_us=st.integers(0, 50).map(float),
        duration_us=st.integers(0, 30).map(float),
    ),
    max_size=40,
)


@given(spans_strategy)
def test_spans_sharing_a_row_nest_or_do_not_overlap(spans: list[Span]) -> None:
    rows = assign_rows(spans)
    assert len(rows) == len(spans)
    for i, a in enumerate(spans):
        for j, b in enumerate(spans[:i]):
            if (a.rank, a.kind, rows[i]) != (b.rank, b.kind, rows[j]):
                continue
            a0, a1 = a.start_us, a.start_us + a.duration_us
            b0, b1 = b.start_us, b.start_us + b.duration_us
            disjoint = a1 <= b0 or b1 <= a0
            nested = (a0 >= b0 and a1 <= b1) or (b0 >= a0 and b1 <= a1)
            assert disjoint or nested, (a, b)


def test_calls_in_flight_together_get_separate_rows() -> None:
    first = Span("allreduce", "collective", 0, 0.0, 10.0)
    second = Span("allreduce", "collective", 0, 5.0, 10.0)
    inner = Span("phase 1", "collective", 0, 1.0, 2.0)
    assert assign_rows([first, second, inner]) == [0, 1, 0]


def test_the_trace_names_every_rank_and_row() -> None:
    trace = chrome_trace([Span("forward", "compute", 1, 0.0, 5.0, (("step", 3),))])
    json.dumps(trace)  # serialisable as it is
    events = trace["traceEvents"]
    (span,) = [e for e in events if e["ph"] == "X"]
    assert span == {
        "name": "forward", "cat": "compute", "ph": "X", "ts": 0.0, "dur": 5.0, "pid": 1,
        "tid": 0, "args": {"step": 3},
    }  # fmt: skip
    names = {(e["name"], e["args"].get("name")) for e in events if e["ph"] == "M"}
    assert ("process_name", "rank 1") in names
    assert ("thread_name", "compute") in names


def test_a_span_is_recorded_only_while_the_timeline_is_on(recording: Path) -> None:
    with timeline.span("forward", "compute", 0, step=1):
        pass
    timeline.disable()
    with timeline.span("backward", "compute", 0):
        pass
    assert timeline.merge(str(recording)) == 1
    events = json.loads(recording.read_text())["traceEvents"]
    assert [e["name"] for e in events if e["ph"] == "X"] == ["forward"]
    assert timeline.parts_of(str(recording)) == []  # parts removed once merged


def test_spans_of_several_processes_merge_into_one_trace(tmp_path: Path) -> None:
    """Each process flushes at exit (no explicit call); a torn line of a killed one is
    skipped; the merged trace has one process per rank."""
    trace = tmp_path / "trace.json"
    script = (
        "import sys\n"
        "from p2pdl.collectives import timeline\n"
        "rank = int(sys.argv[1])\n"
        "with timeline.span('step', 'compute', rank):\n"
        "    with timeline.span('reduce-scatter', 'collective', rank):\n"
        "        pass\n"
    )
    env = {**os.environ, timeline.ENV: str(trace)}
    for rank in (0, 1):
        subprocess.run([sys.executable, "-c", script, str(rank)], env=env, check=True, timeout=60)
    parts = timeline.parts_of(str(trace))
    assert len(parts) == 2
    with open(parts[0], "a") as torn:
        torn.write('{"n": "half a li')
    assert timeline.merge(str(trace)) == 4
    events = json.loads(trace.read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert sorted((e["pid"], e["name"]) for e in spans) == [
        (0, "reduce-scatter"), (0, "step"), (1, "reduce-scatter"), (1, "step"),
    ]  # fmt: skip
    assert all(e["dur"] >= 0 for e in spans)


def test_render_draws_a_picture(recording: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    for rank in (0, 1):
        timeline.record("all-gather", "collective", rank, 0.0, 10.0)
        timeline.record("forward", "compute", rank, 10.0, 30.0)
    timeline.merge(str(recording))
    image = tmp_path / "timeline.png"
    timeline.render(str(recording), str(image))
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_launch_merges_its_ranks_timelines_into_one_trace(tmp_path: Path) -> None:
    """`P2PDL_TIMELINE=… python -m p2pdl launch` leaves one merged trace with every rank."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "spans.py"
    script.write_text(
        "import os\n"
        "from p2pdl.collectives import timeline\n"
        "with timeline.span('forward/backward', 'compute', int(os.environ['RANK'])):\n"
        "    pass\n"
    )
    trace = tmp_path / "trace.json"
    env = {**os.environ, "P2PDL_TIMELINE": str(trace)}
    done = subprocess.run(
        [sys.executable, "-m", "p2pdl", "launch", "-n", "2", str(script)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert timeline.parts_of(str(trace)) == []
    events = json.loads(trace.read_text())["traceEvents"]
    ranks = {e["args"]["name"] for e in events if e.get("name") == "process_name"}
    assert ranks == {"rank 0", "rank 1"}, events

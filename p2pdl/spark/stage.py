"""What each task of the barrier stage runs: find the others, start one p2pdl node, run the job.

The way TorchDistributor hosts torch.distributed: partition 0's executor address is the
leader's, its port reaches the other tasks through `BarrierTaskContext.allGather`, and only
partition 0 returns a result. Before any node starts, every task checks what it can check
alone (the job imports, the data reads, torch is there); those answers are gathered too, so a
mistake ends the stage normally with every task's message, on the first attempt, instead of
one task failing and Spark retrying the stage. After training the tasks gather how each node
ended: a ConfigError anywhere ends the stage normally with the messages too; any other
failure (a lost peer, a crashed worker) fails the stage, and Spark's stage retry restarts
every task; with `checkpoint_dir` the new attempt resumes from the last checkpoint this call
wrote."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import io
import json
import logging
import os
import socket
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pdl.config import NodeConfig, Timeouts
from p2pdl.errors import ConfigError, P2PDLError
from p2pdl.schedule.checkpoint import CHECKPOINT_NAME
from p2pdl.schedule.errors import JobError
from p2pdl.schedule.runtime import JobOptions, JobOutcome, check_job, run_job
from p2pdl.schedule.task import task_digest
from p2pdl.spark.data import Columns, PartitionData, PartitionTask

__all__ = ["RUN_MARKER", "StageSpec", "barrier_task"]

log = logging.getLogger("p2pdl.spark")

RUN_MARKER = "spark-run"
"""File in checkpoint_dir naming the p2pdl.spark call whose checkpoints are there."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StageSpec:
    """Everything the tasks need, pickled into the stage's closure by Spark (never into the
    Spark conf, the environment or a log line: `secret` is left out of the repr)."""

    job: str
    num_nodes: int
    secret: bytes = field(repr=False)
    run_id: str
    """A fresh id per call: a retried stage recognises its own checkpoints by it."""
    columns: Columns | None = None
    """Set by fit(): the tasks train on their partitions' rows."""
    group_size: int | str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1
    resume: bool = False
    job_overrides: Mapping[str, Any] = field(default_factory=dict)
    timeouts: Timeouts = field(default_factory=Timeouts)
    start_timeout: float = 120.0
    leader_timeout: float = 30.0
    torch_threads: int | None = None


def _free_port(host: str) -> int:
    """A port on `host` free a moment ago (the TorchDistributor way: it is gathered to the
    other tasks before the leader binds it; a lost race fails the attempt, Spark retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _preflight(spec: StageSpec, rows: Iterable[Any], lead: bool, host: str) -> dict[str, Any]:
    """What this task can check alone, as one JSON-able answer for allGather."""
    answer: dict[str, Any] = {"error": None, "rows": 0, "port": 0, "resume": False}
    try:
        module = spec.job.partition(":")[0]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(
                f"cannot import the job's module {module!r} on this executor ({exc}); "
                "install it there or ship it (spark.submit.pyFiles / addPyFile)"
            ) from None
        try:
            task_digest(spec.job)  # what the nodes compare: the module's source, on sys.path
        except ConfigError as exc:
            raise ConfigError(
                f"{exc} on this executor's sys.path: the nodes compare the job module's source "
                "file, so it must be on sys.path (an editable install's import hook is not "
                "enough: add its folder to spark.executorEnv.PYTHONPATH)"
            ) from None
        if spec.columns is not None:
            try:
                import torch  # noqa: F401
            except ImportError:
                raise ConfigError("torch is not installed on this executor") from None
            answer["data"] = PartitionData.from_rows(rows, spec.columns)
            answer["rows"] = answer["data"].rows
        if lead:
            answer["port"] = _free_port(host)
            answer["resume"] = _resume_here(spec)
    except Exception as exc:
        answer["error"] = f"{type(exc).__name__}: {exc}"
    return answer


def _resume_here(spec: StageSpec) -> bool:
    """Resume when asked to, or when this is a retry of this very call (the marker holds its
    run id) and it has written a checkpoint."""
    if spec.checkpoint_dir is None:
        return False
    folder = Path(spec.checkpoint_dir)
    marker = folder / RUN_MARKER
    if marker.is_file() and marker.read_text().strip() == spec.run_id:
        return (folder / CHECKPOINT_NAME).is_file()
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(spec.run_id + "\n")
    return spec.resume


class _Guarded:
    """The task as the runtime sees it in a Spark task: every attribute is the task's, but an
    exception raised by its `step` or `prepare` (a bug, a bad row) also ends this node's run
    through `guard`, so that the stage fails instead of waiting on that step."""

    def __init__(self, inner: Any, guard: _Guard) -> None:
        self._inner = inner
        self._guard = guard

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if name not in ("step", "prepare") or not callable(value):
            return value

        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return value(*args, **kwargs)
            except P2PDLError:
                raise
            except Exception as exc:
                self._guard.failed(name, exc)
                raise

        return guarded


class _Guard:
    """Carries the first exception of a guarded task's step to the event loop of `_serve`."""

    def __init__(self, data: PartitionData | None) -> None:
        self.data = data
        self.loop: asyncio.AbstractEventLoop | None = None
        self.future: asyncio.Future[BaseException] | None = None

    def wrap(self, task: Any) -> _Guarded:
        """The runtime's `adapt_task`: the partition's rows (fit), then the guard."""
        return _Guarded(PartitionTask(task, self.data) if self.data is not None else task, self)

    def bind(self) -> asyncio.Future[BaseException]:
        self.loop = asyncio.get_running_loop()
        self.future = self.loop.create_future()
        return self.future

    def failed(self, where: str, exc: Exception) -> None:
        log.error("p2pdl.spark: the task's %s raised", where, exc_info=exc)
        loop, future = self.loop, self.future
        if loop is None or future is None:
            return

        def settle() -> None:
            if not future.done():
                future.set_result(exc)

        loop.call_soon_threadsafe(settle)


def unwrap(task: Any) -> Any:
    """The user's task inside the guard and the partition wrapper."""
    if isinstance(task, _Guarded):
        task = task._inner
    return task.inner if isinstance(task, PartitionTask) else task


def _options(
    spec: StageSpec,
    lead: bool,
    guard: _Guard,
    answers: list[dict[str, Any]],
    resume: bool,
) -> JobOptions:
    """The runtime's options: the leader's carry the job's settings, a joiner's only the job."""
    common: dict[str, Any] = {
        "job": spec.job,
        "leader_timeout": spec.leader_timeout,
        "adapt_task": guard.wrap,
    }
    if not lead:
        return JobOptions(**common)
    overrides = dict(spec.job_overrides)
    if guard.data is not None:
        overrides["dataset_size"] = sum(a["rows"] for a in answers)
    return JobOptions(
        **common,
        nodes=spec.num_nodes,
        min_nodes=spec.num_nodes,
        group_size=spec.group_size,  # type: ignore[arg-type]
        checkpoint_dir=spec.checkpoint_dir,
        checkpoint_every=spec.checkpoint_every,
        resume=resume,
        start_timeout=spec.start_timeout,
        job_overrides=overrides,
    )


def _result(outcome: JobOutcome) -> dict[str, Any]:
    """Partition 0's answer to the driver: summary, flat weights, state_dict bytes, metrics."""
    task = unwrap(outcome.task)
    result: dict[str, Any] = {"summary": outcome.summary, "weights": outcome.weights}
    model = getattr(task, "model", None)
    if model is not None and hasattr(model, "state_dict"):
        import torch

        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        result["state_dict"] = buffer.getvalue()
    evaluate = getattr(task, "evaluate", None)
    result["metrics"] = dict(evaluate()) if callable(evaluate) else {}
    return result


def _set_threads(spec: StageSpec, infos: list[str], host: str) -> None:
    """Share the host's cores among the tasks on it (torch takes every core otherwise)."""
    import sys

    if "torch" not in sys.modules and spec.columns is None:
        return
    import torch

    here = max(1, sum(1 for address in infos if address == host))
    torch.set_num_threads(spec.torch_threads or max(1, (os.cpu_count() or 1) // here))


def barrier_task(spec: StageSpec, rows: Iterable[Any]) -> Iterator[dict[str, Any]]:
    """The body of every barrier task (`rdd.barrier().mapPartitions`)."""
    from pyspark import BarrierTaskContext

    context = BarrierTaskContext.get()
    index = context.partitionId()
    hosts = [info.address.rpartition(":")[0] for info in context.getTaskInfos()]
    host, lead = hosts[index], index == 0
    answer = _preflight(spec, rows, lead, host)
    data = answer.pop("data", None)
    answers = [json.loads(text) for text in context.allGather(json.dumps(answer))]
    errors = {i: a["error"] for i, a in enumerate(answers) if a["error"]}
    if not errors and spec.columns is not None:
        errors = {
            i: f"its partition is empty ({sum(a['rows'] for a in answers)} rows in all); "
            "pass repartition=True or fewer num_nodes"
            for i, a in enumerate(answers)
            if a["rows"] == 0
        }
    if errors:
        if lead:
            yield {"errors": errors}
        return
    guard = _Guard(data)
    options = _options(spec, lead, guard, answers, answers[0]["resume"])
    # The leader checks the job (its task resolved, the spec with every override) before any
    # node starts: a worker would otherwise dial a leader that never listens until its
    # connect deadline.
    checked = _check(options) if lead else None
    refused = json.loads(context.allGather(json.dumps(checked))[0])
    if refused is not None:
        if lead:
            yield {"errors": {0: refused}}
        return
    leader = (hosts[0], answers[0]["port"])
    if lead:
        config = NodeConfig(
            world_size=spec.num_nodes, host=host, port=leader[1], secret=spec.secret,
            timeouts=spec.timeouts,
        )  # fmt: skip
    else:
        config = NodeConfig(leader=leader, host=host, secret=spec.secret, timeouts=spec.timeouts)
    _set_threads(spec, hosts, host)
    outcome, failure = _train(config, options, guard)
    verdicts = [json.loads(text) for text in context.allGather(json.dumps(_verdict(failure)))]
    if lead and outcome is not None:
        yield _result(outcome)  # trained: what a worker said while leaving does not matter
        return
    final = {i: v["error"] for i, v in enumerate(verdicts) if v["final"]}
    if final:
        if lead:
            yield {"errors": final}
        return
    if failure is not None:  # the stage fails; Spark's stage retry restarts every task
        # Whichever task Spark reports first, its error names every node's failure.
        failed = "; ".join(f"task {i}: {v['error']}" for i, v in enumerate(verdicts) if v["error"])
        raise JobError(f"training failed: {failed}") from failure


def _check(options: JobOptions) -> str | None:
    """The leader's check of the job; the error as text, or None."""
    try:
        check_job(options)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _train(
    config: NodeConfig, options: JobOptions, guard: _Guard
) -> tuple[JobOutcome | None, Exception | None]:
    """Run this task's node; (outcome, None) or (None, what ended it)."""
    import uvloop

    try:
        # A Spark task is an entry point of its own: it chooses the event loop here.
        return uvloop.run(_serve(config, options, guard)), None
    except Exception as exc:
        return None, exc


async def _serve(config: NodeConfig, options: JobOptions, guard: _Guard) -> JobOutcome:
    """`run_job`, ended early when the task's step raises (see `_Guarded`)."""
    failed = guard.bind()
    job = asyncio.ensure_future(run_job(config, options))
    await asyncio.wait({job, failed}, return_when=asyncio.FIRST_COMPLETED)
    if job.done():
        return job.result()
    job.cancel()
    with contextlib.suppress(BaseException):
        await job
    exc = failed.result()
    raise JobError(f"the task's step raised {type(exc).__name__}: {exc}") from exc


def _verdict(failure: Exception | None) -> dict[str, Any]:
    """How this task's node ended, for the allGather after training. A ConfigError is final
    (a retry would fail the same way); any other failure fails the stage, so Spark retries it."""
    if failure is None:
        return {"error": None, "final": False}
    return {
        "error": f"{type(failure).__name__}: {failure}",
        "final": isinstance(failure, ConfigError),
    }

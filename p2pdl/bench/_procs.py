"""Starting the worker processes of a benchmark: plain subprocesses, or under `mpirun`.

Benchmarks that compare against Open MPI launch every worker with `mpirun` (the only way
mpi4py gets a world communicator); the others, or hosts without MPI, get plain
subprocesses with the rank in the environment. Either way the parent picks the rendezvous
ports and passes them on the command line, so workers need no rendezvous of their own.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence

from p2pdl.launch.procs import stop_processes

RANK_ENV = "P2PDL_BENCH_RANK"
WORLD_ENV = "P2PDL_BENCH_WORLD"


def mpi_status() -> str | None:
    """None when mpi4py and mpirun are usable, else why not (for the results table)."""
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py not installed"
    if shutil.which("mpirun") is None:
        return "mpirun not installed"
    return None


def worker_rank() -> tuple[int, int]:
    """(rank, world size) of this worker, from our own variables or Open MPI's."""
    for rank_key, world_key in (
        (RANK_ENV, WORLD_ENV),
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
    ):
        if rank_key in os.environ and world_key in os.environ:
            return int(os.environ[rank_key]), int(os.environ[world_key])
    raise RuntimeError("not started as a benchmark worker (no rank in the environment)")


def run_workers(
    worker_argv: Sequence[str],
    nodes: int,
    *,
    use_mpirun: bool,
    timeout: float,
    env: dict[str, str] | None = None,
) -> int:
    """Run `python <worker_argv>` as `nodes` ranks; the first non-zero exit status, or 0.

    `env` adds to the workers' environment (a secret goes there, never on the command line).
    A worker that fails takes the rest down (after a short grace period); so does the timeout.
    """
    extra = env or {}
    python = [sys.executable, *worker_argv]
    env = {**os.environ, **extra}
    env.setdefault("PYTHONUNBUFFERED", "1")
    if use_mpirun:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        # No core binding: p2pdl and gloo run helper threads, and binding would pin them to
        # the same core as the main thread; every library gets the same freedom.
        command = [
            "mpirun",
            "--oversubscribe",
            "--bind-to",
            "none",
            "-n",
            str(nodes),
            *python,
        ]
        procs = [subprocess.Popen(command, env=env, start_new_session=True)]
    else:
        procs = []
        for rank in range(nodes):
            worker_env = dict(env)
            worker_env[RANK_ENV] = str(rank)
            worker_env[WORLD_ENV] = str(nodes)
            procs.append(subprocess.Popen(python, env=worker_env, start_new_session=True))
    deadline = time.monotonic() + timeout
    status = 0
    try:
        while procs:
            for proc in list(procs):
                code = proc.poll()
                if code is None:
                    continue
                procs.remove(proc)
                if code != 0 and status == 0:
                    status = code
                    stop_processes(procs, grace=5.0)
                    procs.clear()
                    break  # (the others are stopped; iterating on would remove them twice)
            if time.monotonic() > deadline:
                print(f"benchmark timed out after {timeout:.0f} s", file=sys.stderr)
                stop_processes(procs, grace=2.0)
                return 124
            time.sleep(0.05)
    except BaseException:
        stop_processes(procs, grace=2.0)
        raise
    return status

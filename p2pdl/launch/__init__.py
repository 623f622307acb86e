"""`python -m p2pdl launch -n N script.py …`: N local processes of one script, as a cluster.

Each process gets P2PDL_RANK, P2PDL_WORLD_SIZE, P2PDL_LEADER (rank 0 listens there),
P2PDL_SECRET (random per launch) and torchrun's names RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT (a port of its own for torch's store), so an
unmodified `init_process_group("p2pdl")` (or "gloo") script runs under it as under torchrun.
Output lines are prefixed with the rank. SIGINT/SIGTERM are forwarded. The first process
to fail stops the others (SIGTERM, then SIGKILL after a grace period) and its exit code
becomes the launcher's; every child is reaped before returning.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
from collections.abc import Hashable, Sequence
from typing import TypeVar

from p2pdl.launch.procs import free_port, signal_group

T = TypeVar("T", bound=Hashable)


def cluster_env(
    rank: int, world_size: int, leader: str, secret: str, master: str | None = None
) -> dict[str, str]:
    """Rank `rank`'s environment; `master` (host:port) is torch's store, as torchrun sets."""
    env = dict(os.environ)
    env.update(
        P2PDL_RANK=str(rank),
        P2PDL_WORLD_SIZE=str(world_size),
        P2PDL_LEADER=leader,
        P2PDL_SECRET=secret,
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        PYTHONUNBUFFERED="1",
    )
    if master is not None:
        host, _, port = master.rpartition(":")
        env.update(MASTER_ADDR=host, MASTER_PORT=port)
    env.setdefault("OMP_WAIT_POLICY", "passive")
    return env


async def _pump(stream: asyncio.StreamReader, prefix: bytes, out: object) -> None:
    buffer = getattr(out, "buffer", out)
    while True:
        line = await stream.readline()
        if not line:
            return
        buffer.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
        buffer.flush()


def reaped_order(done: set[T], exit_order: list[T]) -> list[T]:
    """Exits that landed in one wake-up, in the order they were reaped (`exit_order`, kept by
    done callbacks); one whose callback has not run yet (it finished in the same loop pass
    as `asyncio.wait` returned) comes after them."""
    rank = {task: i for i, task in enumerate(exit_order)}
    return sorted(done, key=lambda task: rank.get(task, len(exit_order)))


async def _launch(
    commands: Sequence[Sequence[str]],
    envs: Sequence[dict[str, str]],
    grace: float,
    label: str = "rank",
) -> int:
    """Run one process per rank; stop all on the first failure; return its exit code."""
    procs: list[asyncio.subprocess.Process] = []
    pumps: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    for rank, (argv, env) in enumerate(zip(commands, envs, strict=True)):
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        procs.append(proc)
        prefix = f"[{label} {rank}] ".encode()
        assert proc.stdout is not None and proc.stderr is not None
        pumps.append(asyncio.ensure_future(_pump(proc.stdout, prefix, sys.stdout)))
        pumps.append(asyncio.ensure_future(_pump(proc.stderr, prefix, sys.stderr)))

    def signal_all(signum: int) -> None:
        for proc in procs:
            signal_group(proc, signum)

    interrupted: list[int] = []

    def forward(signum: int) -> None:
        interrupted.append(signum)
        signal_all(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, forward, signum)

    waits = {asyncio.ensure_future(proc.wait()): rank for rank, proc in enumerate(procs)}
    exit_order: list[asyncio.Future[int]] = []
    for task in waits:
        task.add_done_callback(exit_order.append)
    failure: int | None = None
    pending = set(waits)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in reaped_order(done, exit_order):
                code = task.result()
                if code != 0 and failure is None:
                    failure = code
                    if not interrupted:
                        print(
                            f"p2pdl launch: {label} {waits[task]} exited with {code}; "
                            "stopping the others",
                            file=sys.stderr,
                            flush=True,
                        )
                    signal_all(signal.SIGTERM)
                    loop.call_later(grace, signal_all, signal.SIGKILL)
    finally:
        signal_all(signal.SIGKILL)
        for proc in procs:
            if proc.returncode is None:
                await proc.wait()
        await asyncio.gather(*pumps, return_exceptions=True)
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    if failure is None:
        return 0
    return failure if failure > 0 else 128 - failure


def launch(world_size: int, command: Sequence[str], *, grace: float = 5.0) -> int:
    """Run `command` (script.py args… or -m module args…) as `world_size` ranks."""
    import uvloop

    leader_port = free_port()
    master_port = free_port()
    while master_port == leader_port:
        master_port = free_port()
    leader, master = f"127.0.0.1:{leader_port}", f"127.0.0.1:{master_port}"
    secret = secrets.token_hex(32)
    argv = [sys.executable, *command] if command[0] != sys.executable else list(command)
    envs = [cluster_env(rank, world_size, leader, secret, master) for rank in range(world_size)]
    return _merge_timeline(uvloop.run(_launch([argv] * world_size, envs, grace)))


def launch_job(
    world_size: int, job: str, node_args: Sequence[str] = (), *, grace: float = 5.0
) -> int:
    """Run a group-scheduled job locally: one leader node and `world_size - 1` workers.

    The nodes are ordinary `python -m p2pdl node` processes (the leader with `--lead --job`,
    the others with `--leader`), sharing a fresh secret; `node_args` go to the leader.
    """
    import uvloop

    host, port = "127.0.0.1", free_port()
    secret = secrets.token_hex(32)
    base = [sys.executable, "-m", "p2pdl", "node"]
    leader = [
        *base,
        "--lead",
        "--nodes",
        str(world_size),
        "--job",
        job,
        "--host",
        host,
        "--port",
        str(port),
        *node_args,
    ]
    worker = [*base, "--leader", f"{host}:{port}", "--host", host, "--port", "0"]
    worker += ["--allow-task", job]  # the workers run this job and nothing else
    env = {**os.environ, "P2PDL_SECRET": secret, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_WAIT_POLICY", "passive")
    env.pop("P2PDL_RANK", None)
    commands = [leader] + [worker] * (world_size - 1)
    # Ranks are assigned by the leader (and change with membership epochs): label by node.
    return _merge_timeline(uvloop.run(_launch(commands, [env] * world_size, grace, label="node")))


def _merge_timeline(status: int) -> int:
    """With P2PDL_TIMELINE set, merge the ranks' span files into one trace once all have
    exited (each rank wrote its part at exit); `status` passes through."""
    path = os.environ.get("P2PDL_TIMELINE")
    if path:
        from p2pdl.collectives import timeline

        count = timeline.merge(path)
        if count:
            print(f"p2pdl launch: timeline {path}: {count} spans", file=sys.stderr, flush=True)
    return status

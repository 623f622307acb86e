"""Helpers for the group-scheduling tests: a tiny test task, and real node processes.

Every node is a real `python -m p2pdl node ...` process with its output in files; waits poll
a condition (a JSON line appearing) under a generous deadline; `Procs.close` kills whatever
is left, by pid, in `finally`.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from p2pdl.launch.procs import stop_processes

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 120.0

TASK_SOURCE = '''
"""A test task: least squares on 512 samples; behaviour switched by environment variables."""

import json
import os
import signal
import time
from pathlib import Path

import numpy as np

FEATURES = int(os.environ.get("SCHED_TEST_FEATURES", "31"))


class TestTask:
    spec = {
        "dataset_size": 512,
        "global_batch": 16,
        "epochs": int(os.environ.get("SCHED_TEST_EPOCHS", "3")),
        "lr": float(os.environ.get("SCHED_TEST_LR", "0.05")),
        "min_nodes": 2,
        "group_size": 4,
        "seed": 7,
        "params": {},
    }
    # Steps run on the loop thread unless a test holds a step (the gate below): a held
    # inline step would also stop the node from answering joiners.
    inline = not os.environ.get("SCHED_TEST_GATE_FILE")

    def setup(self, ctx):
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((512, FEATURES), dtype=np.float32) / np.float32(FEATURES**0.5)
        self.y = self.x.sum(axis=1) + np.float32(0.25)
        optimizer = json.loads(os.environ.get("SCHED_TEST_OPT", '{"kind": "sgd", "momentum": 0.9}'))
        ctx.init_model(np.zeros(FEATURES + 1, np.float32), optimizer)

    def step(self, ctx, samples, lr):
        mark = os.environ.get("SCHED_TEST_STEP_MARK")
        if mark:
            with open(mark, "a") as f:
                f.write(f"{ctx.step}\\n")
        die = os.environ.get("SCHED_TEST_DIE_AT_STEP")
        if die and ctx.step == int(die):
            print(json.dumps({"event": "dying", "time": time.time(), "step": ctx.step}), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        bad = os.environ.get("SCHED_TEST_RAISE_AT_STEP")
        if bad and ctx.step == int(bad):
            raise ValueError(f"bad batch at step {ctx.step}")
        gate = os.environ.get("SCHED_TEST_GATE_FILE")
        if gate and ctx.step == int(os.environ["SCHED_TEST_GATE_STEP"]):
            deadline = time.monotonic() + 60
            while not Path(gate).exists() and time.monotonic() < deadline:
                time.sleep(0.01)  # a test gate: hold this step until the joiner is set up
        x = self.x[samples]
        w = ctx.weights
        r = x @ w[:-1] + w[-1] - self.y[samples]
        np.dot(r, x, out=ctx.grad[:-1])
        ctx.grad[-1] = r.sum()
        return {"loss": float(0.5 * r @ r), "count": int(samples.size)}


task = TestTask
'''


def write_task(folder: Path, *, comment: str = "", spec_patch: str = "") -> Path:
    """Write the test task module `sched_task.py` into `folder`; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    source = TASK_SOURCE
    if spec_patch:
        source = source.replace('"params": {},', f'"params": {{}}, {spec_patch}')
    (folder / "sched_task.py").write_text(source + comment)
    return folder


class Node:
    def __init__(self, name: str, popen: subprocess.Popen[bytes], out: Path, err: Path) -> None:
        self.name = name
        self.popen = popen
        self.out = out
        self.err = err

    def events(self) -> list[dict[str, Any]]:
        result = []
        for line in self.out.read_text().splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    result.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return result

    def event(self, kind: str) -> dict[str, Any] | None:
        for event in self.events():
            if event.get("event") == kind:
                return event
        return None

    def wait_event(self, kind: str, timeout: float = DEADLINE) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            event = self.event(kind)
            if event is not None:
                return event
            if self.popen.poll() is not None:
                event = self.event(kind)
                if event is not None:
                    return event
                raise AssertionError(
                    f"{self.name} exited ({self.popen.returncode}) before {kind!r}:\n{self.log()}"
                )
            time.sleep(0.02)  # polling for a condition, under a deadline
        raise AssertionError(f"{self.name}: no {kind!r} within {timeout}s:\n{self.log()}")

    def wait(self, timeout: float = DEADLINE) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} did not exit within {timeout}s:\n{self.log()}"
            ) from None

    def log(self) -> str:
        return f"--- {self.name} stdout\n{self.out.read_text()}\n--- stderr\n{self.err.read_text()}"


class Procs:
    """Starts node processes; `close()` kills those still running (by pid)."""

    def __init__(self, tmp: Path, task_dir: Path | None = None, secret: str | None = None) -> None:
        self.tmp = tmp
        self.task_dir = task_dir
        self.secret = secret or secrets.token_hex(32)
        self.job: str | None = None
        self.nodes: list[Node] = []

    def start(
        self,
        name: str,
        args: list[str],
        env: dict[str, str] | None = None,
        task_dir: Path | None = None,
    ) -> Node:
        full_env = dict(os.environ)
        paths = [str(task_dir or self.task_dir or REPO), str(REPO)]
        full_env["PYTHONPATH"] = os.pathsep.join(paths)
        full_env["P2PDL_SECRET"] = self.secret
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        out = self.tmp / f"{name}.out"
        err = self.tmp / f"{name}.err"
        popen = subprocess.Popen(
            [sys.executable, "-m", "p2pdl", "--log-level", "INFO", "node", *args],
            cwd=str(REPO),
            env=full_env,
            stdout=out.open("wb"),
            stderr=err.open("wb"),
            start_new_session=True,
        )
        node = Node(name, popen, out, err)
        self.nodes.append(node)
        return node

    def lead(self, job: str, nodes: int, *extra: str, env: dict[str, str] | None = None) -> Node:
        self.job = job
        return self.start(
            "leader",
            ["--lead", "--job", job, "--nodes", str(nodes), "--op-timeout", "30", *extra],
            env,
        )

    def join(
        self,
        name: str,
        leader: Node,
        env: dict[str, str] | None = None,
        task_dir: Path | None = None,
    ) -> Node:
        address = leader.wait_event("ready")["address"]
        allow = ["--allow-task", self.job] if self.job else []
        return self.start(name, ["--leader", address, "--op-timeout", "30", *allow], env, task_dir)

    def close(self) -> None:
        stop_processes([node.popen for node in self.nodes], grace=0.0)

    def logs(self) -> str:
        return "\n".join(node.log() for node in self.nodes)

"""A Spark standalone cluster on namespace hosts: executors on separate addresses, shaped links.

Host 0 of a :class:`~p2pdl.testing.netns.NamespaceCluster` runs Spark's ``Master`` and the
driver (:meth:`StandaloneSpark.run_driver`: a Python process on that host); every other host
runs one ``Worker``, whose executors therefore talk to each other and to the driver only over
the hosts' links (their only route), shaped as the namespace cluster shapes them. The daemons
are the installed pyspark package's own (``$SPARK_HOME/bin/spark-class``) and need Java.

Start-up waits on what the daemons log (the Master elected, every Worker registered), each with
a deadline; a daemon that exits or a deadline that passes raises :class:`SparkClusterError`
with the end of that daemon's log. :meth:`StandaloneSpark.close` stops the daemons and their
executors (one process group each) and removes the work folder.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from p2pdl.errors import ConfigError, P2PDLError
from p2pdl.launch.procs import stop_processes
from p2pdl.testing.netns import Host, NamespaceCluster
from p2pdl.testing.output import ProcessOutput

__all__ = ["SparkClusterError", "StandaloneSpark", "spark_home"]

MASTER_PORT = 7077
_MASTER_UI_PORT = 8080
_WORKER_UI_PORT = 8081
_LOG_LINES = 2000
_STOP_GRACE = 5.0
_TAIL = 30
"""Lines of a daemon's log an error shows."""
_ELECTED = re.compile(r"I have been elected leader|New state: ALIVE")
_REGISTERED = re.compile(r"Registering worker (\d+\.\d+\.\d+\.\d+):\d+")


class SparkClusterError(P2PDLError):
    """A Spark daemon did not start, or exited, within its deadline."""


def _found(log: ProcessOutput, pattern: re.Pattern[str]) -> bool:
    return any(pattern.search(line) for line in log.lines)


def spark_home() -> str:
    """`$SPARK_HOME`, or the installed pyspark package (which ships the daemons and jars)."""
    home = os.environ.get("SPARK_HOME")
    if home:
        return home
    try:
        import pyspark
    except ImportError:
        raise ConfigError("a Spark cluster needs pyspark (the [spark] extra)") from None
    return os.path.dirname(pyspark.__file__)


class StandaloneSpark:
    """Spark's Master (and the driver) on host 0 of `hosts`, one Worker on each other host.

    `worker_cores`/`worker_memory`: what each Worker offers (`--cores`, `--memory`).
    `start_timeout`: seconds for the Master to come up and every Worker to register.
    """

    def __init__(
        self,
        hosts: NamespaceCluster,
        *,
        worker_cores: int = 1,
        worker_memory: str = "2g",
        start_timeout: float = 120.0,
    ) -> None:
        if len(hosts) < 2:
            raise ConfigError("a standalone cluster needs a master host and at least one worker")
        if worker_cores < 1:
            raise ConfigError(f"worker_cores must be >= 1, got {worker_cores}")
        if shutil.which("java") is None:
            raise ConfigError("Spark needs Java: no `java` on PATH")
        self.hosts = hosts
        self.worker_cores = worker_cores
        self.worker_memory = worker_memory
        self.start_timeout = start_timeout
        self.home = spark_home()
        self._logs: list[ProcessOutput] = []
        self._work: Path | None = None

    @property
    def master_host(self) -> Host:
        return self.hosts[0]

    @property
    def worker_hosts(self) -> tuple[Host, ...]:
        return tuple(self.hosts)[1:]

    @property
    def master_url(self) -> str:
        return f"spark://{self.master_host.address}:{MASTER_PORT}"

    def driver_conf(self) -> dict[str, str]:
        """Spark settings of a driver on the master's host (its address for executors)."""
        address = self.master_host.address
        return {"spark.driver.host": address, "spark.driver.bindAddress": address}

    def env(self, host: Host) -> dict[str, str]:
        """The environment of a Spark process on `host`: it binds to and advertises the
        host's address (not the machine's name, which resolves outside the namespaces)."""
        return dict(
            os.environ,
            SPARK_HOME=self.home,
            SPARK_LOCAL_IP=host.address,
            SPARK_LOCAL_HOSTNAME=host.address,
            SPARK_NO_DAEMONIZE="1",
        )

    # ------------------------------------------------------------------ life cycle
    def __enter__(self) -> StandaloneSpark:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start the Master, then the Workers; return once every Worker has registered."""
        if self._work is not None:
            raise SparkClusterError("this standalone cluster was started already")
        self._work = Path(tempfile.mkdtemp(prefix="p2pdl-spark-"))
        try:
            deadline = time.monotonic() + self.start_timeout
            master = self._daemon(
                "master",
                self.master_host,
                [
                    "org.apache.spark.deploy.master.Master",
                    *("--host", self.master_host.address, "--port", str(MASTER_PORT)),
                    *("--webui-port", str(_MASTER_UI_PORT)),
                ],
            )
            master.wait_for(
                lambda: _found(master, _ELECTED) or None,
                "election as leader",
                deadline,
                error=SparkClusterError,
                last=_TAIL,
            )
            for host in self.worker_hosts:
                self._daemon(
                    f"worker {host.index}",
                    host,
                    [
                        "org.apache.spark.deploy.worker.Worker",
                        *("--host", host.address, "--cores", str(self.worker_cores)),
                        *("--memory", self.worker_memory, "--work-dir", str(self._work)),
                        *("--webui-port", str(_WORKER_UI_PORT), self.master_url),
                    ],
                )
            wanted = {host.address for host in self.worker_hosts}

            def registered() -> bool | None:
                seen = {m.group(1) for x in master.lines if (m := _REGISTERED.search(x))}
                return True if wanted <= seen else None

            master.wait_for(
                registered,
                "registration of every worker",
                deadline,
                error=SparkClusterError,
                watch=self._logs[1:],
                last=_TAIL,
            )
        except BaseException:
            self.close()
            raise

    def _daemon(self, name: str, host: Host, args: list[str]) -> ProcessOutput:
        proc = host.popen(
            [os.path.join(self.home, "bin", "spark-class"), *args],
            env=self.env(host),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        log = ProcessOutput(name, proc, keep=_LOG_LINES)
        self._logs.append(log)
        return log

    def close(self) -> None:
        """Stop the Workers (and their executors), then the Master; remove the work folder."""
        logs, self._logs = self._logs, []
        stop_processes([log.proc for log in reversed(logs)], grace=_STOP_GRACE)
        for log in logs:
            log.join(_STOP_GRACE)  # the pipe is at its end once the process group is gone
            if log.proc.stdout is not None:
                log.proc.stdout.close()
        work, self._work = self._work, None
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)

    def pids(self) -> list[int]:
        """The daemons' process ids (each leads the process group of its executors)."""
        return [log.proc.pid for log in self._logs]

    def logs(self, lines: int = 30) -> str:
        """The end of every daemon's log (for a failed test's report)."""
        return "\n".join(f"--- {log.name}\n{log.text(lines)}" for log in self._logs)

    # ------------------------------------------------------------------ the driver
    def run_driver(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,
    ) -> subprocess.CompletedProcess[str]:
        """Run `python argv...` on the master's host to completion (stdout and stderr
        captured, not checked): a driver whose executors are the Workers' (`master_url`,
        `driver_conf()`; `P2PDL_SPARK_MASTER` and `P2PDL_SPARK_DRIVER_HOST` are set for it)."""
        host = self.master_host
        environment = {
            **self.env(host),
            "P2PDL_SPARK_MASTER": self.master_url,
            "P2PDL_SPARK_DRIVER_HOST": host.address,
            **(env or {}),
        }
        return host.run([python, *argv], timeout=timeout, check=False, env=environment)

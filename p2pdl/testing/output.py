"""A child process's output read line by line in a thread, and waits for what it says.

The one mechanism behind `LocalCluster.wait_event` (node processes' JSON events) and
`StandaloneSpark` (Spark daemons' log lines): a wait holds a deadline, wakes on every new
line, and fails with the end of the output as soon as the process (or one it watches) has
finished writing without saying what was waited for.
"""

from __future__ import annotations

import collections
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = ["ProcessOutput"]

T = TypeVar("T")


class ProcessOutput:
    """Lines of `proc`'s stdout (stderr merged there by the caller), as text.

    `keep`: how many lines to keep (None: all). `parse(line)`: an item to remember for the
    line (None: nothing), kept in `items` whatever `keep` drops.
    """

    def __init__(
        self,
        name: str,
        proc: subprocess.Popen[Any],
        *,
        keep: int | None = None,
        parse: Callable[[str], Any] | None = None,
    ) -> None:
        self.name = name
        self.proc = proc
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self.items: list[Any] = []
        self.eof = False
        """The process closed its output: nothing more will be read."""
        self.changed = threading.Condition()
        self._parse = parse
        self._reader = threading.Thread(target=self._read, name=f"output {name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
            line = text.rstrip("\n")
            with self.changed:
                self.lines.append(line)
                if self._parse is not None:
                    item = self._parse(line)
                    if item is not None:
                        self.items.append(item)
                self.changed.notify_all()
        with self.changed:
            self.eof = True
            self.changed.notify_all()

    def text(self, last: int | None = None) -> str:
        """The kept lines (the `last` ones only, if given)."""
        with self.changed:
            lines = list(self.lines)
        return "\n".join(lines if last is None else lines[-last:])

    def join(self, timeout: float) -> None:
        """Wait for the reader to reach the end of the output (after the process ended)."""
        self._reader.join(timeout)

    def wait_for(
        self,
        found: Callable[[], T | None],
        what: str,
        deadline: float,
        *,
        error: Callable[[str], Exception],
        watch: Sequence[ProcessOutput] = (),
        last: int | None = None,
    ) -> T:
        """`found()` once it is not None (called under the lock, after every line).

        Raises `error(message)` when this process or one in `watch` has finished its output
        first (with its exit status), or when `deadline` (time.monotonic()) passes; the
        message ends with that process's output (its `last` lines, if given).
        """
        with self.changed:
            while True:
                result = found()
                if result is not None:
                    return result
                for output in (self, *watch):
                    if output.eof:
                        raise error(
                            f"{output.name} exited with {output.status()} before {what}"
                            f"\n--- {output.name} log ---\n{output._tail(last)}"
                        )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise error(
                        f"{self.name}: no {what} in time\n--- {self.name} log ---\n"
                        f"{self._tail(last)}"
                    )
                self.changed.wait(min(left, 0.5))

    def status(self) -> str:
        """The exit status (after `eof`), or a word for a process that still runs."""
        try:
            return str(self.proc.wait(5.0))
        except subprocess.TimeoutExpired:
            return "its output closed but still running"

    def _tail(self, last: int | None) -> str:
        lines = list(self.lines)  # (a deque's copy: safe without the other's lock)
        return "\n".join(lines if last is None else lines[-last:])

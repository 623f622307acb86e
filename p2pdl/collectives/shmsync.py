"""Synchronisation between the ranks of one host through shared memory, without TCP frames.

Each rank owns one small control block (a sealed memfd page that only it maps writable, its
peers read-only) and one doorbell (an eventfd). A shared-memory call `seq` (its operation
number + 1, the same on every rank for matched calls) moves a rank's block through

    current = seq   (it has started: it reads nothing of earlier calls any more)
    enter   = seq   (its data is in its segment; the descriptor, half and segment are named)
    out     = seq   (its slice's result is in its segment)
    done    = seq   (it has finished, or failed, this call)

and after each step it rings every peer's doorbell. A waiter checks its peers' blocks; it
spins a little when every rank has a core of its own (otherwise it yields its core a few
times, so that a runnable peer can get there), then sleeps on its doorbell under the
call's deadline (its operation's), with a future per missing peer registered on the
operation, so a lost link fails the call with `PeerLostError` naming the rank and a timeout
names the ranks that never got there.

Ordering: a rank writes its data, then the counter, then rings; a waiter drains its
doorbell, then reads counters, then the data. That is enough on x86-64 (stores are seen in
program order, loads are not reordered with loads); `supported()` says no elsewhere, and
those hosts keep the TCP handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import platform
import time
from collections.abc import Callable

import numpy as np

from p2pdl import kernels
from p2pdl.collectives.op import Operation

# The control block's layout is the compiled call's (`kernels.shmcall`).
from p2pdl.kernels.shmcall import ASLEEP, DESC_LEN, DESC_MAX, ENTER, OFFERED, PARITY
from p2pdl.kernels.shmcall import DESC_AT as _DESC_AT
from p2pdl.kernels.shmcall import IDENT_AT as _IDENT_AT
from p2pdl.kernels.shmcall import IDENT_BYTES as _IDENT_BYTES

SPIN_S = 30e-6
"""How long a waiter polls its peers' blocks before it sleeps on its doorbell (only when
every rank of the call has a core: a spinning rank would otherwise take its peer's)."""


YIELDS = 20
"""When ranks outnumber the cores (no spinning), how many times a waiter first yields its core
(`sched_yield`) and checks again before it sleeps on its doorbell: a peer that is runnable
on this core gets it at once, instead of both paying a sleep and an eventfd wake-up
(`bench schedule --nodes 4` on 2 cores: 1,189-1,212 -> 1,403-1,531 it/s; a 4-rank 4 KiB
allreduce 1.12 -> 0.94-0.96 ms, with less CPU)."""


PATIENT_YIELDS = 300
"""The same for a call running on the blocking facade's caller thread (`inline`): a wait it
cannot meet there goes to the loop, two thread wake-ups, so it yields longer first
(`bench allreduce -n 4 --sizes 4K --compare gloo,mpi`, five runs each, sync facade ÷ asyncio:
1.03-1.48, median 1.12, with 20; 0.91-1.22, median 1.05, with 300)."""


def supported() -> bool:
    """Whether this machine's memory order makes the counters safe without fences."""
    return platform.machine().lower() in ("x86_64", "amd64") and hasattr(os, "eventfd")


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class ControlBlock:
    """One rank's control block over a mapping (writable only in its owner)."""

    def __init__(self, mapping: mmap.mmap) -> None:
        self._map = mapping
        self.words = np.frombuffer(mapping, dtype=np.uint64, count=8)

    def __getitem__(self, word: int) -> int:
        return int(self.words[word])

    def set(self, word: int, value: int) -> None:
        self.words[word] = value

    def ident(self) -> bytes:
        """The identity of the data segment named at `enter` (see `shmfd.Offer.ident`)."""
        return bytes(self._map[_IDENT_AT : _IDENT_AT + _IDENT_BYTES])

    def names(self, descriptor: bytes) -> bool:
        """Whether this block's call is the one `descriptor` (as `enter` wrote it) names."""
        desc = descriptor[:DESC_MAX]
        return int(self.words[DESC_LEN]) == len(desc) and (
            self._map[_DESC_AT : _DESC_AT + len(desc)] == desc
        )

    def descriptor(self) -> str:
        length = min(self[DESC_LEN], DESC_MAX)
        return bytes(self._map[_DESC_AT : _DESC_AT + length]).decode("utf-8", "replace")

    def enter(
        self, seq: int, parity: int, ident: bytes, descriptor: bytes, *, offered: bool
    ) -> None:
        """Name this call's half, segment and descriptor, and whether this call sent every
        peer the segment's offer over its link; then say its data is in."""
        desc = descriptor[:DESC_MAX]
        self._map[_DESC_AT : _DESC_AT + len(desc)] = desc
        self._map[_IDENT_AT : _IDENT_AT + _IDENT_BYTES] = ident.ljust(_IDENT_BYTES, b"\0")
        self.words[DESC_LEN] = len(desc)
        self.words[PARITY] = parity
        self.words[OFFERED] = seq if offered else 0
        self.words[ENTER] = seq

    def release(self) -> None:
        """Drop the array over the mapping (before it is closed)."""
        self.words = np.zeros(8, dtype=np.uint64)


class Doorbell:
    """This rank's eventfd: peers ring it after each step; the loop wakes the waiter."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None

    def _rung(self) -> None:
        self.drain()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            os.eventfd_read(self.fd)

    async def wait(self) -> None:
        """Until a peer rings (the caller re-checks what it waits for: a ring is a hint)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._detach()
            loop.add_reader(self.fd, self._rung)
            self._loop = loop
        self._waiter = loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _detach(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.fd)
        self._loop = None

    def close(self) -> None:
        self._detach()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def ring(blocks: list[ControlBlock], fds: list[int]) -> None:
    """Ring the doorbells of the peers (`blocks[i]`'s owner has doorbell `fds[i]`) that are
    asleep on theirs, after this rank's latest step: the fence orders that step's stores
    before the reads of the peers' `ASLEEP` words (a peer sets its word, fences, then checks
    the steps: one of the two sees the other). A peer that spins or runs needs no ring, and
    its idle loop thread is not woken for nothing. A peer that has gone makes no difference.
    """
    kernels.full_fence()
    for block, fd in zip(blocks, fds, strict=True):
        if block.words[ASLEEP]:
            with contextlib.suppress(OSError):
                os.eventfd_write(fd, 1)


def spin_until(
    ready: dict[int, Callable[[], bool]], spin_s: float = 0.0, yields: int = YIELDS
) -> list[tuple[int, Callable[[], bool]]]:
    """Check `ready[p]()` for every peer `p`, polling up to `spin_s` (or, without spinning,
    yielding the core `yields` times); the peers still not ready."""
    left = [(p, check) for p, check in ready.items() if not check()]
    if not left:
        return left
    if spin_s > 0:
        end = time.perf_counter() + spin_s
        while left and time.perf_counter() < end:
            left = [(p, check) for p, check in left if not check()]
    else:
        for _ in range(yields):
            os.sched_yield()
            left = [(p, check) for p, check in left if not check()]
            if not left:
                break
    return left


async def sleep_until(
    op: Operation,
    own: ControlBlock,
    bell: Doorbell,
    left: list[tuple[int, Callable[[], bool]]],
) -> None:
    """Until `check()` holds for every `(peer, check)` of `left`, sleeping on `bell`, within
    `op`'s deadline: each missing peer gets a future on `op` (a lost link to it fails the
    call, a timeout names it). This rank's block (`own`) says it is asleep meanwhile, so
    that peers ring (`ring`)."""
    if not left:
        return
    futures = {p: op.expect(p, check) for p, check in left}
    own.words[ASLEEP] = 1
    kernels.full_fence()  # the word is seen before the steps are read (see `ring`)
    try:
        while True:
            bell.drain()
            still = []
            for p, check in left:
                if check():
                    if not futures[p].done():
                        futures[p].set_result(None)
                else:
                    still.append((p, check))
            left = still
            if not left:
                return
            await bell.wait()
    finally:
        own.words[ASLEEP] = 0
        for future in futures.values():
            if not future.done():
                future.cancel()


async def wait_until(
    op: Operation,
    own: ControlBlock,
    bell: Doorbell,
    ready: dict[int, Callable[[], bool]],
    spin_s: float = 0.0,
) -> None:
    """Until `ready[p]()` holds for every peer `p`, within `op`'s deadline: `spin_until`,
    then `sleep_until`."""
    await sleep_until(op, own, bell, spin_until(ready, spin_s))

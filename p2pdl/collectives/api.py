"""The collective entry points: argument checks, phase 1 (local sum), algorithm choice.

`choose_algorithm` is the documented "auto" policy (measured on loopback, 2 cores; see
docs/benchmarks.md): one-hop `direct` exchange while latency dominates, BigDL's `sliced`
all-to-all above that. `ring` is kept for link-bound networks, where it is chosen explicitly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from p2pdl import kernels
from p2pdl.collectives.baselines import allreduce_driver, allreduce_tree
from p2pdl.collectives.compute import Compute, ScratchPool
from p2pdl.collectives.context import OnSlice, ReduceContext
from p2pdl.collectives.hierarchical import allreduce_hierarchical, host_groups, worth_it
from p2pdl.collectives.op import Group, Operation
from p2pdl.collectives.p2p import Sequences, p2p_base, recv_bytes, send_bytes
from p2pdl.collectives.plan import SlicePlan, plan_slices
from p2pdl.collectives.ring import allreduce_ring
from p2pdl.collectives.shm import ShmArena, allreduce_shm, probe
from p2pdl.collectives.sliced import allgather_slices, allreduce_sliced, reduce_scatter
from p2pdl.collectives.small import allreduce_direct, barrier, broadcast
from p2pdl.config import DEFAULT_CHUNK_BYTES
from p2pdl.errors import P2PDLError, SharedMemoryError

log = logging.getLogger("p2pdl.collectives")

ALGORITHMS = {
    "direct": allreduce_direct,
    "sliced": allreduce_sliced,
    "ring": allreduce_ring,
    "driver": allreduce_driver,
    "tree": allreduce_tree,
}
OPS = ("sum", "mean")
COMPRESSIONS = (None, "bf16", "fp16")
DIRECT_MAX_BYTES = 512 * 1024
"""`direct` while each rank sends at most 2 × this (nbytes · (world_size − 1) ≤ 1 MiB)."""
SHM_MIN_BYTES = 256 * 1024
"""`auto` takes the shared-memory path when every rank is on one host and
nbytes · (world_size − 1) is at least this (below it one-hop `direct` is faster)."""
SPECIAL = ("hierarchical", "shm")
"""Algorithms that need more than the context: host identities, shared segments."""


_DTYPE_NAMES = {"f": "float32", "d": "float64"}
"""str(dtype) costs microseconds per call; descriptors only ever name these two."""


def choose_algorithm(
    nbytes: int,
    world_size: int,
    host_ids: Sequence[str] | None = None,
    *,
    shared_memory: bool = False,
) -> str:
    """The "auto" policy: `direct` for small buffers, `sliced` otherwise — or
    `hierarchical` when ranks share hosts across several hosts (one copy per host link), or
    `shm` when every rank is on one host and can map the others' segments (`shared_memory`).

    `shm` against `direct` (loopback, 2 cores, medians of 40 interleaved calls): n=2 direct
    0.14 vs shm 0.18 ms at 128 KiB, shm 0.21 vs 0.24 ms at 256 KiB; n=4 direct 0.73 vs 0.94
    ms at 64 KiB, shm 1.00 vs 1.12 ms at 128 KiB: shm from nbytes · (n − 1) ≥ 256 KiB.

    Measured crossover (loopback, 2 shared cores, medians of 30 interleaved calls, the
    slowest rank's time; table in docs/benchmarks.md "AllReduce"): `direct` beat `sliced`
    up to 1 MiB at n=2 (0.55 vs 0.59 ms) and lost at 2 MiB; up to 512 KiB at n=3 (0.94 vs
    1.04 ms), tied at 1 MiB and lost at 2 MiB; up to 512 KiB at n=4 (1.72 vs 1.88 ms) and
    lost at 1 MiB (3.42 vs 2.83 ms). In bytes each rank sends in `direct`, nbytes · (n − 1),
    the crossover sits near 1 MiB for every n measured, which is the rule below. (At exactly
    256 KiB `direct` measured slower than at 512 KiB: a frame at the transport's eager limit
    that arrives before its receive is posted is buffered and copied; see the docs.)
    """
    if world_size > 1 and shared_memory and nbytes * (world_size - 1) >= SHM_MIN_BYTES:
        return "shm"
    if world_size <= 1 or nbytes * max(1, world_size - 1) <= DIRECT_MAX_BYTES * 2:
        return "direct"
    if worth_it(host_ids):
        return "hierarchical"
    return "sliced"


def as_flat_array(array: Any, what: str = "array") -> np.ndarray:
    """A flat, writable numpy view of a contiguous float32/float64 numpy array or CPU tensor."""
    if not isinstance(array, np.ndarray):
        module = type(array).__module__
        if module.startswith("torch"):
            if getattr(array, "device", None) is not None and array.device.type != "cpu":
                raise TypeError(f"{what} must be a CPU tensor, got one on {array.device}")
            if not array.is_contiguous():
                raise ValueError(f"{what} must be contiguous")
            array = array.detach().numpy()
        else:
            raise TypeError(f"{what} must be a numpy array or a torch CPU tensor, got {module}")
    if array.dtype not in (np.float32, np.float64):
        raise TypeError(f"{what} must be float32 or float64, got {array.dtype}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous")
    if not array.flags.writeable:
        raise ValueError(f"{what} must be writable (the result is written in place)")
    return array.reshape(-1)


def _message_bytes(array: Any, *, writable: bool) -> np.ndarray:
    """A flat uint8 view of a contiguous numpy array or CPU tensor of any dtype."""
    if not isinstance(array, np.ndarray):
        if type(array).__module__.startswith("torch"):
            import torch

            if array.device.type != "cpu":
                raise TypeError(f"the message must be a CPU tensor, got one on {array.device}")
            if not array.is_contiguous():
                raise ValueError("the message tensor must be contiguous")
            array = array.detach().reshape(-1).view(torch.uint8).numpy()
        else:
            raise TypeError(f"a message must be a numpy array or a CPU tensor, got {type(array)}")
    if not array.flags.c_contiguous:
        raise ValueError("the message array must be C-contiguous")
    if writable and not array.flags.writeable:
        raise ValueError("the receive buffer must be writable")
    return array.reshape(-1).view(np.uint8)


def _p2p_descriptor(data: np.ndarray, tag: object) -> str:
    if isinstance(tag, bool) or not isinstance(tag, int) or not 0 <= tag < 2**31:
        raise ValueError(f"tag must be an integer in 0..2**31-1, got {tag!r}")
    return f"p2p(tag {tag}, {data.nbytes} bytes)"


def _local_buffers(arrays: Any) -> list[np.ndarray]:
    if isinstance(arrays, Sequence) and not isinstance(arrays, np.ndarray):
        if not arrays:
            raise ValueError("allreduce needs at least one buffer")
        flats = [as_flat_array(a, f"buffer {i}") for i, a in enumerate(arrays)]
        first = flats[0]
        for i, flat in enumerate(flats[1:], start=1):
            if flat.dtype != first.dtype or flat.size != first.size:
                raise ValueError(
                    f"local buffer {i} is {flat.dtype}[{flat.size}], "
                    f"buffer 0 is {first.dtype}[{first.size}]"
                )
        return flats
    return [as_flat_array(arrays)]


def deadline_of(timeout: float | None, default: float) -> float:
    """The loop-time deadline of one call: `timeout` seconds from now (`None`: `default`).

    `timeout=0` means zero: the call fails unless it needs no waiting at all."""
    if timeout is None:
        timeout = default
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise ValueError(f"timeout must be a number >= 0 or None, got {timeout!r}")
    return asyncio.get_running_loop().time() + float(timeout)


class Collectives:
    """The collectives of one rank over one group (a mesh of one membership epoch).

    Every method takes `timeout` (seconds, `None` for the default) and turns it into one
    deadline that everything the call does shares: a shared-memory probe, the algorithm and
    a redo over TCP.
    """

    def __init__(
        self,
        group: Group,
        *,
        timeout: float,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        compute: Compute | None = None,
        host_ids: Sequence[str] | None = None,
    ) -> None:
        self.group = group
        self.host_ids = list(host_ids) if host_ids is not None else None
        """Which host each rank runs on (rank order); ranks on one host are local."""
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.compute = compute or Compute()
        self.scratch = ScratchPool()
        self.shm = ShmArena()
        self.last_algorithm: str | None = None
        """The algorithm the latest allreduce ran ("auto" resolved), for reports."""
        self.sequences = Sequences()

    @property
    def one_host(self) -> bool:
        """Every rank (more than one) runs on this host, by the host identities given."""
        ids = self.host_ids
        n = self.group.world_size
        return n > 1 and ids is not None and len(ids) == n and len(set(ids)) == 1

    def deadline(self, timeout: float | None) -> float:
        return deadline_of(timeout, self.timeout)

    async def shm_usable(self, deadline: float | None = None) -> bool:
        """Whether every rank can map every other rank's shared segment (probed once).

        Every rank must call this at the same point of its collective sequence: the probe
        is a collective (two tiny frames per peer).
        """
        arena = self.shm
        if arena.usable is None:
            arena.usable = await self._probe("probing", None, deadline)
        return arena.usable

    async def host_shm_usable(self, deadline: float | None = None) -> bool:
        """Whether the ranks of this rank's host can map each other's segments (probed once;
        a collective like `shm_usable`, whose frames stay within each host)."""
        arena = self.shm
        if arena.host_usable is None:
            ids = self.host_ids
            assert ids is not None and len(ids) == self.group.world_size
            members = next(g for g in host_groups(ids) if self.group.rank in g)
            arena.host_usable = await self._probe("host_probing", members, deadline)
        return arena.host_usable

    async def _probe(self, slot: str, members: list[int] | None, deadline: float | None) -> bool:
        arena = self.shm
        probing: asyncio.Future[bool] | None = getattr(arena, slot)
        if probing is None:
            # Calls in flight together share one probe; its operation takes its number now,
            # before any of theirs, on every rank alike.
            if deadline is None:
                deadline = self.deadline(None)
            operation = Operation(self.group, "shm probe", "shm probe", deadline)
            probing = asyncio.ensure_future(operation.run(lambda: probe(operation, arena, members)))
            setattr(arena, slot, probing)
        try:
            return await asyncio.shield(probing)
        finally:
            if probing.done() and getattr(arena, slot) is probing:
                setattr(arena, slot, None)  # settled; a failed probe (a lost peer) runs again

    async def prepare(self, deadline: float | None = None) -> None:
        """Probe shared memory where `auto` could use it: every rank on this host (the shm
        allreduce), or several ranks on some of several hosts (the hierarchical one)."""
        if self.one_host:
            await self.shm_usable(deadline)
        elif worth_it(self.host_ids):
            await self.host_shm_usable(deadline)

    def close(self) -> None:
        """Unmap and unlink shared segments, stop the reduce thread."""
        self.shm.close()
        self.compute.close()

    def _context(
        self,
        op: Operation,
        buf: np.ndarray,
        *,
        mean: bool,
        compression: str | None,
        on_slice: OnSlice | None,
        chunkwise: bool = False,
    ) -> ReduceContext:
        wire_itemsize = 2 if compression else buf.itemsize
        return ReduceContext(
            op=op,
            buf=buf,
            compute=self.compute,
            scratch=self.scratch,
            chunk_elems=max(1, self.chunk_bytes // wire_itemsize),
            mean=mean,
            compression=compression,
            on_slice=on_slice,
            chunkwise=chunkwise,
        )

    async def allreduce(
        self,
        arrays: Any,
        *,
        op: str = "sum",
        algorithm: str = "auto",
        compression: str | None = None,
        on_slice: OnSlice | None = None,
        on_chunk: OnSlice | None = None,
        timeout: float | None = None,
        local_copies: bool = True,
    ) -> None:
        """Sum (or average) buffers across ranks, in place.

        `arrays` is one buffer or the K local buffers of this node (model replicas): phase 1
        sums those into the first one before anything touches the network; with
        `local_copies` the result is copied back into the others.

        `on_slice(start, stop, reduced)` runs on each slice's owner before the slice is
        shared. `on_chunk` is the same for elementwise updates (an optimizer step): it may be
        called for consecutive pieces of the owned slice, each as soon as it is reduced, so
        the all-gather of early pieces overlaps the reduction of later ones. Give one of them.
        """
        if on_chunk is not None:
            if on_slice is not None:
                raise ValueError("give on_slice or on_chunk, not both")
            on_slice = on_chunk
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        if algorithm != "auto" and algorithm not in ALGORITHMS and algorithm not in SPECIAL:
            raise ValueError(
                f"algorithm must be 'auto' or one of {sorted([*ALGORITHMS, *SPECIAL])}"
            )
        buffers = _local_buffers(arrays)
        buf = buffers[0]
        if compression is not None and buf.dtype != np.float32:
            raise TypeError(f"{compression} compression needs float32 buffers, got {buf.dtype}")
        n = self.group.world_size
        host_ids = self.host_ids
        # Every argument is checked before anything is touched: a bad call leaves the
        # buffers as they were.
        if algorithm == "shm" and n > 1:
            if not self.one_host:
                raise ValueError("the shm allreduce needs every rank on this host")
            if compression is not None:
                raise ValueError("the shm allreduce sends nothing to compress; use none")
        if compression is not None and algorithm in ("driver", "tree"):
            raise ValueError(f"the {algorithm} baseline sends full precision; use no compression")
        if algorithm == "hierarchical" and n > 1 and (host_ids is None or len(host_ids) != n):
            raise ValueError("the hierarchical allreduce needs every rank's host identity")
        deadline = self.deadline(timeout)
        if len(buffers) > 1:
            kernels.sum_into(buf, buffers)
        if algorithm == "shm" and n > 1:
            if not await self.shm_usable(deadline):
                raise P2PDLError("shared memory is not usable between these ranks")
            chosen = "shm"
        elif algorithm != "auto":  # (a one-rank "shm" call lands here: nothing to share)
            chosen = algorithm
        else:
            # Probe shared memory only where `auto` would use it (the probe is collective:
            # every rank reaches this point with the same size and host identities).
            shared = (
                self.one_host
                and compression is None
                and buf.nbytes * (n - 1) >= SHM_MIN_BYTES
                and await self.shm_usable(deadline)
            )
            chosen = choose_algorithm(buf.nbytes, n, host_ids, shared_memory=shared)
        if buf.size == 0:
            # An empty buffer sends no chunk under the chunked algorithms, so a rank whose
            # size differs from everyone else's would go unnoticed: exchange one empty frame.
            chosen = "direct"
        if chosen == "hierarchical" and n > 1 and self.shm.host_usable is None:
            await self.host_shm_usable(deadline)  # (host identities set after start)
        self.last_algorithm = chosen
        dtype = _DTYPE_NAMES.get(buf.dtype.char) or str(buf.dtype)

        def prepare(algorithm: str) -> tuple[Operation, ReduceContext]:
            descriptor = f"allreduce({algorithm}, {op}, {dtype}[{buf.size}], {compression})"
            operation = Operation(self.group, "allreduce", descriptor, deadline)
            ctx = self._context(
                operation,
                buf,
                mean=op == "mean",
                compression=compression,
                on_slice=on_slice,
                chunkwise=on_chunk is not None,
            )
            return operation, ctx

        operation, ctx = prepare(chosen)
        if n == 1:
            if op == "mean" or compression:
                await allreduce_direct(ctx)
            elif on_slice is not None:
                await ctx.finish_slice(0, buf.size)
        else:
            try:
                await self._run(operation, ctx, chosen)
            except SharedMemoryError as exc:
                # Some rank could not reserve its segment before any rank's buffer changed:
                # every rank gets this error on this call (the abort frame carries it), so
                # all drop shared memory together and redo the call over the network (for
                # `shm`, only under `auto`: an explicit `shm` has no network form).
                if chosen == "shm":
                    self.shm.usable = False
                    if algorithm != "auto":
                        raise
                    redo = choose_algorithm(buf.nbytes, n, host_ids)
                elif chosen == "hierarchical":
                    self.shm.host_usable = False
                    redo = "hierarchical"
                else:
                    raise
                log.warning("%s; this group's allreduces use the network from now on", exc)
                self.last_algorithm = redo
                await self._run(*prepare(redo), redo)
        if local_copies:
            for other in buffers[1:]:
                np.copyto(other, buf)

    async def _run(self, operation: Operation, ctx: ReduceContext, algorithm: str) -> None:
        """Run one network allreduce algorithm under `operation`."""
        if algorithm == "hierarchical":
            host_ids = self.host_ids
            assert host_ids is not None
            await operation.run(lambda: allreduce_hierarchical(ctx, host_ids, self.shm))
        elif algorithm == "shm":
            await operation.run(lambda: allreduce_shm(ctx, self.shm))
        else:
            await operation.run(lambda: ALGORITHMS[algorithm](ctx))

    def resolved(self, nbytes: int, algorithm: str = "auto", compression: str | None = None) -> str:
        """The algorithm an allreduce of `nbytes` would run now, with what has been probed
        (`prepare` probes at start, so this is what the first call runs too)."""
        n = self.group.world_size
        if nbytes == 0 or n == 1:
            return "direct"
        if algorithm != "auto":
            return algorithm
        shared = (
            self.one_host
            and compression is None
            and nbytes * (n - 1) >= SHM_MIN_BYTES
            and bool(self.shm.usable)
        )
        return choose_algorithm(nbytes, n, self.host_ids, shared_memory=shared)

    def owned_range(
        self,
        size: int,
        itemsize: int,
        algorithm: str = "auto",
        compression: str | None = None,
        *,
        rank: int | None = None,
    ) -> tuple[int, int]:
        """The range of an allreduce of `size` elements whose `on_slice`/`on_chunk` runs on
        this rank (or on `rank`): a sharded optimizer keeps state for exactly this range."""
        n = self.group.world_size
        rank = self.group.rank if rank is None else rank
        chosen = self.resolved(size * itemsize, algorithm, compression)
        if chosen == "direct":
            return (0, size)
        if chosen in ("driver", "tree"):
            return (0, size) if rank == 0 else (0, 0)
        if chosen == "hierarchical":
            assert self.host_ids is not None
            leaders = [group[0] for group in host_groups(self.host_ids)]
            if rank not in leaders:
                return (0, 0)
            return plan_slices(size, len(leaders), 1).slices[leaders.index(rank)]
        slices = plan_slices(size, n, 1).slices
        return slices[(rank + 1) % n] if chosen == "ring" else slices[rank]

    # -------------------------------------------------------------- point to point
    async def send(
        self, array: Any, dst: int, *, tag: int = 0, timeout: float | None = None
    ) -> None:
        """Send `array` to rank `dst` (matched in order by `dst`'s `recv` from this rank)."""
        data = _message_bytes(array, writable=False)
        operation = self._message(data, tag, timeout, dst, sending=True)
        await operation.run(lambda: send_bytes(operation, data, dst, self.chunk_bytes))

    async def recv(
        self, array: Any, src: int, *, tag: int = 0, timeout: float | None = None
    ) -> None:
        """Receive the next message of rank `src` into `array` (same size, dtype and tag)."""
        data = _message_bytes(array, writable=True)
        operation = self._message(data, tag, timeout, src, sending=False)
        await operation.run(lambda: recv_bytes(operation, data, src, self.chunk_bytes))

    def _message(
        self, data: np.ndarray, tag: int, timeout: float | None, peer: int, *, sending: bool
    ) -> Operation:
        """The operation of one point-to-point message with `peer` (its own tag range)."""
        descriptor = _p2p_descriptor(data, tag)
        deadline = self.deadline(timeout)
        self._check_peer(peer, "dst" if sending else "src")
        rank = self.group.rank
        if sending:
            base = p2p_base(rank, peer, self.sequences.next_send(peer))
        else:
            base = p2p_base(peer, rank, self.sequences.next_recv(peer))
        name = "send" if sending else "recv"
        return Operation(self.group, name, descriptor, deadline, base=base, peers=[peer])

    def _check_peer(self, peer: object, what: str) -> None:
        n = self.group.world_size
        if isinstance(peer, bool) or not isinstance(peer, int) or not 0 <= peer < n:
            raise ValueError(f"{what} must be a rank in 0..{n - 1}, got {peer!r}")
        if peer == self.group.rank:
            raise ValueError(f"{what} is this rank ({peer}): a rank does not message itself")

    def plan(self, size: int) -> SlicePlan:
        """The slice plan `reduce_scatter` and `allgather` use for `size` elements."""
        return plan_slices(size, self.group.world_size, max(1, self.chunk_bytes // 4))

    async def reduce_scatter(
        self,
        array: Any,
        *,
        op: str = "sum",
        on_slice: OnSlice | None = None,
        timeout: float | None = None,
    ) -> tuple[int, int]:
        """Reduce into this rank's slice only; returns its (start, stop)."""
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        buf = as_flat_array(array)
        plan = self.plan(buf.size)
        descriptor = f"reduce_scatter({op}, {buf.dtype}[{buf.size}])"
        operation = Operation(self.group, "reduce_scatter", descriptor, self.deadline(timeout))
        ctx = self._context(operation, buf, mean=op == "mean", compression=None, on_slice=on_slice)
        if self.group.world_size == 1:
            await ctx.finish_slice(0, buf.size)
        else:
            await operation.run(lambda: reduce_scatter(ctx, plan, then_gather=False))
        return plan.slices[self.group.rank]

    async def allgather(self, array: Any, *, timeout: float | None = None) -> None:
        """Every rank's slice (as `reduce_scatter` assigns them) is copied to every rank."""
        buf = as_flat_array(array)
        if self.group.world_size == 1:
            return
        plan = self.plan(buf.size)
        descriptor = f"allgather({buf.dtype}[{buf.size}])"
        operation = Operation(self.group, "allgather", descriptor, self.deadline(timeout))
        ctx = self._context(operation, buf, mean=False, compression=None, on_slice=None)
        await operation.run(lambda: allgather_slices(ctx, plan))

    async def broadcast(self, array: Any, *, root: int = 0, timeout: float | None = None) -> None:
        """Copy `array` from `root` to every rank, in place."""
        n = self.group.world_size
        if not isinstance(root, int) or not 0 <= root < n:
            raise ValueError(f"root must be a rank in 0..{n - 1}, got {root!r}")
        if isinstance(array, np.ndarray):
            if not array.flags.c_contiguous or not array.flags.writeable:
                raise ValueError("broadcast needs a writable C-contiguous array")
            buf = array
        else:
            buf = as_flat_array(array)
        if n == 1:
            return
        descriptor = f"broadcast(root {root}, {buf.dtype}[{buf.size}])"
        operation = Operation(self.group, "broadcast", descriptor, self.deadline(timeout))
        elems = max(1, self.chunk_bytes // 4)
        await operation.run(lambda: broadcast(operation, buf, root, elems))

    async def barrier(self, *, timeout: float | None = None) -> None:
        """Return once every rank has called `barrier`."""
        if self.group.world_size == 1:
            return
        operation = Operation(self.group, "barrier", "barrier", self.deadline(timeout))
        await operation.run(lambda: barrier(operation))

"""The collective entry points: argument checks, phase 1 (local sum), algorithm choice.

`choose_algorithm` is the documented "auto" policy (measured on loopback, 2 cores; see
docs/benchmarks.md): one-hop `direct` exchange while latency dominates, BigDL's `sliced`
all-to-all above that. `ring` is kept for link-bound networks, where it is chosen explicitly.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from p2pdl import kernels
from p2pdl.collectives.alltoall import check_splits, pair_labels, plan_alltoall
from p2pdl.collectives.baselines import allreduce_driver, allreduce_tree
from p2pdl.collectives.compute import Compute, ScratchPool
from p2pdl.collectives.context import OnSlice, ReduceContext, gather_all
from p2pdl.collectives.dtypes import (
    REDUCE_OPS,
    Bf16Words,
    Buffer,
    as_buffer,
    check_reduction,
    reduce_sources,
    scale_buffer,
)
from p2pdl.collectives.exchange import EMPTY, HELLO_SUB, move, reduce_from, with_verdicts
from p2pdl.collectives.groups import GroupKey, GroupRegistry, SubGroup, check_ranks
from p2pdl.collectives.hierarchical import allreduce_hierarchical, host_groups, worth_it
from p2pdl.collectives.inline import DONE as INLINE_DONE
from p2pdl.collectives.inline import Finish, OnLoop, start_inline
from p2pdl.collectives.op import SUB_BITS, Group, Operation
from p2pdl.collectives.p2p import Sequences, p2p_base, recv_bytes, send_bytes
from p2pdl.collectives.plan import SlicePlan, owner_slices, plan_slices
from p2pdl.collectives.ring import allreduce_ring
from p2pdl.collectives.shm import ShmArena, allreduce_shm, probe
from p2pdl.collectives.sliced import allgather_slices, allreduce_sliced, reduce_scatter
from p2pdl.collectives.small import allreduce_direct, barrier, broadcast
from p2pdl.config import DEFAULT_CHUNK_BYTES
from p2pdl.errors import CollectiveTimeoutError, P2PDLError, PeerLostError, SharedMemoryError

log = logging.getLogger("p2pdl.collectives")

ALGORITHMS = {
    "direct": allreduce_direct,
    "sliced": allreduce_sliced,
    "ring": allreduce_ring,
    "driver": allreduce_driver,
    "tree": allreduce_tree,
}
OPS = REDUCE_OPS
COMPRESSIONS = (None, "bf16", "fp16")
DIRECT_MAX_BYTES = 512 * 1024
"""`direct` while each rank sends at most 2 × this (nbytes · (world_size − 1) ≤ 1 MiB)."""
SHM_MIN_BYTES = 1
"""`auto` takes the shared-memory path when every rank is on one host and
nbytes · (world_size − 1) is at least this: every non-empty buffer. Since ranks synchronise
through control blocks instead of TCP frames, shm is faster than one-hop `direct` at every
size measured from 8 bytes, at n = 2 and n = 4 (see `choose_algorithm`)."""
SPECIAL = ("hierarchical", "shm")
"""Algorithms that need more than the context: host identities, shared segments."""


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

    `shm` against `direct` (loopback, 2 cores, `bench allreduce --sizes 8,4K,64K
    --algorithms shm,direct`, the slowest rank's median): since small shm calls run inline
    (no operation set-up, ranks ringing only sleepers) shm is 3x ahead at every size, n=2
    0.036-0.048 vs 0.112-0.164 ms from 8 bytes to 64 KiB, n=4 0.39-0.41 vs 1.16-1.43 ms. (The
    round before, with TCP-framed waits: n=2 0.10-0.16 vs 0.14-0.24 ms at 8 bytes-4 KiB, n=4
    level to 12 KiB.) shm for every non-empty buffer.

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


def _p2p_descriptor(data: np.ndarray, tag: object) -> str:
    if isinstance(tag, bool) or not isinstance(tag, int) or not 0 <= tag < 2**31:
        raise ValueError(f"tag must be an integer in 0..2**31-1, got {tag!r}")
    return f"p2p(tag {tag}, {data.nbytes} bytes)"


def _local_buffers(arrays: Any) -> list[Buffer]:
    """The K local buffers of one allreduce (one buffer, or a list of alike ones)."""
    if isinstance(arrays, Sequence) and not isinstance(arrays, np.ndarray):
        if not arrays:
            raise ValueError("allreduce needs at least one buffer")
        flats = [as_buffer(a, f"buffer {i}") for i, a in enumerate(arrays)]
        first = flats[0]
        for i, flat in enumerate(flats[1:], start=1):
            if flat.kind != first.kind or flat.size != first.size:
                raise ValueError(
                    f"local buffer {i} is {flat.signature}, buffer 0 is {first.signature}"
                )
        return flats
    return [as_buffer(arrays)]


def _buffers(arrays: Any, what: str, *, writable: bool) -> list[Buffer]:
    """A list (or tuple) of buffers of one element type, as `Buffer`s."""
    if isinstance(arrays, (np.ndarray, str, bytes)) or not isinstance(arrays, Sequence):
        raise TypeError(f"{what} must be a list of buffers, got {type(arrays).__name__}")
    out = [as_buffer(a, f"{what}[{i}]", writable=writable) for i, a in enumerate(arrays)]
    return out


def _same_kind(buffers: Sequence[Buffer], kind: str, what: str) -> None:
    for i, buf in enumerate(buffers):
        if buf.kind != kind:
            raise TypeError(f"{what}[{i}] is {buf.kind}, the call reduces or moves {kind}")


def _no_overlap(a: np.ndarray, b: np.ndarray, what: str, *, but: np.ndarray | None = None) -> None:
    """ValueError if `a` and `b` share memory, unless `b` is exactly `but` (in place)."""
    if not (a.size and b.size and np.may_share_memory(a, b)):
        return
    if but is not None and _same_memory(b, but):
        return
    raise ValueError(f"{what}: the output must not share memory with the input")


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.nbytes == b.nbytes
    )


def _digest(values: Sequence[object]) -> str:
    """A short, stable name for a long list (sizes of many buffers) in a descriptor."""
    text = ",".join(map(str, values))
    if len(text) <= 64:
        return f"[{text}]"
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def allreduce_descriptor(
    name: str, algorithm: str, op: str, scaled: str, buffer: str, compression: str | None
) -> str:
    """What an allreduce's frames and control blocks name (ranks must agree on all of it)."""
    return f"{name}({algorithm}, {op}{scaled}, {buffer}, {compression})"


def check_timeout(timeout: float | None, default: float) -> float:
    """`timeout` in seconds (`None`: `default`); ValueError unless a number >= 0."""
    if timeout is None:
        timeout = default
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise ValueError(f"timeout must be a number >= 0 or None, got {timeout!r}")
    return float(timeout)


def deadline_of(timeout: float | None, default: float) -> float:
    """The loop-time deadline of one call: `timeout` seconds from now (`None`: `default`).

    `timeout=0` means zero: the call fails unless it needs no waiting at all."""
    return asyncio.get_running_loop().time() + check_timeout(timeout, default)


def deadline_timeout(deadline: float) -> float:
    """How long a call with this loop-time deadline was given, as of now (for messages)."""
    return max(0.0, deadline - asyncio.get_running_loop().time())


def _ignore(_error: P2PDLError) -> None:
    """A watch drops nothing and reports nothing: the receive that follows checks frames."""


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
        self.registry = GroupRegistry()
        """How many subgroups of each rank list this (world) group has made."""
        self.world = self
        """The world group's collectives (itself, unless this is a subgroup's)."""
        self.label = ""
        """What this group's descriptors end with ("" for the world group)."""
        self.inline_calls = {"compiled": 0, "finished": 0, "handed_off": 0}
        """Allreduces run where they were called (`inline`): how many the compiled small
        call finished, how many finished in the Python steps, how many were handed to the
        loop to finish."""
        self._unretired: tuple[int, int] | None = None
        self.inline_shapes: dict[tuple[Any, ...], tuple[Any, ...] | None] = {}
        """What `inline` keeps per call shape (descriptor, timeout, peers; None: never
        inline)."""
        self._barrier_word = np.zeros(1, np.float64)
        """What a barrier through shared memory reduces (its value means nothing)."""
        """Tags of operations that ran off the loop, retired with the next one on it."""

    @property
    def rank(self) -> int:
        """This rank's index in the group."""
        return self.group.rank

    @property
    def world_size(self) -> int:
        return self.group.world_size

    # ------------------------------------------------------------------- subgroups
    def subgroup(self, ranks: Sequence[int]) -> Collectives | OutsideGroup:
        """Collectives over `ranks` (ranks of this group, in the subgroup's rank order).

        Every member creates it (in the same order as its other subgroups of these ranks);
        a non-member may too, and gets an object whose collectives raise ValueError. The
        subgroup uses this group's links in its own tags (see `groups`), no shared memory.
        """
        local = check_ranks(ranks, self.group.world_size)
        members = getattr(self.group, "members", None)
        global_ranks = tuple(members[r] for r in local) if members is not None else local
        key = self.world.registry.key(global_ranks)
        if self.group.rank not in local:
            return OutsideGroup(key, self.group.rank)
        world = self.world
        sub = Collectives(
            SubGroup(world.group, key),
            timeout=world.timeout,
            chunk_bytes=world.chunk_bytes,
            compute=world.compute,
        )
        sub.scratch = world.scratch
        sub.world = world
        sub.label = f" on {key.label}"
        return sub

    def _operation(self, name: str, descriptor: str, deadline: float, **kwargs: Any) -> Operation:
        """An operation of this group (its descriptor names the group)."""
        self.flush_retired()
        return Operation(self.group, name, descriptor + self.label, deadline, **kwargs)

    def retire_later(self, base: int) -> None:
        """Retire operation `base`'s tags with the next operation made on the loop: it ran
        off the loop (`inline`), exchanged no frames, and a late abort frame for it is dropped
        then. Consecutive operations make one range."""
        span = (base, base + (1 << SUB_BITS))
        pending = self._unretired
        if pending is not None and pending[1] == base:
            self._unretired = (pending[0], span[1])
        else:
            self.flush_retired()
            self._unretired = span

    def flush_retired(self) -> None:
        """Retire what `retire_later` kept (on the loop)."""
        pending = self._unretired
        if pending is not None:
            self._unretired = None
            for peer in range(self.group.world_size):
                if peer != self.group.rank:
                    self.group.link(peer).retire(*pending)

    def allreduce_inline(
        self,
        array: Any,
        op: str,
        algorithm: str,
        timeout: float | None,
        loop_time: Callable[[], float],
        on_loop: OnLoop,
    ) -> str | Finish | None:
        """The blocking facade's allreduce on the calling thread (see `inline`): `DONE`, a
        coroutine function to finish it on the loop, or None (not taken, nothing touched).
        Only while nothing runs on the loop. (Positional: it is on every small call's path.)"""
        return start_inline(
            self,
            array,
            op=op,
            algorithm=algorithm,
            timeout=timeout,
            loop_time=loop_time,
            on_loop=on_loop,
            patient=True,
        )

    async def _inline(
        self,
        array: Any,
        op: str,
        algorithm: str,
        timeout: float | None,
        name: str,
        on_slice: OnSlice | None = None,
        on_chunk: OnSlice | None = None,
    ) -> bool:
        """`start_inline` on the loop thread, awaiting what is left; False if not taken."""
        loop = asyncio.get_running_loop()
        taken = start_inline(
            self,
            array,
            op=op,
            algorithm=algorithm,
            timeout=timeout,
            loop_time=loop.time,
            on_loop=loop.call_soon,
            name=name,
            on_slice=on_slice,
            chunkwise=on_chunk is not None,
        )
        if taken is None:
            return False
        if taken != INLINE_DONE:
            await taken()
        return True

    def barrier_inline(
        self, timeout: float | None, loop_time: Callable[[], float], on_loop: OnLoop
    ) -> str | Finish | None:
        """The blocking facade's barrier on the calling thread, as `allreduce_inline`."""
        if self.shm.usable is not True:
            return None
        return start_inline(
            self,
            self._barrier_word,
            op="sum",
            algorithm="shm",
            timeout=timeout,
            loop_time=loop_time,
            on_loop=on_loop,
            name="barrier",
            patient=True,
        )

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
        """Unmap and unlink shared segments, stop the reduce thread (the world group's)."""
        self.shm.close()
        if self.world is self:
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
        reduce_op: str = "sum",
        kind: str = "",
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
            reduce_op="sum" if reduce_op == "mean" else reduce_op,
            kind=kind,
        )

    async def allreduce(
        self,
        arrays: Any,
        *,
        op: str = "sum",
        premul: float | None = None,
        algorithm: str = "auto",
        compression: str | None = None,
        on_slice: OnSlice | None = None,
        on_chunk: OnSlice | None = None,
        timeout: float | None = None,
        local_copies: bool = True,
    ) -> None:
        """Reduce buffers across ranks, in place: op "sum", "mean" (or "avg"), "min", "max"
        or "prod", for float16/bfloat16/float32/float64, int8/uint8/int16/int32/int64 and
        bool (mean: floats only); `premul` multiplies each rank's input first (a sum).

        `arrays` is one buffer or the K local buffers of this node (model replicas): phase 1
        sums those into the first one before anything touches the network; with
        `local_copies` the result is copied back into the others.

        `on_slice(start, stop, reduced)` runs on each slice's owner before the slice is
        shared. `on_chunk` is the same for elementwise updates (an optimizer step): it may be
        called for consecutive pieces of the owned slice, each as soon as it is reduced, so
        the all-gather of early pieces overlaps the reduction of later ones. Give one of them.
        """
        # A plain small sum through shared memory: its steps run here and now while the
        # peers keep up, and only what must wait is awaited (see `inline`).
        if (
            self.shm.usable is True
            and premul is None
            and compression is None
            and (on_slice is None or on_chunk is None)
            and await self._inline(
                arrays, op, algorithm, timeout, "allreduce", on_slice or on_chunk, on_chunk
            )
        ):
            return
        await self._allreduce(
            arrays,
            op=op,
            premul=premul,
            algorithm=algorithm,
            compression=compression,
            on_slice=on_slice,
            on_chunk=on_chunk,
            timeout=timeout,
            local_copies=local_copies,
        )

    async def _allreduce(
        self,
        arrays: Any,
        *,
        op: str,
        premul: float | None,
        algorithm: str,
        compression: str | None,
        on_slice: OnSlice | None,
        on_chunk: OnSlice | None,
        timeout: float | None,
        local_copies: bool,
        name: str = "allreduce",
        detail: str = "",
    ) -> None:
        if on_chunk is not None:
            if on_slice is not None:
                raise ValueError("give on_slice or on_chunk, not both")
            on_slice = on_chunk
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        if algorithm != "auto" and algorithm not in ALGORITHMS and algorithm not in SPECIAL:
            raise ValueError(
                f"algorithm must be 'auto' or one of {sorted([*ALGORITHMS, *SPECIAL])}"
            )
        locals_ = _local_buffers(arrays)
        kind = locals_[0].kind
        op = check_reduction(kind, op, premul, compression)
        buffers = [b.array for b in locals_]
        buf = buffers[0]
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
            if kind in ("float32", "float64"):
                kernels.sum_into(buf, buffers)
            else:
                await self._local_reduce(buf, buffers, "sum" if op == "mean" else op, kind)
        if premul is not None:
            scale_buffer(buf, kind, float(premul))
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
        scaled = "" if premul is None else f", premul {float(premul)!r}"

        def prepare(algorithm: str) -> tuple[Operation, ReduceContext]:
            descriptor = allreduce_descriptor(
                name, algorithm, op, scaled, f"{kind}[{buf.size}]{detail}", compression
            )
            operation = self._operation(name, descriptor, deadline)
            ctx = self._context(
                operation,
                buf,
                mean=op == "mean",
                compression=compression,
                on_slice=on_slice,
                chunkwise=on_chunk is not None,
                reduce_op=op,
                kind=kind,
            )
            return operation, ctx

        operation, ctx = prepare(chosen)
        if n == 1:
            if compression:
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

    async def _local_reduce(
        self, dst: np.ndarray, sources: list[np.ndarray], op: str, kind: str
    ) -> None:
        """Phase 1 for the dtypes and ops `sum_into` does not cover."""
        nbytes = dst.nbytes * len(sources)
        await self.compute.run(nbytes, lambda: reduce_sources(dst, sources, op, kind, None))

    async def _run(self, operation: Operation, ctx: ReduceContext, algorithm: str) -> None:
        """Run one network allreduce algorithm under `operation`."""
        if algorithm == "hierarchical":
            host_ids = self.host_ids
            assert host_ids is not None
            await operation.run(lambda: allreduce_hierarchical(ctx, host_ids, self.shm))
        elif algorithm == "shm":
            await operation.run(lambda: allreduce_shm(ctx, self.shm), lazy=True)
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
            return owner_slices(size, len(leaders))[leaders.index(rank)]
        slices = owner_slices(size, n)
        return slices[(rank + 1) % n] if chosen == "ring" else slices[rank]

    # -------------------------------------------------------------- point to point
    async def send(
        self, array: Any, dst: int, *, tag: int = 0, timeout: float | None = None
    ) -> None:
        """Send `array` to rank `dst` (matched in order by `dst`'s `recv` from this rank)."""
        data = as_buffer(array, "the message", writable=False).bytes()
        operation = self._message(data, tag, timeout, dst, sending=True)
        await operation.run(lambda: send_bytes(operation, data, dst, self.chunk_bytes))

    async def recv(
        self, array: Any, src: int, *, tag: int = 0, timeout: float | None = None
    ) -> None:
        """Receive the next message of rank `src` into `array` (same size, dtype and tag)."""
        data = as_buffer(array, "the receive buffer").bytes()
        operation = self._message(data, tag, timeout, src, sending=False)
        await operation.run(lambda: recv_bytes(operation, data, src, self.chunk_bytes))

    async def recv_any(self, array: Any, *, tag: int = 0, timeout: float | None = None) -> int:
        """Receive into `array` the next message of whichever rank's arrives first among
        those with this tag, size and dtype; returns that rank (MPI's any-source receive).

        Each peer's messages are still taken in its order: a peer's next message is watched
        (as its first frame arrives, before any receive is posted for it); the first that
        matches is then received as `recv(array, src)` would, under the same deadline.
        Another message that a peer sends first (another tag or size) keeps that peer out.
        """
        data = as_buffer(array, "the receive buffer").bytes()
        descriptor = _p2p_descriptor(data, tag)
        deadline = self.deadline(timeout)
        given = deadline_timeout(deadline)
        rank, n = self.group.rank, self.group.world_size
        peers = [p for p in range(n) if p != rank]
        if not peers:
            raise ValueError("a receive from any rank needs another rank in the group")
        tags = getattr(self.group, "tags", None)
        base_of = p2p_base if tags is None else tags.p2p_base
        first: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        watches = []
        for peer in peers:
            link = self.group.link(peer)
            if link.lost is not None:
                continue
            base = base_of(peer, rank, self.sequences.peek_recv(peer))

            def seen(header: dict[str, Any], _size: int, peer: int = peer) -> None:
                if header.get("d") == descriptor and not first.done():
                    first.set_result(peer)

            link.guard(base, base + (1 << SUB_BITS), seen, _ignore)
            watches.append((link, seen))
        try:
            if not watches:
                raise PeerLostError(peers, "every other rank has left", operation="recv")
            try:
                async with asyncio.timeout_at(deadline):
                    src = await first
            except TimeoutError:
                raise CollectiveTimeoutError("recv", given, peers, detail="from any rank") from None
        finally:
            for link, seen in watches:
                link.unguard(seen)
        left = max(0.0, deadline - asyncio.get_running_loop().time())
        await self.recv(array, src, tag=tag, timeout=left)
        return src

    def _message(
        self, data: np.ndarray, tag: int, timeout: float | None, peer: int, *, sending: bool
    ) -> Operation:
        """The operation of one point-to-point message with `peer` (its own tag range)."""
        descriptor = _p2p_descriptor(data, tag)
        deadline = self.deadline(timeout)
        self._check_peer(peer, "dst" if sending else "src")
        rank = self.group.rank
        tags = getattr(self.group, "tags", None)
        base_of = p2p_base if tags is None else tags.p2p_base
        if sending:
            base = base_of(rank, peer, self.sequences.next_send(peer))
        else:
            base = base_of(peer, rank, self.sequences.next_recv(peer))
        name = "send" if sending else "recv"
        return self._operation(name, descriptor, deadline, base=base, peers=[peer])

    def _check_peer(self, peer: object, what: str) -> None:
        n = self.group.world_size
        if isinstance(peer, bool) or not isinstance(peer, int) or not 0 <= peer < n:
            raise ValueError(f"{what} must be a rank in 0..{n - 1}, got {peer!r}")
        if peer == self.group.rank:
            raise ValueError(f"{what} is this rank ({peer}): a rank does not message itself")

    def _check_root(self, root: object) -> int:
        n = self.group.world_size
        if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < n:
            raise ValueError(f"root must be a rank in 0..{n - 1}, got {root!r}")
        return root

    # ------------------------------------------------------------- sliced in place
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
        """Reduce into this rank's slice of `array` only (in place); returns its (start, stop)."""
        buf = as_buffer(array)
        op = check_reduction(buf.kind, op)
        plan = self.plan(buf.size)
        descriptor = f"reduce_scatter({op}, {buf.signature})"
        operation = self._operation("reduce_scatter", descriptor, self.deadline(timeout))
        ctx = self._context(
            operation,
            buf.array,
            mean=op == "mean",
            compression=None,
            on_slice=on_slice,
            reduce_op=op,
            kind=buf.kind,
        )
        if self.group.world_size == 1:
            await ctx.finish_slice(0, buf.size)
        else:
            await operation.run(lambda: reduce_scatter(ctx, plan, then_gather=False))
        return plan.slices[self.group.rank]

    async def allgather(self, array: Any, *, timeout: float | None = None) -> None:
        """Every rank's slice (as `reduce_scatter` assigns them) is copied to every rank."""
        buf = as_buffer(array)
        if self.group.world_size == 1:
            return
        plan = self.plan(buf.size)
        descriptor = f"allgather({buf.signature})"
        operation = self._operation("allgather", descriptor, self.deadline(timeout))
        ctx = self._context(operation, buf.array, mean=False, compression=None, on_slice=None)
        await operation.run(lambda: allgather_slices(ctx, plan))

    # --------------------------------------------------------------------- rooted
    async def broadcast(self, array: Any, *, root: int = 0, timeout: float | None = None) -> None:
        """Copy `array` from `root` to every rank, in place (any element type)."""
        root = self._check_root(root)
        buf = as_buffer(array, "the broadcast buffer")
        if self.group.world_size == 1:
            return
        descriptor = f"broadcast(root {root}, {buf.signature})"
        operation = self._operation("broadcast", descriptor, self.deadline(timeout))
        elems = max(1, self.chunk_bytes // 4)
        await operation.run(lambda: broadcast(operation, buf.array, root, elems))

    async def reduce(
        self,
        array: Any,
        *,
        root: int = 0,
        op: str = "sum",
        premul: float | None = None,
        timeout: float | None = None,
    ) -> None:
        """Reduce every rank's `array` into root's `array`; the others' stay unchanged."""
        root = self._check_root(root)
        buf = as_buffer(array)
        op = check_reduction(buf.kind, op, premul)
        scaled = "" if premul is None else f", premul {float(premul)!r}"
        descriptor = f"reduce(root {root}, {op}{scaled}, {buf.signature})"
        operation = self._operation("reduce", descriptor, self.deadline(timeout))
        rank, n = self.group.rank, self.group.world_size
        ctx = self._reduction(operation, buf, op)
        others = [p for p in range(n) if p != rank]
        mine = buf.array
        if premul is not None:
            if rank != root:
                mine = mine.copy()  # the contribution is scaled; the caller's buffer is not
            scale_buffer(mine, buf.kind, float(premul))
        if n == 1:
            return
        hellos = {p: EMPTY for p in others} if rank == root else {}
        landing = {} if rank == root else {root: np.empty(0, np.uint8)}

        async def body() -> None:
            await gather_all(
                reduce_from(
                    ctx,
                    sends={} if rank == root else {root: mine},
                    sources=others if rank == root else [],
                    own=mine if rank == root else None,
                    output=mine if rank == root else None,
                ),
                move(operation, hellos, landing, self.chunk_bytes, sub=HELLO_SUB),
            )

        await operation.run(lambda: self._rooted(operation, body(), root))

    def _reduction(self, operation: Operation, buf: Buffer, op: str) -> ReduceContext:
        return self._context(
            operation,
            buf.array,
            mean=op == "mean",
            compression=None,
            on_slice=None,
            reduce_op=op,
            kind=buf.kind,
        )

    async def gather(
        self,
        input: Any,
        outputs: Sequence[Any] | None = None,
        *,
        root: int = 0,
        timeout: float | None = None,
    ) -> None:
        """On `root`, outputs[i] receives rank i's `input` (sizes may differ per rank);
        the other ranks pass no outputs."""
        root = self._check_root(root)
        rank, n = self.group.rank, self.group.world_size
        src = as_buffer(input, "input", writable=False)
        if rank == root:
            if outputs is None:
                raise ValueError("the root of a gather needs outputs (one buffer per rank)")
            outs = self._per_rank(outputs, "outputs", src.kind, writable=True)
            self._own_part(outs[rank], src, "outputs")
            sizes = [o.size for o in outs]
        elif outputs is not None:
            raise ValueError(f"only the root (rank {root}) of a gather takes outputs")
        else:
            sizes = [src.size if p == rank else 0 for p in range(n)]
        pairs = {
            p: f"gather(root {root}, {src.kind}, rank {p if rank == root else rank} sends "
            f"{sizes[p] if rank == root else src.size})"
            for p in range(n)
            if p != rank and (rank == root or p == root)
        }
        operation = self._operation(
            "gather",
            f"gather(root {root}, {src.kind})",
            self.deadline(timeout),
            pair_descriptors=pairs,
        )
        if rank == root:
            np.copyto(outs[rank].array, src.array)
        if n == 1:
            return
        peers = list(pairs)
        if rank == root:
            recvs = {p: outs[p].bytes() for p in peers}
            sends = {p: EMPTY for p in peers}
        else:
            recvs = {root: np.empty(0, np.uint8)}
            sends = {root: src.bytes()}
        work = move(operation, sends, recvs, self.chunk_bytes)
        await operation.run(lambda: self._rooted(operation, work, root))

    async def scatter(
        self,
        output: Any,
        inputs: Sequence[Any] | None = None,
        *,
        root: int = 0,
        timeout: float | None = None,
    ) -> None:
        """Root's inputs[i] lands in rank i's `output` (sizes may differ per rank); the
        other ranks pass no inputs."""
        root = self._check_root(root)
        rank, n = self.group.rank, self.group.world_size
        out = as_buffer(output, "output")
        if rank == root:
            if inputs is None:
                raise ValueError("the root of a scatter needs inputs (one buffer per rank)")
            ins = self._per_rank(inputs, "inputs", out.kind, writable=False)
            self._own_part(out, ins[rank], "inputs")
            sizes = [i.size for i in ins]
        elif inputs is not None:
            raise ValueError(f"only the root (rank {root}) of a scatter takes inputs")
        pairs = {
            p: f"scatter(root {root}, {out.kind}, rank {p if rank == root else rank} gets "
            f"{sizes[p] if rank == root else out.size})"
            for p in range(n)
            if p != rank and (rank == root or p == root)
        }
        operation = self._operation(
            "scatter",
            f"scatter(root {root}, {out.kind})",
            self.deadline(timeout),
            pair_descriptors=pairs,
        )
        if rank == root:
            np.copyto(out.array, ins[rank].array)
        if n == 1:
            return
        peers = list(pairs)
        if rank == root:
            sends = {p: ins[p].bytes() for p in peers}
            recvs = {p: np.empty(0, np.uint8) for p in peers}
        else:
            sends = {root: EMPTY}
            recvs = {root: out.bytes()}
        work = move(operation, sends, recvs, self.chunk_bytes)
        await operation.run(lambda: self._rooted(operation, work, root))

    def _rooted(self, operation: Operation, work: Awaitable[None], root: int) -> Awaitable[None]:
        """`work`, then the root's verdict to every other rank (which waits for it)."""
        if self.group.rank == root:
            others = [p for p in range(self.group.world_size) if p != root]
            return with_verdicts(operation, work, to=others, awaited=())
        return with_verdicts(operation, work, to=(), awaited=(root,))

    def _per_rank(
        self, buffers: Sequence[Any], what: str, kind: str, *, writable: bool
    ) -> list[Buffer]:
        """One buffer per rank of this group, all of element type `kind`."""
        out = _buffers(buffers, what, writable=writable)
        if len(out) != self.group.world_size:
            raise ValueError(f"{what} has {len(out)} buffers for {self.group.world_size} ranks")
        _same_kind(out, kind, what)
        return out

    def _own_part(self, mine: Buffer, other: Buffer, what: str) -> None:
        if mine.size != other.size:
            raise ValueError(
                f"{what}[{self.group.rank}] (this rank's own part) holds {other.size} "
                f"elements, the buffer it pairs with {mine.size}"
            )

    # ---------------------------------------------------------------- all-to-all
    async def allgather_into(
        self, output: Any, input: Any, *, timeout: float | None = None
    ) -> None:
        """Rank i's `input` lands at output[i*m:(i+1)*m] on every rank (m = input.size)."""
        src = as_buffer(input, "input", writable=False)
        out = as_buffer(output, "output")
        n, m = self.group.world_size, src.size
        if out.kind != src.kind:
            raise TypeError(f"output is {out.kind}, input is {src.kind}")
        if out.size != n * m:
            raise ValueError(f"output holds {out.size} elements, not {n} x {m}")
        parts = [out.array[r * m : (r + 1) * m] for r in range(n)]
        _no_overlap(out.array, src.array, "allgather_into", but=parts[self.group.rank])
        await self._allgather(
            f"allgather_into({src.signature} x {n})",
            src,
            [Buffer(p, out.kind) for p in parts],
            timeout,
        )

    async def allgather_list(
        self, outputs: Sequence[Any], input: Any, *, timeout: float | None = None
    ) -> None:
        """outputs[i] receives rank i's `input` on every rank (sizes may differ per rank)."""
        src = as_buffer(input, "input", writable=False)
        outs = self._per_rank(outputs, "outputs", src.kind, writable=True)
        self._own_part(outs[self.group.rank], src, "outputs")
        sizes = _digest([o.size for o in outs])
        await self._allgather(f"allgather_list({src.kind}, sizes {sizes})", src, outs, timeout)

    async def _allgather(
        self, descriptor: str, src: Buffer, outs: list[Buffer], timeout: float | None
    ) -> None:
        rank = self.group.rank
        operation = self._operation("allgather", descriptor, self.deadline(timeout))
        if outs[rank].array is not src.array:
            np.copyto(outs[rank].array, src.array)
        if self.group.world_size == 1:
            return
        peers = [p for p in range(self.group.world_size) if p != rank]
        sends = {p: src.bytes() for p in peers}
        recvs = {p: outs[p].bytes() for p in peers}
        await operation.run(lambda: move(operation, sends, recvs, self.chunk_bytes))

    async def reduce_scatter_into(
        self,
        output: Any,
        input: Any,
        *,
        op: str = "sum",
        premul: float | None = None,
        timeout: float | None = None,
    ) -> None:
        """`output` gets the reduction of every rank's input[rank*m:(rank+1)*m] (m =
        output.size; input.size = world_size * m); the input is left unchanged."""
        src = as_buffer(input, "input", writable=False)
        out = as_buffer(output, "output")
        n, m = self.group.world_size, out.size
        if out.kind != src.kind:
            raise TypeError(f"output is {out.kind}, input is {src.kind}")
        if src.size != n * m:
            raise ValueError(f"input holds {src.size} elements, not {n} x {m}")
        parts = [Buffer(src.array[r * m : (r + 1) * m], src.kind) for r in range(n)]
        await self._reduce_scatter(
            f"reduce_scatter_into({src.kind}[{m}] x {n}", out, parts, op, premul, timeout
        )

    async def reduce_scatter_list(
        self,
        output: Any,
        inputs: Sequence[Any],
        *,
        op: str = "sum",
        premul: float | None = None,
        timeout: float | None = None,
    ) -> None:
        """`output` gets the reduction of every rank's inputs[rank] (inputs[i] is this
        rank's part for rank i; sizes may differ per rank, output.size == inputs[rank].size)."""
        out = as_buffer(output, "output")
        parts = self._per_rank(inputs, "inputs", out.kind, writable=False)
        self._own_part(out, parts[self.group.rank], "inputs")
        sizes = _digest([p.size for p in parts])
        await self._reduce_scatter(
            f"reduce_scatter_list({out.kind}, sizes {sizes}", out, parts, op, premul, timeout
        )

    async def _reduce_scatter(
        self,
        head: str,
        out: Buffer,
        parts: list[Buffer],
        op: str,
        premul: float | None,
        timeout: float | None,
    ) -> None:
        op = check_reduction(out.kind, op, premul)
        for part in parts:
            _no_overlap(part.array, out.array, "reduce_scatter", but=parts[self.group.rank].array)
        scaled = "" if premul is None else f", premul {float(premul)!r}"
        descriptor = f"{head}, {op}{scaled})"
        operation = self._operation("reduce_scatter", descriptor, self.deadline(timeout))
        arrays = [p.array for p in parts]
        if premul is not None:  # scaled copies: the caller's inputs stay as they were
            arrays = [a.copy() for a in arrays]
            for a in arrays:
                scale_buffer(a, out.kind, float(premul))
        rank, n = self.group.rank, self.group.world_size
        ctx = self._reduction(operation, out, op)
        peers = [p for p in range(n) if p != rank]

        def body() -> Any:
            return reduce_from(
                ctx,
                sends={p: arrays[p] for p in peers},
                sources=peers,
                own=arrays[rank],
                output=out.array,
            )

        if n == 1:
            await body()
        else:
            await operation.run(body)

    async def alltoall(
        self,
        output: Any,
        input: Any,
        *,
        output_splits: Sequence[int] | None = None,
        input_splits: Sequence[int] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Part j of `input` (by `input_splits`, in elements; None: equal parts) goes to rank
        j, where it lands at part `rank` of its `output` (by its `output_splits`)."""
        src = as_buffer(input, "input", writable=False)
        out = as_buffer(output, "output")
        n = self.group.world_size
        if out.kind != src.kind:
            raise TypeError(f"output is {out.kind}, input is {src.kind}")
        _no_overlap(out.array, src.array, "alltoall")
        ins = check_splits(input_splits, src.size, n, "input")
        outs = check_splits(output_splits, out.size, n, "output")
        plan = plan_alltoall(ins, outs)
        sends = [Buffer(src.array[a:b], src.kind) for a, b in plan.send]
        recvs = [Buffer(out.array[a:b], out.kind) for a, b in plan.recv]
        await self._alltoall("alltoall", src.kind, recvs, sends, timeout)

    async def alltoall_list(
        self, outputs: Sequence[Any], inputs: Sequence[Any], *, timeout: float | None = None
    ) -> None:
        """inputs[j] goes to rank j, where it lands in outputs[rank]."""
        ins = _buffers(inputs, "inputs", writable=False)
        if not ins:
            raise ValueError("alltoall_list needs one input per rank")
        kind = ins[0].kind
        ins = self._per_rank(inputs, "inputs", kind, writable=False)
        outs = self._per_rank(outputs, "outputs", kind, writable=True)
        for o in outs:
            for i in ins:
                _no_overlap(o.array, i.array, "alltoall_list")
        await self._alltoall("alltoall_list", kind, outs, ins, timeout)

    async def _alltoall(
        self,
        name: str,
        kind: str,
        outs: list[Buffer],
        ins: list[Buffer],
        timeout: float | None,
    ) -> None:
        rank = self.group.rank
        self._own_part(outs[rank], ins[rank], "the split")
        pairs = pair_labels(f"{name}[{kind}]", rank, [b.size for b in ins], [b.size for b in outs])
        operation = self._operation(
            name, f"{name}({kind})", self.deadline(timeout), pair_descriptors=pairs
        )
        np.copyto(outs[rank].array, ins[rank].array)
        if self.group.world_size == 1:
            return
        sends = {p: ins[p].bytes() for p in pairs}
        recvs = {p: outs[p].bytes() for p in pairs}
        peers = list(pairs)
        work = move(operation, sends, recvs, self.chunk_bytes)
        await operation.run(lambda: with_verdicts(operation, work, to=peers, awaited=peers))

    # ----------------------------------------------------------------- coalesced
    async def allreduce_coalesced(
        self,
        arrays: Sequence[Any],
        *,
        op: str = "sum",
        premul: float | None = None,
        algorithm: str = "auto",
        compression: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Reduce several buffers of one element type (any sizes) in one call, in place:
        they are packed into one scratch buffer, reduced as one, and copied back."""
        bufs = _buffers(arrays, "arrays", writable=True)
        if not bufs:
            return
        kind = bufs[0].kind
        _same_kind(bufs, kind, "arrays")
        check_reduction(kind, op, premul, compression)
        total = sum(b.size for b in bufs)
        dtype = bufs[0].array.dtype
        raw = self.scratch.take(total * dtype.itemsize)
        try:
            packed = raw[: total * dtype.itemsize].view(dtype)
            offsets = np.cumsum([0, *(b.size for b in bufs)])
            for b, start in zip(bufs, offsets, strict=False):
                packed[start : start + b.size] = b.array
            await self._allreduce(
                Bf16Words(packed) if kind == "bfloat16" else packed,
                op=op,
                premul=premul,
                algorithm=algorithm,
                compression=compression,
                on_slice=None,
                on_chunk=None,
                timeout=timeout,
                local_copies=False,
                name="allreduce_coalesced",
                detail=f", sizes {_digest([b.size for b in bufs])}",
            )
            for b, start in zip(bufs, offsets, strict=False):
                b.array[...] = packed[start : start + b.size]
        finally:
            self.scratch.give(raw)

    async def allgather_into_coalesced(
        self, outputs: Sequence[Any], inputs: Sequence[Any], *, timeout: float | None = None
    ) -> None:
        """`allgather_into(outputs[i], inputs[i])` for every i, as one call (the inputs
        are packed into one message per rank; element types may differ)."""
        ins = _buffers(inputs, "inputs", writable=False)
        outs = _buffers(outputs, "outputs", writable=True)
        n = self.group.world_size
        if len(ins) != len(outs):
            raise ValueError(f"{len(outputs)} outputs for {len(inputs)} inputs")
        for i, (o, s) in enumerate(zip(outs, ins, strict=True)):
            if o.kind != s.kind:
                raise TypeError(f"outputs[{i}] is {o.kind}, inputs[{i}] is {s.kind}")
            if o.size != n * s.size:
                raise ValueError(f"outputs[{i}] holds {o.size} elements, not {n} x {s.size}")
        sizes = [s.nbytes for s in ins]
        total = sum(sizes)
        offsets = np.cumsum([0, *sizes])
        raw = self.scratch.take(total * (n + 1))
        try:
            packed_in = raw[:total]
            packed_out = raw[total : total * (n + 1)]
            for s, start in zip(ins, offsets, strict=False):
                packed_in[start : start + s.nbytes] = s.bytes()
            signature = _digest([s.signature for s in ins])
            await self._allgather(
                f"allgather_into_coalesced({signature} x {n})",
                Buffer(packed_in, "uint8"),
                [Buffer(packed_out[r * total : (r + 1) * total], "uint8") for r in range(n)],
                timeout,
            )
            for o, s, start in zip(outs, ins, offsets, strict=False):
                o_bytes = o.bytes()
                for r in range(n):
                    piece = packed_out[r * total + start : r * total + start + s.nbytes]
                    o_bytes[r * s.nbytes : (r + 1) * s.nbytes] = piece
        finally:
            self.scratch.give(raw)

    async def barrier(self, *, timeout: float | None = None) -> None:
        """Return once every rank has called `barrier`.

        Through shared memory when this group's ranks use it (every rank agrees on that: the
        probe decides for all): a one-element shared-memory allreduce named "barrier", whose
        steps see every rank enter before any leaves — no frame, and no thread wake-up while
        the ranks keep up. Otherwise one empty frame each way between every pair.
        """
        if self.group.world_size == 1:
            return
        if self.shm.usable is True and self.one_host:
            if not await self._inline(self._barrier_word, "sum", "shm", timeout, "barrier"):
                await self._allreduce(
                    self._barrier_word,
                    op="sum",
                    premul=None,
                    algorithm="shm",
                    compression=None,
                    on_slice=None,
                    on_chunk=None,
                    timeout=timeout,
                    local_copies=False,
                    name="barrier",
                )
            return
        operation = self._operation("barrier", "barrier", self.deadline(timeout))
        await operation.run(lambda: barrier(operation))


class OutsideGroup:
    """What a non-member gets from `Collectives.subgroup`: every collective raises ValueError."""

    rank = -1
    """Not a rank of the group (torch's non-member ranks see a negative rank too)."""

    def __init__(self, key: GroupKey, rank: int) -> None:
        self.key = key
        self.rank_in_world = rank
        self.world_size = len(key.ranks)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)

        async def refuse(*_args: Any, **_kwargs: Any) -> None:
            raise ValueError(
                f"{name}: this rank ({self.rank_in_world}) is not a member of {self.key.label}"
            )

        return refuse

"""A small shared-memory allreduce run where it is called, while the peers keep up.

When every rank is on this host and shared memory is set up, the steps of a shared-memory
call (`shm.call_steps`) need nothing of the event loop as long as every wait is met by its
bounded spin: this module runs them at once, synchronously, without an operation's guards,
loss watcher and timer, and without argument handling beyond what such a call needs.

- The asyncio API (`Collectives.allreduce`) runs them on the loop thread and awaits only
  what is left (a wait whose spin was not met, a peer's new segment to fetch).
- The blocking facade (`SyncNode.allreduce`) runs them on the caller's own thread: a call
  handed to the loop thread costs two thread wake-ups (tens of microseconds on a VM), more
  than a small shared-memory allreduce itself. Only while nothing handed to the loop is
  still running (the bridge says so, and keeps new work out meanwhile): the call takes the
  group's next operation number and this rank's segments, which loop-side calls also use.

Every such call runs in the compiled small call first (`kernels.shmcall`: the same steps
in one Numba function, a few microseconds where the Python steps take tens): it stops at
the first wait its spin does not meet, or anything it cannot decide (a mismatch, a segment
to fetch), and the Python steps go on from there (`shm.Resume`); it rings sleeping peers
itself. An owner's hook runs in Python between the compiled reduction and "out". Its
plan, per call shape, holds the addresses of the mapped segments and control blocks, so the
arena drops it whenever one of those changes.

The first wait that its spin does not meet hands the rest of the same steps to the loop,
where they finish under a normal operation (deadline, lost peers, abort frames): the same
protocol either way, so calls that finish here and calls that finish on a loop work
together. Only plain float sums and means below `shm.INLINE_BYTES`, with this rank's segment
already mapped by every peer and no other shared-memory call holding or waiting for the
arena; anything else — and any argument error — takes the normal path, which reports it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import numpy as np

from p2pdl.collectives import shm
from p2pdl.collectives.context import OnSlice
from p2pdl.collectives.dtypes import as_buffer, check_reduction
from p2pdl.collectives.op import SUB_BITS, Group, Operation
from p2pdl.collectives.shm import INLINE_BYTES, Resume, advance, call_steps, finish
from p2pdl.collectives.shmsync import PATIENT_YIELDS, YIELDS
from p2pdl.errors import P2PDLError
from p2pdl.kernels import shmcall

if TYPE_CHECKING:
    from p2pdl.collectives.api import Collectives
    from p2pdl.collectives.shm import Segment, ShmArena

DONE = "done"
"""`start_inline` finished the call on the caller's thread."""

Finish = Callable[[], Coroutine[Any, Any, None]]
"""What finishes a call on the loop (the caller waits for it there)."""

OnLoop = Callable[[Callable[[], None]], Any]
"""Schedules a function on the loop thread (`call_soon_threadsafe`, or `call_soon` there)."""


def start_inline(
    coll: Collectives,
    array: Any,
    *,
    op: str,
    algorithm: str,
    timeout: float | None,
    loop_time: Callable[[], float],
    on_loop: OnLoop,
    name: str = "allreduce",
    on_slice: OnSlice | None = None,
    chunkwise: bool = False,
    patient: bool = False,
) -> str | Finish | None:
    """Run `coll`'s allreduce of `array` on this thread as far as it goes without waiting.

    Returns `DONE`, a coroutine function that finishes the call on the loop (run it there
    next, before any other call), or None when the call does not qualify (nothing was
    touched). `loop_time` reads the loop's clock (called on the loop), `on_loop` schedules
    a function on the loop thread (an error's abort frames); `name` is the collective's
    ("barrier": `Collectives.barrier` on shared memory). `on_slice` (`chunkwise` for an
    `on_chunk`) runs on this thread, as the normal path runs it for small slices (only on the
    loop thread: the blocking facade passes none); `patient`: off the loop, where a wait that
    its spin does not meet costs two thread wake-ups, yield longer first
    (`shmsync.PATIENT_YIELDS`). Errors of the call itself are raised here.
    """
    arena = coll.shm
    group = coll.group
    if arena.usable is not True or algorithm not in ("auto", "shm") or not coll.one_host:
        return None
    shape = _shape(coll, array, op, timeout, name)
    if shape is None:
        return None
    buf, reduction, kind, seconds, descriptor, peers = shape
    if not 0 < buf.nbytes < INLINE_BYTES:
        return None
    own = arena.own
    if (
        own is None
        or own.half_bytes < buf.nbytes
        or not own.mapped_by.issuperset(peers)
        or arena.pending
        or arena.in_turn
        or arena.control is None
        or any(p not in arena.controls or group.link(p).lost is not None for p in peers)
    ):
        return None
    started = time.monotonic()
    base = group.next_op_id() << SUB_BITS
    resume: Resume | None = None
    compiled = _compiled_plan(arena, buf, reduction, descriptor, group)
    if compiled is not None and (
        on_slice is None or compiled.hook_bytes < coll.compute.inline_bytes
    ):
        resume = _run_compiled(arena, compiled, buf, base, patient, on_slice is not None)
        if resume is None:
            coll.last_algorithm = "shm"
            coll.retire_later(base)
            coll.inline_calls["compiled"] += 1
            return DONE
    operation = Operation(
        group,
        name,
        descriptor,
        0.0,  # set on the loop if the call goes there
        base=base,
        peers=peers,
        timeout=seconds,
    )
    ctx = coll._context(
        operation,
        buf,
        mean=reduction == "mean",
        compression=None,
        on_slice=on_slice,
        chunkwise=chunkwise,
        reduce_op=reduction,
        kind=kind,
    )
    coll.last_algorithm = "shm"
    steps = call_steps(ctx, arena, PATIENT_YIELDS if patient else YIELDS, resume)
    try:
        need = advance(steps)
    except BaseException as exc:
        error = exc if isinstance(exc, P2PDLError) else P2PDLError(f"allreduce failed: {exc}")
        on_loop(lambda: operation.end_detached(error))
        raise
    if need is None:
        coll.retire_later(operation.base)
        coll.inline_calls["finished"] += 1
        return DONE
    coll.inline_calls["handed_off"] += 1

    async def finish_on_loop() -> None:
        left = seconds - (time.monotonic() - started)
        operation.deadline = loop_time() + max(0.0, left)
        coll.flush_retired()

        async def rest() -> None:
            async with arena.taking_turns(operation):  # free: nothing ran since the check
                await finish(steps, need, operation)

        await operation.run(rest, lazy=True)

    return finish_on_loop


_Shape = tuple[np.ndarray, str, str, float, str, list[int]]
"""A call's flat buffer, reduction, element type, timeout (s), full descriptor, peers."""


def _shape(
    coll: Collectives, array: Any, op: str, timeout: float | None, name: str
) -> _Shape | None:
    """What a call of `array` would run, or None when it cannot run inline (or is wrong:
    the normal path says so). Kept per (dtype, size, op, timeout, name) for numpy arrays:
    a training loop repeats a few shapes, and this is most of a small call's set-up."""
    if type(array) is np.ndarray:
        flags = array.flags
        if not (flags.c_contiguous and flags.writeable):
            return None
        key = (array.dtype.char, array.size, op, timeout, name)
        kept = coll.inline_shapes.get(key, _UNSEEN)
        if kept is None:
            return None  # a shape that never runs inline (another dtype or reduction)
        if kept is not _UNSEEN:
            flat = array if array.ndim == 1 else array.reshape(-1)
            return (flat, *kept)
    else:
        key = None
    from p2pdl.collectives.api import allreduce_descriptor, check_timeout  # (api imports us)

    try:
        flat_buffer = as_buffer(array)
        reduction = check_reduction(flat_buffer.kind, op, None, None)
        seconds = check_timeout(timeout, coll.timeout)
    except (TypeError, ValueError):
        return None  # the normal path says what is wrong
    kind = flat_buffer.kind
    if kind not in ("float32", "float64") or reduction not in ("sum", "mean"):
        if key is not None:
            _keep(coll, key, None)
        return None
    buf = flat_buffer.array
    group = coll.group
    descriptor = allreduce_descriptor(name, "shm", reduction, "", f"{kind}[{buf.size}]", None)
    peers = [p for p in range(group.world_size) if p != group.rank]
    rest = (reduction, kind, seconds, descriptor + coll.label, peers)
    if key is not None:
        _keep(coll, key, rest)
    return (buf, *rest)


_UNSEEN = ()


def _keep(coll: Collectives, key: tuple[Any, ...], rest: tuple[Any, ...] | None) -> None:
    if len(coll.inline_shapes) >= 64:
        coll.inline_shapes.clear()
    coll.inline_shapes[key] = rest


class CompiledPlan:
    """What the compiled small call (`kernels.shmcall`) needs for one call shape: its plan
    (the addresses it reads and writes; `views` keep their mappings alive), the
    descriptor's bytes and the mean's scale, as the Python steps would apply it."""

    __slots__ = ("descriptor", "halves", "hook_bytes", "plan", "run", "scale", "scaled", "views")

    def __init__(
        self,
        run: Any,
        plan: np.ndarray,
        descriptor: np.ndarray,
        scale: Any,
        views: list[Any],
        itemsize: int,
    ) -> None:
        self.run = run
        self.plan = plan
        self.descriptor = descriptor
        self.scale = scale
        self.scaled = bool(scale)
        self.views = views
        self.halves = np.zeros(plan[shmcall.N_AT], np.int64)
        """Filled by each call: the half each peer named for it."""
        at = shmcall.RANKS_AT + int(plan[shmcall.RANK_AT]) * shmcall.RANK_WORDS
        self.hook_bytes = int(plan[at + shmcall.HI] - plan[at + shmcall.LO]) * itemsize
        """The bytes of this rank's slice (an owner's hook on more runs as `sliced` runs
        it: reduced off the loop, not here)."""


def _run_compiled(
    arena: ShmArena,
    compiled: CompiledPlan,
    buf: np.ndarray,
    base: int,
    patient: bool,
    hooked: bool,
) -> Resume | None:
    """Operation `base`'s call of `buf` in the compiled small call: None when it finished
    there, else where the Python steps go on from (`hooked`: always before "out", where
    they run the owner's hook)."""
    seq = (base >> SUB_BITS) + 1
    parity = arena.calls % 2
    arena.calls += 1
    begun = time.perf_counter() if shm.PHASES is not None else 0.0
    code = compiled.run(
        compiled.plan,
        compiled.descriptor,
        buf,
        compiled.halves,
        seq,
        parity,
        arena.last_use[parity],
        compiled.scale,
        compiled.scaled,
        PATIENT_YIELDS if patient else YIELDS,
        hooked,
    )
    stage = int(code)
    if stage != shmcall.AT_REUSE:
        arena.last_use[parity] = seq
    if stage != shmcall.FINISHED:
        return Resume(stage, parity, compiled.halves.tolist())
    if shm.PHASES is not None:  # (a call resumed in Python marks its own steps)
        shm.PHASES.append([("start", begun), ("compiled", time.perf_counter())])
    return None


def _compiled_plan(
    arena: ShmArena, buf: np.ndarray, reduction: str, descriptor: str, group: Group
) -> CompiledPlan | None:
    """The plan of a call of `buf`'s shape (`reduction`: "sum" or "mean") in `group`, kept
    by the arena until a segment or control block changes; None when the compiled call
    cannot run it (no JIT here, not compiled yet, or a segment not mapped or too small yet:
    the Python steps see to that)."""
    rank, n = group.rank, group.world_size
    key = (buf.dtype.char, buf.size, descriptor)
    found = arena.plans.get(key)
    if found is not None or not shmcall.available():
        return found
    run = shmcall.ready(buf.dtype.char)
    if run is None:
        return None  # (being compiled: the Python steps meanwhile)
    own, control = arena.own, arena.control_segment
    if own is None or control is None or own.half_bytes < buf.nbytes:
        return None
    plan = np.zeros(shmcall.plan_words(n), np.int64)
    plan[shmcall.N_AT], plan[shmcall.RANK_AT] = n, rank
    plan[shmcall.SPIN_AT] = shmcall.spins(arena.spin_s(n))
    plan[shmcall.YIELD_AT] = shmcall.address_of("sched_yield")
    plan[shmcall.BELL_AT] = shmcall.address_of("eventfd_write")
    if not (plan[shmcall.YIELD_AT] and plan[shmcall.BELL_AT]):
        return None
    views: list[Any] = []
    for r, (lo, hi) in enumerate(arena.bounds(buf.size, n)):
        if r == rank:
            block, segment = control, own
        elif r in arena.controls and r in arena.peers and r in arena.bells:
            block, segment = arena.controls[r][0], arena.peers[r]
            plan[shmcall.RANKS_AT + r * shmcall.RANK_WORDS + shmcall.DOORBELL] = arena.bells[r]
        else:
            return None
        if segment.half_bytes < buf.nbytes or len(segment.ident) != shmcall.IDENT_BYTES:
            return None
        at = shmcall.RANKS_AT + r * shmcall.RANK_WORDS
        plan[at + shmcall.LO], plan[at + shmcall.HI] = lo, hi
        plan[at + shmcall.CONTROL] = _address(block, views)
        plan[at + shmcall.HALF0] = start = _address(segment, views)
        plan[at + shmcall.HALF1] = start + segment.half_bytes
        ident = np.frombuffer(segment.ident, np.int64)
        plan[at + shmcall.IDENT : at + shmcall.IDENT + ident.size] = ident
    plan.flags.writeable = False
    named = np.frombuffer(descriptor.encode()[: shmcall.DESC_MAX], np.uint8)
    scale = buf.dtype.type(1.0 / n if reduction == "mean" else 0.0)
    found = CompiledPlan(run, plan, named, scale, views, buf.itemsize)
    arena.plans[key] = found
    return found


def _address(segment: Segment, views: list[Any]) -> int:
    """Where `segment` is mapped (a view over it joins `views`: the mapping stays while the
    plan does, even if the segment is closed first)."""
    view = np.frombuffer(segment.mapping, np.uint8)
    views.append(view)
    return int(view.ctypes.data)

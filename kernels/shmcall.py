"""A small shared-memory allreduce in one compiled call, for as long as the peers keep up.

The steps of a shared-memory call (see ``p2pdl.collectives.shm``) are a few stores and loads
of counters in each rank's control block, copies and one sum. Run from Python they cost tens
of microseconds of interpreter work per call; here they are one compiled function of the
call's *plan* (an int64 array of addresses and bounds, made once per call shape), which
returns where it stopped: at the first wait its bounded spin does not meet, or at the first
check it cannot pass (a mismatched call, a segment this rank has not mapped, a peer that
moved on). The caller goes on from there with the same steps in Python, which sleep, raise
and fetch (nothing here can). A rank on one path and a rank on the other work together:
both follow the same counters, and both ring a peer that sleeps on its doorbell.

This module owns the control block's layout (the collectives layer imports it from here).
Every counter is stored with release and loaded with acquire semantics (plain moves on x86-64,
but neither the compiler nor the processor may move the data's loads and stores across them),
and a sequentially consistent fence separates a step from the read of the peers' ``ASLEEP``
words, as ``shmsync.ring`` does. ``sched_yield`` and ``eventfd_write`` are called through
their addresses in the plan, so the compiled function stays in Numba's on-disk cache.

The plan (int64): ``[n, rank, spins, sched_yield's address, eventfd_write's address]`` then,
for each rank ``r`` in order, ``RANK_WORDS`` words: its slice's bounds (lo, hi), its control
block's address, the addresses of its segment's two halves, its doorbell (an eventfd this
rank may ring; unused for itself), and the 32-byte identity of that segment as four words.
For this rank they describe its own block and segment; for a peer, what this rank has mapped
of its.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
import time
from collections.abc import Callable

import numba
import numpy as np
from llvmlite import ir
from numba import types as nt
from numba.extending import intrinsic

from ._jit import DISABLE_JIT, INNER_OPTS, KERNEL_OPTS
from .arith import _add_copy_vec, _add_vec, _copy_vec, _scale_vec, _sum2_vec
from .fence import _seq_cst_fence

CONTROL_BYTES = 4096
"""One rank's control block: eight counters, its segment's identity, its call's descriptor."""
CURRENT, ENTER, OUT, DONE, PARITY, DESC_LEN, OFFERED, ASLEEP = range(8)
IDENT_AT = 64
IDENT_BYTES = 32
DESC_AT = 128
DESC_MAX = CONTROL_BYTES - DESC_AT

FINISHED = 0
"""`small_allreduce` said "done": the result is in the buffer."""
AT_REUSE = 1
"""It said "current" and stopped before writing its half (a peer may still read it)."""
AT_ENTER = 2
"""It said "enter" and stopped before its reduction (waiting, or a check for Python to make)."""
AT_HOOK = 3
"""It summed its slice into the buffer (and its segment) and stopped before "out": the
owner's hook (`on_slice`) runs in Python, then its result goes into the segment."""
AT_OUT = 4
"""It reduced its slice, said "out", and stopped before copying the others' results."""

N_AT, RANK_AT, SPIN_AT, YIELD_AT, BELL_AT = range(5)
RANKS_AT = 5
RANK_WORDS = 10
LO, HI, CONTROL, HALF0, HALF1, DOORBELL, IDENT = range(7)


def plan_words(n: int) -> int:
    """The length of the plan of a call among `n` ranks."""
    return RANKS_AT + n * RANK_WORDS


def address_of(function: str) -> int:
    """Where this process's C library has `function` ("sched_yield" for a plan's `YIELD_AT`
    word, "eventfd_write" for its `BELL_AT`); 0 if it has none."""
    found = getattr(ctypes.CDLL(None), function, None)
    return 0 if found is None else int(ctypes.cast(found, ctypes.c_void_p).value or 0)


@intrinsic
def _pointer(typingctx, address, ty):  # type: ignore[no-untyped-def]
    """A typed pointer to `address` (an int64)."""
    dtype = ty.instance_type if hasattr(ty, "instance_type") else ty.dtype
    sig = nt.CPointer(dtype)(address, ty)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@intrinsic
def _load(typingctx, address):  # type: ignore[no-untyped-def]
    """The 64-bit word at `address`, loaded with acquire semantics."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        word = ir.IntType(64)
        return builder.load_atomic(builder.inttoptr(args[0], word.as_pointer()), "acquire", 8)

    return nt.int64(nt.int64), codegen


@intrinsic
def _store(typingctx, address, value):  # type: ignore[no-untyped-def]
    """Store `value` at `address` with release semantics (after every earlier store)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        word = ir.IntType(64)
        builder.store_atomic(args[1], builder.inttoptr(args[0], word.as_pointer()), "release", 8)
        return context.get_dummy_value()

    return nt.void(nt.int64, nt.int64), codegen


@intrinsic
def _ring(typingctx, address, fd):  # type: ignore[no-untyped-def]
    """Call ``eventfd_write(fd, 1)`` at `address` (its result ignored, as `shmsync.ring`
    ignores a peer that has gone)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i32, i64 = ir.IntType(32), ir.IntType(64)
        function = ir.FunctionType(i32, [i32, i64])
        target = builder.inttoptr(args[0], function.as_pointer())
        builder.call(target, [builder.trunc(args[1], i32), ir.Constant(i64, 1)])
        return context.get_dummy_value()

    return nt.void(nt.int64, nt.int64), codegen


@intrinsic
def _call_void(typingctx, address):  # type: ignore[no-untyped-def]
    """Call the C function `int f(void)` at `address` (`sched_yield`), ignoring its result."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        function = ir.FunctionType(ir.IntType(32), [])
        builder.call(builder.inttoptr(args[0], function.as_pointer()), [])
        return context.get_dummy_value()

    return nt.void(nt.int64), codegen


@numba.njit(**INNER_OPTS)
def _control(plan, r):  # type: ignore[no-untyped-def]
    return plan[RANKS_AT + r * RANK_WORDS + CONTROL]


@numba.njit(**INNER_OPTS)
def _say(plan, word, seq):  # type: ignore[no-untyped-def]
    """Store `seq` in this rank's `word`, then ring the doorbell of every peer asleep on it
    (as `shmsync.ring`: the fence orders the store before the reads of `ASLEEP`)."""
    n, rank = plan[N_AT], plan[RANK_AT]
    _store(_control(plan, rank) + 8 * word, seq)
    _seq_cst_fence()
    for r in range(n):
        if r != rank and _load(_control(plan, r) + 8 * ASLEEP) != 0:
            _ring(plan[BELL_AT], plan[RANKS_AT + r * RANK_WORDS + DOORBELL])


@numba.njit(**INNER_OPTS)
def _all_reached(plan, word, seq, last):  # type: ignore[no-untyped-def]
    """Whether every peer's `word` is at least `seq`, or its "current" past `last`."""
    n, rank = plan[N_AT], plan[RANK_AT]
    for r in range(n):
        if r != rank:
            control = _control(plan, r)
            if _load(control + 8 * word) < seq and _load(control + 8 * CURRENT) <= last:
                return False
    return True


@numba.njit(**INNER_OPTS)
def _spin(plan, word, seq, last, yields):  # type: ignore[no-untyped-def]
    """`_all_reached`, checked up to the plan's spin count more times; without spinning (when
    ranks outnumber cores), after each of up to `yields` yields of the core instead."""
    if _all_reached(plan, word, seq, last):
        return True
    spins = plan[SPIN_AT]
    if spins > 0:
        for _ in range(spins):  # noqa: SIM110 (as above)
            if _all_reached(plan, word, seq, last):
                return True
        return False
    for _ in range(yields):
        _call_void(plan[YIELD_AT])
        if _all_reached(plan, word, seq, last):
            return True
    return False


@numba.njit(**INNER_OPTS)
def _names_this_call(plan, r, seq, desc):  # type: ignore[no-untyped-def]
    """Whether peer `r` entered call `seq` with this call's descriptor, on the segment this
    rank has mapped of it (named by its identity), without sending a new offer."""
    control = _control(plan, r)
    if _load(control + 8 * ENTER) < seq or _load(control + 8 * OFFERED) == seq:
        return False
    if _load(control + 8 * DESC_LEN) != desc.size:
        return False
    named = numba.carray(_pointer(control + DESC_AT, nt.uint8), (desc.size,))
    for i in range(desc.size):
        if named[i] != desc[i]:
            return False
    base = RANKS_AT + r * RANK_WORDS + IDENT
    for k in range(IDENT_BYTES // 8):  # noqa: SIM110 (as above)
        if _load(control + IDENT_AT + 8 * k) != plan[base + k]:
            return False
    return True


@numba.njit(**INNER_OPTS)
def _half(plan, r, parity, buf):  # type: ignore[no-untyped-def]
    """Half `parity` of rank `r`'s segment, as an array like `buf`."""
    address = plan[RANKS_AT + r * RANK_WORDS + HALF0 + parity]
    return numba.carray(_pointer(address, buf.dtype), (buf.size,))


@numba.njit(**INNER_OPTS)
def _source(plan, r, rank, half, buf):  # type: ignore[no-untyped-def]
    """Rank `r`'s input to the owner's sum: `buf` itself for this rank."""
    return buf if r == rank else _half(plan, r, half, buf)


def _small_allreduce(  # type: ignore[no-untyped-def]
    plan, desc, buf, halves, seq, parity, last, scale, scaled, yields, hooked
):
    """One rank's steps of a small call (arguments: see `compiled`); the stage reached."""
    n, rank = plan[N_AT], plan[RANK_AT]
    own = RANKS_AT + rank * RANK_WORDS
    control = plan[own + CONTROL]
    _say(plan, CURRENT, seq)
    # This rank's half is free once no peer can read it for call `last` any more.
    if last != 0 and not _spin(plan, DONE, last, last, yields):
        return AT_REUSE
    lo, hi = plan[own + LO], plan[own + HI]
    mine = _half(plan, rank, parity, buf)
    _copy_vec(mine[:lo], buf[:lo])
    _copy_vec(mine[hi:], buf[hi:])
    named = numba.carray(_pointer(control + DESC_AT, nt.uint8), (desc.size,))
    _copy_vec(named, desc)
    ident = numba.carray(_pointer(control + IDENT_AT, nt.int64), (IDENT_BYTES // 8,))
    _copy_vec(ident, plan[own + IDENT : own + IDENT + IDENT_BYTES // 8])
    _store(control + 8 * DESC_LEN, desc.size)
    _store(control + 8 * PARITY, parity)
    _store(control + 8 * OFFERED, 0)
    _say(plan, ENTER, seq)
    if not _spin(plan, ENTER, seq, seq, yields):
        return AT_ENTER
    for r in range(n):
        if r != rank and not _names_this_call(plan, r, seq, desc):
            return AT_ENTER
    # Each peer's half for this call, read now: once this rank says "out", a peer may go on
    # to its next call and name another.
    for r in range(n):
        halves[r] = parity if r == rank else _load(_control(plan, r) + 8 * PARITY) & 1
    # The owner's slice, summed in rank order: ((s0 + s1) + s2) + ..., then the mean's scale
    # (`arith`'s loops; at two ranks s1 + s0 is s0 + s1, bit for bit).
    if hi > lo and n == 2 and not scaled:  # into `buf` and `mine` in one pass
        peer = _half(plan, 1 - rank, halves[1 - rank], buf)
        _add_copy_vec(buf[lo:hi], peer[lo:hi], mine[lo:hi])
    elif hi > lo:
        first = _source(plan, 0, rank, halves[0], buf)
        second = _source(plan, 1, rank, halves[1], buf)
        _sum2_vec(mine[lo:hi], first[lo:hi], second[lo:hi])
        for r in range(2, n):
            _add_vec(mine[lo:hi], _source(plan, r, rank, halves[r], buf)[lo:hi])
        if scaled:
            _scale_vec(mine[lo:hi], scale)
        _copy_vec(buf[lo:hi], mine[lo:hi])
    if hooked and hi > lo:
        return AT_HOOK
    _say(plan, OUT, seq)
    if not _spin(plan, OUT, seq, seq, yields):
        return AT_OUT
    for r in range(n):
        if r != rank:
            if _load(_control(plan, r) + 8 * OUT) < seq:
                return AT_OUT  # it moved past this call without its result
            at = RANKS_AT + r * RANK_WORDS
            a, b = plan[at + LO], plan[at + HI]
            _copy_vec(buf[a:b], _half(plan, r, halves[r], buf)[a:b])
    _say(plan, DONE, seq)
    return FINISHED


def _signature(dtype: nt.Type) -> nt.Signature:
    return nt.int64(
        nt.Array(nt.int64, 1, "C", readonly=True),
        nt.Array(nt.uint8, 1, "C", readonly=True),
        nt.Array(dtype, 1, "C"),
        nt.Array(nt.int64, 1, "C"),
        nt.int64,
        nt.int64,
        nt.int64,
        dtype,
        nt.boolean,
        nt.int64,
        nt.boolean,
    )


_LOCK = threading.Lock()
_COMPILED: dict[str, Callable[..., int]] = {}
_SPINS_PER_SECOND: list[float] = []
_WARMING: set[str] = set()


ENABLED = os.environ.get("P2PDL_SHM_COMPILED", "1") != "0"
"""``P2PDL_SHM_COMPILED=0`` (read at import) leaves every step to Python: to compare the two,
or to rule the compiled call out when looking for a fault."""


def available() -> bool:
    """Whether the compiled call can run here: x86-64 (whose memory order the protocol
    relies on, as `shmsync.supported` says) with the JIT on, and not turned off."""
    return ENABLED and not DISABLE_JIT and platform.machine().lower() in ("x86_64", "amd64")


def compiled(char: str) -> Callable[..., int]:
    """The compiled call for buffers of dtype `char` ("f" or "d"), compiled (or loaded from
    the cache) now if it was not yet, with the spin calibration (`spins`).

    Its arguments: the plan, the descriptor's bytes, the buffer, an array of one word per
    rank for the half each peer names (filled once the peers have entered), the call's
    sequence number, the half it uses, the call that last used that half (0: none), and the
    mean's scale (with whether there is one), how often a wait yields the core before it
    stops when the plan says not to spin, and whether the owner has a hook to run on its
    slice (`AT_HOOK`). Returns the stage it reached.
    """
    found = _COMPILED.get(char)
    if found is None:
        with _LOCK:
            found = _COMPILED.get(char)
            if found is None:
                spins(0.0)
                dtype = nt.float32 if char == "f" else nt.float64
                found = numba.njit(_signature(dtype), **KERNEL_OPTS)(_small_allreduce)
                _COMPILED[char] = found
    return found


def ready(char: str) -> Callable[..., int] | None:
    """The compiled call for dtype `char` if it is ready; else None, and it is compiled (or
    loaded: about 0.1 s from the cache, 2 s without) on a thread of its own meanwhile, so
    that no collective waits for the JIT with its peers' deadlines running."""
    found = _COMPILED.get(char)
    if found is None and char not in _WARMING:
        _WARMING.add(char)
        threading.Thread(target=compiled, args=(char,), name="p2pdl-jit", daemon=True).start()
    return found


def _spin_never(plan):  # type: ignore[no-untyped-def]
    return _spin(plan, ENTER, 1, 1, 0)


def spins(seconds: float) -> int:
    """How many spin checks of a two-rank call take about `seconds` (measured once, on a
    wait that never holds)."""
    if not _SPINS_PER_SECOND:
        signature = nt.boolean(nt.Array(nt.int64, 1, "C", readonly=True))
        probe = numba.njit(signature, **KERNEL_OPTS)(_spin_never)
        block = np.zeros(CONTROL_BYTES // 8, np.int64)
        plan = np.zeros(plan_words(2), np.int64)
        plan[N_AT], plan[RANK_AT], plan[SPIN_AT] = 2, 0, 20_000
        for r in range(2):
            plan[RANKS_AT + r * RANK_WORDS + CONTROL] = block.ctypes.data
        probe(plan)  # (compiled or loaded first)
        start = time.perf_counter()
        probe(plan)
        _SPINS_PER_SECOND.append(20_000 / max(time.perf_counter() - start, 1e-9))
    return int(seconds * _SPINS_PER_SECOND[0])

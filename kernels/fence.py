"""A full memory fence, for processes that synchronise through shared memory.

x86-64 may let a load overtake an earlier store to another address (the store waits in the
store buffer). Two processes that each write a word and then read the other's — "I have
written my step; is my peer asleep?" against "I am going to sleep; has my peer written its
step?" — need a fence between the two, or both may read the old values and one sleeps
through the other's step. Python has none; this compiled one (LLVM's ``fence seq_cst``: an
``mfence`` or a locked no-op on x86-64) costs about a tenth of a microsecond per call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numba
from numba import types as nt
from numba.extending import intrinsic

from ._jit import DISABLE_JIT, KERNEL_OPTS


@intrinsic
def _seq_cst_fence(typingctx):  # type: ignore[no-untyped-def]
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return nt.void(), codegen


def _compiled_fence() -> Callable[[], None]:
    """The compiled fence (compiled, or loaded from the cache, on first use)."""

    def fence() -> None:
        _seq_cst_fence()

    return numba.njit(nt.void(), **KERNEL_OPTS)(fence)


_LOCK = threading.Lock()
_FENCE: list[Callable[[], None]] = []


def full_fence() -> None:
    """Order every store before it ahead of every load after it (a sequentially consistent
    fence). Without the JIT (coverage runs): a lock's acquire and release, whose atomic
    read-modify-write orders memory the same way on x86-64."""
    if DISABLE_JIT:
        with _LOCK:
            return
    if not _FENCE:
        _FENCE.append(_compiled_fence())
    _FENCE[0]()

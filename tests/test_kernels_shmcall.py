"""The compiled small shared-memory call (`kernels.shmcall`), rank by rank in one process.

Control blocks and segments are plain arrays here; the test writes the peers' words and
data as the peers' steps would (the protocol of `p2pdl.collectives.shm`), runs one rank's
compiled call, and checks where it stopped, what it wrote, and what it left alone.
Processes running it against each other are in tests/test_inline.py and tests/test_shm.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from p2pdl.kernels import shmcall as K

pytestmark = pytest.mark.skipif(not K.available(), reason="needs the JIT on x86-64")

DESCRIPTOR = b"allreduce(shm, sum, float32[10], None)"


class World:
    """`n` ranks' control blocks and segments (two halves of `size` elements each); rank
    `rank` runs the compiled call, the test plays the others."""

    def __init__(self, n: int, rank: int, size: int, dtype: type = np.float32) -> None:
        self.n, self.rank, self.size, self.dtype = n, rank, size, np.dtype(dtype)
        self.blocks = [np.zeros(K.CONTROL_BYTES // 8, np.int64) for _ in range(n)]
        self.segments = [np.zeros(2 * size, self.dtype) for _ in range(n)]
        self.bounds = [(r * size // n, (r + 1) * size // n) for r in range(n)]
        self.plan = np.zeros(K.plan_words(n), np.int64)
        self.plan[K.N_AT], self.plan[K.RANK_AT] = n, rank
        self.plan[K.SPIN_AT] = 10
        self.plan[K.YIELD_AT] = K.address_of("sched_yield")
        self.plan[K.BELL_AT] = K.address_of("eventfd_write")
        for r in range(n):
            at = K.RANKS_AT + r * K.RANK_WORDS
            self.plan[at + K.LO], self.plan[at + K.HI] = self.bounds[r]
            self.plan[at + K.CONTROL] = self.blocks[r].ctypes.data
            self.plan[at + K.HALF0] = self.segments[r].ctypes.data
            self.plan[at + K.HALF1] = self.segments[r].ctypes.data + size * self.dtype.itemsize
            self.plan[at + K.IDENT : at + K.IDENT + 4] = [r + 1, 7, 7, 7]
            self.plan[at + K.DOORBELL] = -1  # (a test that rings gives it an eventfd)
        self.halves = np.zeros(n, np.int64)

    def half(self, r: int, parity: int) -> np.ndarray:
        return self.segments[r][parity * self.size : (parity + 1) * self.size]

    def enter(
        self,
        r: int,
        seq: int,
        data: np.ndarray,
        parity: int = 0,
        descriptor: bytes = DESCRIPTOR,
        ident: tuple[int, ...] | None = None,
    ) -> None:
        """Peer `r`'s steps up to "enter" for call `seq`, with input `data`."""
        lo, hi = self.bounds[r]
        half = self.half(r, parity)
        half[:lo], half[hi:] = data[:lo], data[hi:]
        block = self.blocks[r]
        block.view(np.uint8)[K.DESC_AT : K.DESC_AT + len(descriptor)] = list(descriptor)
        block[K.IDENT_AT // 8 : K.IDENT_AT // 8 + 4] = ident or (r + 1, 7, 7, 7)
        block[K.DESC_LEN], block[K.PARITY], block[K.OFFERED] = len(descriptor), parity, 0
        block[K.CURRENT] = block[K.ENTER] = seq

    def out(self, r: int, seq: int, result: np.ndarray, parity: int = 0) -> None:
        """Peer `r` has summed its slice (`result` is the whole sum) and said "out"."""
        lo, hi = self.bounds[r]
        self.half(r, parity)[lo:hi] = result[lo:hi]
        self.blocks[r][K.OUT] = seq

    def run(self, buf: np.ndarray, seq: int, parity: int = 0, last: int = 0, **kw: object) -> int:
        scale = kw.get("scale")
        return int(
            K.compiled(self.dtype.char)(
                self.plan,
                np.frombuffer(kw.get("descriptor", DESCRIPTOR), np.uint8),  # type: ignore[arg-type]
                buf,
                self.halves,
                seq,
                parity,
                last,
                self.dtype.type(scale or 0.0),
                scale is not None,
                int(kw.get("yields", 0)),  # type: ignore[call-overload]
                bool(kw.get("hooked", False)),
            )
        )


def inputs(n: int, size: int, dtype: type = np.float32) -> list[np.ndarray]:
    rng = np.random.default_rng(n * 1000 + size)
    return [rng.standard_normal(size).astype(dtype) for _ in range(n)]


def rank_order_sum(data: list[np.ndarray], scale: float | None = None) -> np.ndarray:
    """((x0 + x1) + x2) + ..., then the scale: the Python steps' arithmetic."""
    total = data[0] + data[1]
    for x in data[2:]:
        total = total + x
    if scale is not None:
        total = total * total.dtype.type(scale)
    return total


@pytest.mark.parametrize(
    ("n", "rank", "dtype", "mean"),
    [(2, 0, np.float32, False), (2, 1, np.float64, True), (3, 1, np.float32, True),
     (4, 3, np.float64, False), (5, 0, np.float32, False)],
)  # fmt: skip
def test_a_call_whose_peers_keep_up_finishes_with_the_rank_order_sum(
    n: int, rank: int, dtype: type, mean: bool
) -> None:
    size = 37
    world = World(n, rank, size, dtype)
    data = inputs(n, size, dtype)
    expected = rank_order_sum(data, 1.0 / n if mean else None)
    for r in range(n):
        if r != rank:
            world.enter(r, 5, data[r], parity=r % 2)
            world.out(r, 5, expected, parity=r % 2)
    buf = data[rank].copy()
    code = world.run(buf, 5, parity=1, scale=1.0 / n if mean else None)
    assert code == K.FINISHED
    assert buf.tobytes() == expected.tobytes()
    lo, hi = world.bounds[rank]
    mine = world.half(rank, 1)
    assert mine[lo:hi].tobytes() == expected[lo:hi].tobytes()  # its result, for the peers
    assert mine[:lo].tobytes() == data[rank][:lo].tobytes()  # its input, for theirs
    assert mine[hi:].tobytes() == data[rank][hi:].tobytes()
    assert not world.half(rank, 0).any()  # the other half untouched
    block = world.blocks[rank]
    assert list(block[: K.DONE + 1]) == [5, 5, 5, 5]
    assert block[K.PARITY] == 1 and block[K.OFFERED] == 0
    assert block[K.DESC_LEN] == len(DESCRIPTOR)
    assert bytes(block.view(np.uint8)[K.DESC_AT : K.DESC_AT + len(DESCRIPTOR)]) == DESCRIPTOR
    assert list(block[K.IDENT_AT // 8 : K.IDENT_AT // 8 + 4]) == [rank + 1, 7, 7, 7]
    assert list(world.halves) == [1 if r == rank else r % 2 for r in range(n)]


def test_an_owner_with_a_hook_stops_before_out_with_its_slice_reduced() -> None:
    """With a hook to run, the call stops once its slice is summed (into the buffer and its
    segment), before "out", with the half each peer named; a rank that owns nothing (more
    ranks than elements) has no hook to run and goes on."""
    world = World(3, 1, 9)
    data = inputs(3, 9)
    expected = rank_order_sum(data, 1 / 3)
    for r in (0, 2):
        world.enter(r, 4, data[r], parity=1)
        world.out(r, 4, expected, parity=1)
    buf = data[1].copy()
    assert world.run(buf, 4, scale=1 / 3, hooked=True) == K.AT_HOOK
    assert buf[3:6].tobytes() == expected[3:6].tobytes()
    assert world.half(1, 0)[3:6].tobytes() == expected[3:6].tobytes()
    assert buf[:3].tobytes() == data[1][:3].tobytes()  # the others' slices not copied yet
    assert world.blocks[1][K.OUT] == 0 and list(world.halves) == [1, 0, 1]

    world = World(3, 2, 2)  # bounds (0, 0), (0, 1), (1, 2): every rank owns something...
    world.bounds = [(0, 0), (0, 2), (2, 2)]  # ...unless told otherwise
    for r in range(3):
        at = K.RANKS_AT + r * K.RANK_WORDS
        world.plan[at + K.LO], world.plan[at + K.HI] = world.bounds[r]
    data = inputs(3, 2)
    for r in (0, 1):
        world.enter(r, 4, data[r])
        world.out(r, 4, rank_order_sum(data))
    buf = data[2].copy()
    assert world.run(buf, 4, hooked=True) == K.FINISHED
    assert buf.tobytes() == rank_order_sum(data).tobytes()


def test_it_stops_where_a_peer_is_not_there_yet() -> None:
    """Not entered: "enter" said, data in, nothing summed. Entered but not out: its own
    slice summed into the buffer and segment, "out" said, the peer's part not copied."""
    world = World(2, 0, 10)
    data = inputs(2, 10)
    buf = data[0].copy()
    assert world.run(buf, 3) == K.AT_ENTER
    block = world.blocks[0]
    assert (block[K.CURRENT], block[K.ENTER], block[K.OUT], block[K.DONE]) == (3, 3, 0, 0)
    assert world.half(0, 0)[5:].tobytes() == data[0][5:].tobytes()
    assert buf.tobytes() == data[0].tobytes()

    world = World(2, 0, 10)
    world.enter(1, 3, data[1])
    buf = data[0].copy()
    assert world.run(buf, 3) == K.AT_OUT
    total = data[0] + data[1]
    assert buf[:5].tobytes() == total[:5].tobytes()
    assert buf[5:].tobytes() == data[0][5:].tobytes()
    assert (world.blocks[0][K.OUT], world.blocks[0][K.DONE]) == (3, 0)
    assert list(world.halves) == [0, 0]


def test_a_half_a_peer_may_still_read_is_not_written() -> None:
    """The half was last used by call 4 and the peer is still in it (not done, nothing
    later): the call says "current" and stops before writing anything."""
    world = World(2, 1, 10)
    world.blocks[0][K.CURRENT] = 4
    world.blocks[0][K.DONE] = 3
    world.half(1, 0)[:] = -1.0
    buf = inputs(2, 10)[1]
    assert world.run(buf, 6, parity=0, last=4) == K.AT_REUSE
    assert (world.half(1, 0) == -1.0).all()
    assert world.blocks[1][K.CURRENT] == 6 and world.blocks[1][K.ENTER] == 0
    world.blocks[0][K.DONE] = 4  # it finished call 4
    assert world.run(buf, 6, parity=0, last=4) == K.AT_ENTER


@pytest.mark.parametrize(
    "peer",
    [
        {"descriptor": b"allreduce(shm, sum, float32[11], None)"},  # another call
        {"descriptor": DESCRIPTOR[:-1]},  # a prefix of this one
        {"ident": (9, 9, 9, 9)},  # a segment this rank has not mapped
        {"offered": True},  # it sent a new segment's offer on this call
    ],
)
def test_a_peer_that_does_not_name_this_call_is_left_to_python(peer: dict) -> None:
    """Whatever a peer's block says that this rank cannot take as it is, the call stops
    after "enter" without reading the peer's segment: Python's steps raise the mismatch
    or fetch the new segment."""
    world = World(2, 0, 10)
    data = inputs(2, 10)
    world.enter(
        1, 8, data[1], descriptor=peer.get("descriptor", DESCRIPTOR), ident=peer.get("ident")
    )
    if peer.get("offered"):
        world.blocks[1][K.OFFERED] = 8
    world.out(1, 8, data[1] * 0)
    buf = data[0].copy()
    assert world.run(buf, 8) == K.AT_ENTER
    assert buf.tobytes() == data[0].tobytes()
    assert world.blocks[0][K.OUT] == 0


def test_a_peer_that_moved_past_the_call_is_left_to_python() -> None:
    """A peer whose "current" is past this call but never entered or never said "out" for
    it: the call stops at that wait (Python names the peer)."""
    world = World(2, 0, 10)
    data = inputs(2, 10)
    world.blocks[1][K.CURRENT] = 9
    assert world.run(data[0].copy(), 8) == K.AT_ENTER

    world = World(2, 0, 10)
    world.enter(1, 8, data[1])
    world.blocks[1][K.CURRENT] = 9
    assert world.run(data[0].copy(), 8) == K.AT_OUT


def test_a_sleeping_peer_is_rung_after_each_step() -> None:
    """A peer asleep on its doorbell (its `ASLEEP` word set) is rung after every step this
    rank says ("current", "enter", "out", "done": four rings on its eventfd); a peer that
    spins is not rung at all."""
    world = World(3, 0, 12)
    data = inputs(3, 12)
    expected = rank_order_sum(data)
    bells = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
    try:
        for r, bell in zip((1, 2), bells, strict=True):
            world.plan[K.RANKS_AT + r * K.RANK_WORDS + K.DOORBELL] = bell
            world.enter(r, 2, data[r])
            world.out(r, 2, expected)
        world.blocks[1][K.ASLEEP] = 1
        buf = data[0].copy()
        assert world.run(buf, 2) == K.FINISHED
        assert buf.tobytes() == expected.tobytes()
        assert os.eventfd_read(bells[0]) == 4
        with pytest.raises(BlockingIOError):
            os.eventfd_read(bells[1])
    finally:
        for bell in bells:
            os.close(bell)


def test_without_spinning_a_wait_yields_the_core_and_stops() -> None:
    """Ranks outnumber cores (no spinning): a wait yields the core as often as told, then
    stops where it is."""
    world = World(3, 2, 12)
    world.plan[K.SPIN_AT] = 0
    assert world.run(inputs(3, 12)[2].copy(), 4, yields=5) == K.AT_ENTER
    assert world.blocks[2][K.ENTER] == 4


def test_spins_are_measured_once_and_scale_with_time() -> None:
    assert K.spins(0.0) == 0
    assert 0 < K.spins(1e-6) <= K.spins(1e-4)

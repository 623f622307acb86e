"""Authenticated links between in-process nodes, and hostile clients that never authenticate."""

from __future__ import annotations

import asyncio
import os
import tracemalloc

import numpy as np
import pytest
from helpers import (
    make_cluster,
    on_all,
    run,
    short_timeouts,
    start_listening,
    wait_until,
)

from p2pdl.config import Limits
from p2pdl.errors import AuthenticationError, CollectiveTimeoutError, ProtocolError
from p2pdl.mesh import dial
from p2pdl.node import Node
from p2pdl.transport import Credentials, Link, dial_handshake
from p2pdl.wire import MAGIC, PREFIX, VERSION, encode_frame, encode_head

HANDSHAKE = 0.5
"""Short handshake timeout for the hostile-client tests (silent clients are cut off after it)."""

LOCAL = ("127.0.0.1", 0)


async def allreduce_check(nodes: list[Node], size: int = 1000) -> None:
    """Every rank contributes rank+1; all must end with the exact sum."""
    arrays = [np.full(size, node.rank + 1, dtype=np.float32) for node in nodes]
    await asyncio.gather(*(node.allreduce(a) for node, a in zip(nodes, arrays, strict=True)))
    total = sum(range(1, len(nodes) + 1))
    for array in arrays:
        assert np.all(array == total)


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the node sends before it closes the connection (EOF or reset)."""
    received = b""
    while True:
        try:
            chunk = await reader.read(65536)
        except (ConnectionResetError, BrokenPipeError):
            return received
        if not chunk:
            return received
        received += chunk


# ------------------------------------------------------------------- authenticated peers
def test_authenticated_peers_barrier_and_broadcast() -> None:
    async def body() -> None:
        async with make_cluster(3) as nodes:
            assert [node.world_size for node in nodes] == [3, 3, 3]
            for node in nodes:
                for peer in range(3):
                    if peer != node.rank:
                        link = node.session.mesh.link(peer)
                        assert link.authenticated and link.rank == peer
            await on_all(nodes, lambda node: node.barrier())
            for root in range(3):
                arrays = [np.full(100, -1.0 if n.rank != root else 7.5) for n in nodes]
                await asyncio.gather(
                    *(n.broadcast(a, root=root) for n, a in zip(nodes, arrays, strict=True))
                )
                assert all(np.all(a == 7.5) for a in arrays)
            await allreduce_check(nodes)

    run(body())


def test_frames_before_their_buffer_is_posted() -> None:
    """Small early frames are kept; a large one waits (reading paused) until it is posted."""

    async def body() -> None:
        async with make_cluster(2) as nodes:
            to0 = nodes[1].session.mesh.link(0)
            at0 = nodes[0].session.mesh.link(1)
            small = np.arange(100, dtype=np.float32)
            large = np.arange(1 << 20, dtype=np.float32)  # 4 MiB > eager_payload
            # Tags below 1 << 24 are never used by collectives.
            await to0.send({"t": 5}, memoryview(small))
            sending = asyncio.ensure_future(to0.send({"t": 6}, memoryview(large).cast("B")))
            await to0.send({"t": 7})  # not delivered before tag 6's buffer is posted
            got_small = np.zeros_like(small)
            got_large = np.zeros_like(large)
            header, _ = await at0.post(5, memoryview(got_small))
            assert header["t"] == 5 and np.array_equal(got_small, small)
            header, view = await at0.post(6, memoryview(got_large))
            assert np.array_equal(got_large, large)
            await sending
            header, view = await at0.post(7)
            assert header["t"] == 7 and view.nbytes == 0
            # A size mismatch fails that receive only; the link keeps working.
            wrong = np.zeros(10, dtype=np.float32)
            receive = at0.post(8, memoryview(wrong))
            await to0.send({"t": 8}, memoryview(np.zeros(11, dtype=np.float32)))
            with pytest.raises(ProtocolError, match="posted buffer"):
                await receive
            await allreduce_check(nodes)

    run(body())


def test_closing_node_delivers_its_queued_frames_despite_unread_data() -> None:
    """Frames queued before close (an abort report, say) reach the peer; no reset drops them.

    Node 0 holds unread data from node 1 (a large frame it never posts) and has a large frame
    plus a small one queued for node 1, which reads them only after node 0 began to close. A
    plain close() would reset the connection (unread data) and the kernel would drop what was
    still queued; the polite shutdown sends FIN after the queue and drains until node 1 closes.
    """

    async def body() -> None:
        async with make_cluster(2) as nodes:
            to1, at1 = nodes[0].session.mesh.link(1), nodes[1].session.mesh.link(0)
            big = np.arange(4 << 20, dtype=np.float32)  # 16 MiB: more than socket buffers hold
            unread = asyncio.ensure_future(at1.send({"t": 1}, memoryview(big).cast("B")))
            queued = asyncio.ensure_future(to1.send({"t": 2}, memoryview(big).cast("B")))
            to1.send_nowait({"t": 3})
            closing = asyncio.ensure_future(nodes[0].close())
            await wait_until(lambda: to1.lost is not None)  # node 0 has begun to close
            got = np.zeros_like(big)
            header, _ = await at1.post(2, memoryview(got).cast("B"))
            assert np.array_equal(got, big)
            header, view = await at1.post(3)
            assert header["t"] == 3 and view.nbytes == 0
            await closing  # returns once node 1 closed its side too (it saw EOF)
            await wait_until(lambda: at1.lost is not None)
            # The goodbye (sent after the queued frames, before FIN), not "reset by peer".
            assert at1.departed and "closed its node" in str(at1.lost), at1.lost
            await asyncio.gather(unread, queued, return_exceptions=True)

    run(body())


def test_retired_ranges_drop_late_frames_and_the_newest_256_are_kept() -> None:
    async def body() -> None:
        link = Link(Limits())
        block = 1 << 24
        for op in range(0, 600, 2):  # apart: one entry each
            link.retire(op * block, (op + 1) * block)
        assert len(link._retired) == 256
        assert not link._is_retired(86 * block + 5)  # forgotten: only the newest 256 stay
        assert link._is_retired(88 * block)
        assert not link._is_retired(89 * block)  # never retired
        assert link._is_retired(598 * block + block - 1)
        assert not link._is_retired(599 * block)
        assert not link._is_retired(-1)
        # Operations that end in order extend the newest range: one entry for the run.
        for op in range(1000, 1300):
            link.retire(op * block, (op + 1) * block)
        assert len(link._retired) == 256
        assert link._is_retired(1000 * block) and link._is_retired(1299 * block + block - 1)
        assert link._is_retired(598 * block)  # still kept: the run took one entry
        assert not link._is_retired(1300 * block)
        link.retire(2000 * block, 2000 * block + 10)  # a gap between retired ranges
        assert link._is_retired(2000 * block + 9)
        assert not link._is_retired(2000 * block + 10)
        assert not link._is_retired(1500 * block)
        link.retire(1500 * block, 1501 * block)  # out of order: its own entry
        assert link._is_retired(1500 * block) and not link._is_retired(1501 * block)
        assert not link._is_retired(1499 * block + block - 1)

    run(body())


# ---------------------------------------------------------------------------- wrong secret
def test_a_joiner_with_the_wrong_secret_is_refused_and_the_cluster_still_forms() -> None:
    """Issue 11: a node with the wrong secret fails on its own side; the leader is not
    harmed — it keeps waiting, and the real joiner completes the cluster."""

    async def body() -> None:
        timeouts = short_timeouts(connect=20.0)
        leader = Node(0, world_size=2, host="127.0.0.1", port=0, secret=b"A" * 16,
                      timeouts=timeouts)  # fmt: skip
        impostor = honest = None
        try:
            lead = await start_listening(leader)
            impostor = Node(1, leader=leader.address, secret=b"B" * 16,
                            timeouts=short_timeouts(connect=1.0))  # fmt: skip
            with pytest.raises(AuthenticationError, match="does not know the shared secret"):
                await impostor.start()
            assert not lead.done()  # the leader waits on
            honest = Node(1, leader=leader.address, secret=b"A" * 16, timeouts=timeouts)
            await asyncio.gather(lead, honest.start())
            await allreduce_check([leader, honest])
            assert leader.endpoint.listener.rejected >= 1
        finally:
            for node in (leader, impostor, honest):
                if node is not None:
                    await node.close()

    run(body())


def test_the_wrong_secret_is_named_when_a_static_mesh_times_out() -> None:
    async def body() -> None:
        timeouts = short_timeouts(connect=2.0)
        # Rank 0 never dials rank 1 (higher ranks dial lower ones), so it needs no real port.
        first = Node(0, [LOCAL, LOCAL], secret=b"A" * 16, timeouts=timeouts)
        second = None
        try:
            start0 = await start_listening(first)
            second = Node(1, [first.address, LOCAL], secret=b"B" * 16, timeouts=timeouts)
            results = await asyncio.gather(start0, second.start(), return_exceptions=True)
        finally:
            await first.close()
            if second is not None:
                await second.close()
        # Rank 0 only learns that nobody proved the secret: it times out, saying why.
        assert isinstance(results[0], CollectiveTimeoutError), results
        assert results[0].missing == (1,) and "turned away" in str(results[0]), results[0]
        # Rank 1 dialled a node that could not prove the secret (to it): it names that.
        assert isinstance(results[1], AuthenticationError), results
        assert "does not know the shared secret" in str(results[1])

    run(body())


# -------------------------------------------------------------------------- hostile clients
def _hello(rank: int = 1, **extra: object) -> bytes:
    hello = {
        "h": "hello",
        "v": VERSION,
        "cluster": "p2pdl",
        "epoch": 0,
        "rank": rank,
        "nonce": os.urandom(32),
        "auth": True,
        "enc": True,
        **extra,
    }
    return encode_frame(hello)


HOSTILE = {
    "garbage": os.urandom(4096),
    "http": b"GET / HTTP/1.1\r\nHost: p2pdl\r\n\r\n",
    "truncated-prefix": encode_frame({"h": "hello"})[:9],
    "truncated-header": encode_frame({"h": "hello", "pad": "x" * 200})[:40],
    "claims-4GiB-payload": PREFIX.pack(MAGIC, VERSION, 0, 8, 4 << 30) + b"\x81\xa1h\xa1x",
    "claims-4GiB-header": PREFIX.pack(MAGIC, VERSION, 0, 2**32 - 1, 0) + b"\x00" * 64,
    "hello-with-payload": encode_head({"h": "hello"}, 4 << 30),
    "silent": b"",
    "hello-then-silent": _hello(),
    "frame-flood": encode_frame({"h": "noise"}) * 2000,
    "not-a-map": PREFIX.pack(MAGIC, VERSION, 0, 3, 0) + b"\x92\x01\x02",
}
"""What unauthenticated clients send; "silent" ones are cut off by the handshake timeout."""

SILENT = {"silent", "truncated-prefix", "truncated-header", "hello-then-silent"}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_client_is_turned_away_and_the_cluster_serves_on(kind: str) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with make_cluster(3, timeouts=short_timeouts(handshake=HANDSHAKE)) as nodes:
            await allreduce_check(nodes)
            rejected = [node.endpoint.listener.rejected for node in nodes]
            tracemalloc.start()
            try:
                # One hostile connection to every node. No node can have accepted one before
                # `opened`, so none may close a silent one before `opened + HANDSHAKE`.
                opened = loop.time()
                connections = [await asyncio.open_connection(*n.address) for n in nodes]
                for _reader, writer in connections:
                    writer.write(HOSTILE[kind])
                    await writer.drain()
                closing = [
                    asyncio.ensure_future(read_until_closed(reader))
                    for reader, _writer in connections
                ]
                # While they are connected (or being cut off), the cluster keeps working.
                for _ in range(5):
                    await on_all(nodes, lambda node: node.barrier())
                    await allreduce_check(nodes, size=20_000)
                # The node closes each hostile connection (the silent ones after the timeout).
                async with asyncio.timeout(30):
                    replies = await asyncio.gather(*closing)
                closed_after = loop.time() - opened
                await wait_until(
                    lambda: all(
                        n.endpoint.listener.rejected == r + 1
                        for n, r in zip(nodes, rejected, strict=True)
                    )
                )
                _current, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
                for _reader, writer in connections:
                    writer.close()
            # Nothing close to a claimed 4 GiB was ever allocated.
            assert peak < 64 << 20, f"peak traced memory {peak} bytes"
            if kind in SILENT:
                assert closed_after >= HANDSHAKE * 0.99
            for reply in replies:
                # Nothing but handshake frames ever goes to an unauthenticated client.
                assert reply == b"" or reply.startswith(MAGIC)
            for node in nodes:
                assert not any(
                    not link.authenticated for link in node.endpoint.listener._open_links
                )
            await allreduce_check(nodes)

    run(body())


def test_hostile_clients_all_at_once() -> None:
    async def body() -> None:
        async with make_cluster(3, timeouts=short_timeouts(handshake=HANDSHAKE)) as nodes:
            rejected = nodes[0].endpoint.listener.rejected
            connections = [await asyncio.open_connection(*nodes[0].address) for _ in HOSTILE]
            for (_reader, writer), data in zip(connections, HOSTILE.values(), strict=True):
                writer.write(data)
            closing = [asyncio.ensure_future(read_until_closed(r)) for r, _w in connections]
            for _ in range(3):
                await allreduce_check(nodes, size=100_000)
            async with asyncio.timeout(30):
                await asyncio.gather(*closing)
            await wait_until(lambda: nodes[0].endpoint.listener.rejected == rejected + len(HOSTILE))
            for _reader, writer in connections:
                writer.close()
            await allreduce_check(nodes)

    run(body())


@pytest.mark.parametrize("mac", [b"\x00" * 32, 5, "text", None])
def test_client_with_a_bad_proof_is_rejected(mac: object) -> None:
    """A client that claims a real rank but cannot prove the secret (any `mac` type)."""

    async def body() -> None:
        async with make_cluster(2, timeouts=short_timeouts(handshake=5.0)) as nodes:
            rejected = nodes[0].endpoint.listener.rejected
            reader, writer = await asyncio.open_connection(*nodes[0].address)
            writer.write(_hello(rank=1))
            head = await reader.readexactly(len(encode_head({})))  # the server's hello begins
            assert head.startswith(MAGIC)
            writer.write(encode_frame({"h": "proof", "mac": mac}))
            reply = await read_until_closed(reader)
            writer.close()
            assert b"reject" in reply
            await wait_until(lambda: nodes[0].endpoint.listener.rejected == rejected + 1)
            assert nodes[0].session.mesh.link(1).authenticated  # the real rank 1 is still connected
            await allreduce_check(nodes)

    run(body())


def test_wrong_cluster_or_version_is_rejected() -> None:
    async def body() -> None:
        async with make_cluster(2, timeouts=short_timeouts(handshake=HANDSHAKE)) as nodes:
            for hello in (
                _hello(cluster="other"),
                _hello(v=VERSION + 1),
                _hello(auth=False),
                _hello(enc=False),
                _hello(nonce=b"short"),
                _hello(rank="one"),
            ):
                reader, writer = await asyncio.open_connection(*nodes[0].address)
                writer.write(hello)
                reply = await read_until_closed(reader)
                writer.close()
                assert b"reject" in reply
            await allreduce_check(nodes)

    run(body())


@pytest.mark.parametrize("claimed", [1, 7])
def test_client_with_the_secret_but_a_taken_or_unknown_rank(claimed: int) -> None:
    """Knowing the secret is not enough: rank 0 admits only ranks it expects, once."""

    async def body() -> None:
        secret = os.urandom(16)
        async with make_cluster(2, secret=secret) as nodes:
            creds = Credentials("p2pdl", secret)
            link = await dial(*nodes[0].address, Limits(), asyncio.get_running_loop().time() + 10,
                              label="rank 0")  # fmt: skip
            try:
                with pytest.raises(AuthenticationError, match="refused by rank 0"):
                    await dial_handshake(link, creds, claimed, 0, None)
            finally:
                link.close()
            assert nodes[0].session.mesh.link(1).authenticated
            await allreduce_check(nodes)

    run(body())


def test_cluster_without_secret_on_loopback_carries_data_right_after_welcome() -> None:
    """Without a secret, hello and welcome can arrive in one read; data right behind them
    must still be accepted (the link switches to authenticated mode on the welcome)."""

    async def body() -> None:
        async with make_cluster(3, no_secret=True) as nodes:
            for _ in range(3):
                arrays = [np.full(300_000, node.rank + 1.0, np.float32) for node in nodes]
                await asyncio.gather(
                    *(
                        node.allreduce(a, algorithm="sliced")
                        for node, a in zip(nodes, arrays, strict=True)
                    )
                )
                assert all(np.all(a == 6.0) for a in arrays)

    run(body())


class _FakeTransport:
    """Enough of an asyncio transport to drive a Link by hand."""

    def __init__(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def set_write_buffer_limits(self, high: int = 0, low: int = 0) -> None:
        pass

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass

    abort = close


def _feed(link, data: bytes, piece: int) -> None:
    view = memoryview(data)
    while view.nbytes:
        target = link.get_buffer(-1)
        n = min(piece, target.nbytes, view.nbytes)
        target[:n] = view[:n]
        view = view[n:]
        link.buffer_updated(n)


@pytest.mark.parametrize("size", [1, 1000, 200_000])
def test_receive_posted_while_an_early_payload_is_arriving_gets_the_data(size: int) -> None:
    """A frame whose header came before its receive was posted is kept in memory; if the
    receive is posted while the payload is still arriving, the data must reach the posted
    buffer (it once resolved with the posted buffer untouched)."""
    from p2pdl.transport import Link

    async def body() -> None:
        link = Link(Limits())
        link.connection_made(_FakeTransport())
        link.mark_authenticated(1)
        payload = np.random.default_rng(size).integers(0, 255, size, dtype=np.uint8).tobytes()
        frame = encode_head({"t": 7}, size) + payload
        half = len(frame) - size // 2 - 1
        _feed(link, frame[:half], 4096)
        target = np.zeros(size, np.uint8)
        future = link.post(7, memoryview(target))
        assert not future.done()
        _feed(link, frame[half:], 4096)
        header, _view = await asyncio.wait_for(future, 5)
        assert header["t"] == 7
        assert target.tobytes() == payload
        assert link._early_bytes == 0

    run(body())

"""Hostile peers, one test per attack: what each attacker can try, and that it ends in a clear
error or changes nothing — never in a wrong result.

Threat model (docs/security.md): an outsider can connect to any node; an on-path attacker
can read, change, drop, replay and reorder bytes between nodes; a local user of the host can
do both on loopback; a peer that holds the secret is trusted with results but must not be
able to exhaust a node's memory or make it run code it was not told to run.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np
import pytest
from helpers import make_cluster, run, short_timeouts, start_listening

from p2pdl.collectives.op import Operation
from p2pdl.config import NodeConfig
from p2pdl.errors import (
    AuthenticationError,
    ConfigError,
    P2PDLError,
    ProtocolError,
)
from p2pdl.node import Node
from p2pdl.transport import Credentials
from p2pdl.wire import VERSION, encode_frame

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ("127.0.0.1", 0)
SECRET = os.urandom(32)


# ----------------------------------------------------------------------- on-path relay
class Relay:
    """A TCP relay between a dialling rank and the rank it dials. Passive until `arm`ed; then
    it applies `mutate` to the client→server byte stream, once."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.mutate: Callable[[bytes], bytes] | None = None
        self.armed = False
        self.server: asyncio.AbstractServer | None = None
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[:2]

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.tasks.append(asyncio.ensure_future(self._pump(reader, up_writer, True)))
        self.tasks.append(asyncio.ensure_future(self._pump(up_reader, writer, False)))

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool
    ) -> None:
        try:
            while data := await reader.read(1 << 16):
                if upstream and self.armed and self.mutate is not None and len(data) > 300:
                    data, self.mutate = self.mutate(data), None
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in self.tasks:
            task.cancel()


def _flip(data: bytes) -> bytes:
    return data[:200] + bytes([data[200] ^ 0x01]) + data[201:]


def _drop(data: bytes) -> bytes:
    return data[:100] + data[164:]


def _duplicate(data: bytes) -> bytes:
    return data[:100] + data[100:164] + data[100:]


def _reorder(data: bytes) -> bytes:
    return data[:100] + data[164:228] + data[100:164] + data[228:]


def _inject(data: bytes) -> bytes:
    """A plain frame of the attacker's own between two real ones (no key to seal it)."""
    return encode_frame({"t": 5, "d": "allreduce"}, b"\x00" * 8) + data


MUTATIONS = {"flip": _flip, "drop": _drop, "duplicate": _duplicate, "reorder": _reorder,
             "inject": _inject}  # fmt: skip


@pytest.mark.parametrize("attack", sorted(MUTATIONS))
def test_an_on_path_attacker_cannot_change_a_result(attack: str) -> None:
    """Changed, dropped, duplicated, reordered or injected bytes between two ranks: every
    rank either fails with a clear error, or returns the right sum — never a wrong one."""

    async def body() -> list[object]:
        timeouts = short_timeouts(operation=5.0)
        zero = Node(0, [LOCAL, LOCAL], secret=SECRET, timeouts=timeouts)
        starting = await start_listening(zero)
        relay = Relay(zero.address)
        one = Node(1, [await relay.start(), LOCAL], secret=SECRET, timeouts=timeouts)
        try:
            await asyncio.gather(starting, one.start())
            warm = [np.ones(1000, np.float32) for _ in range(2)]
            await asyncio.gather(zero.allreduce(warm[0]), one.allreduce(warm[1]))
            relay.mutate, relay.armed = MUTATIONS[attack], True
            arrays = [np.full(1 << 20, r + 1.0, np.float32) for r in range(2)]
            results = await asyncio.gather(
                zero.allreduce(arrays[0], algorithm="sliced"),
                one.allreduce(arrays[1], algorithm="sliced"),
                return_exceptions=True,
            )
            for result, array in zip(results, arrays, strict=True):
                if not isinstance(result, BaseException):
                    assert np.all(array == 3.0), "a wrong result"
            return list(results)
        finally:
            await asyncio.gather(zero.close(), one.close(), relay.close())

    results = run(body())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors, "the attack went unnoticed"
    assert all(isinstance(e, P2PDLError) for e in errors), errors
    # The rank behind the relay names what happened (dropped bytes may leave it waiting for
    # the rest of a frame: then its deadline names the peer).
    assert any(
        isinstance(e, ProtocolError) or "failed authentication" in str(e) or "timed out" in str(e)
        for e in errors
    ), errors


# ------------------------------------------------------------------- outsiders at startup
def test_an_outsider_claiming_the_awaited_rank_cannot_stop_the_cluster() -> None:
    """A client claims rank 1 and answers the proof with garbage while the real rank 1 has
    not started yet: the leader turns it away and waits on; the real rank 1 joins."""

    async def body() -> None:
        leader = Node(0, [LOCAL, LOCAL], secret=SECRET, timeouts=short_timeouts(connect=20.0))
        starting = await start_listening(leader)
        try:
            for _ in range(3):
                reader, writer = await asyncio.open_connection(*leader.address)
                hello = {
                    "h": "hello", "v": VERSION, "cluster": "p2pdl", "rank": 1, "epoch": 0,
                    "nonce": os.urandom(32), "auth": True, "enc": True,
                }  # fmt: skip
                writer.write(encode_frame(hello))
                writer.write(encode_frame({"h": "proof", "mac": os.urandom(32)}))
                await writer.drain()
                await reader.read()  # the leader closes it
                writer.close()
            assert not starting.done()
            real = Node(1, [leader.address, LOCAL], secret=SECRET)
            await asyncio.gather(starting, real.start())
            arrays = [np.ones(10, np.float32), np.ones(10, np.float32)]
            await asyncio.gather(leader.allreduce(arrays[0]), real.allreduce(arrays[1]))
            assert np.all(arrays[0] == 2.0)
            assert leader.endpoint.listener.rejected >= 3
            await real.close()
        finally:
            await leader.close()

    run(body())


def test_a_storm_of_idle_connections_costs_little_and_joiners_still_join() -> None:
    """1000 idle unauthenticated connections to the leader while nodes join: its memory
    grows by far less than 16 MiB (each costs a few KiB, at most 64 are kept), and the
    cluster forms; the oldest idle ones are dropped as new ones come."""

    async def body() -> None:
        timeouts = short_timeouts(connect=30.0, handshake=5.0)
        leader = Node(world_size=3, secret=SECRET, timeouts=timeouts)
        starting = await start_listening(leader)
        writers: list[asyncio.StreamWriter] = []
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            for _ in range(1000):
                _reader, writer = await asyncio.open_connection(*leader.address)
                writers.append(writer)
            storm, _ = tracemalloc.get_traced_memory()
            joiners = [
                Node(r, leader=leader.address, secret=SECRET, timeouts=timeouts) for r in (1, 2)
            ]
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await asyncio.gather(starting, *(j.start() for j in joiners))
            joined = loop.time() - t0
            assert leader.endpoint.listener.rejected >= 1000 - 64
            assert storm - before < 16 << 20, f"{(storm - before) / 2**20:.1f} MiB for the storm"
            assert joined < 30.0
            for joiner in joiners:
                await joiner.close()
        finally:
            tracemalloc.stop()
            for writer in writers:
                writer.close()
            await leader.close()

    run(body())


def test_the_wrong_secret_fails_the_impostor_fast_enough_and_names_the_reason() -> None:
    async def body() -> None:
        leader = Node(world_size=2, secret=SECRET)
        starting = await start_listening(leader)
        try:
            impostor = Node(1, leader=leader.address, secret=os.urandom(32),
                            timeouts=short_timeouts(connect=1.0))  # fmt: skip
            with pytest.raises(AuthenticationError, match="does not know the shared secret"):
                await impostor.start()
            assert not starting.done()
        finally:
            starting.cancel()
            await leader.close()

    run(body())


# --------------------------------------------------------------- an authenticated peer
def test_an_authenticated_peer_cannot_make_a_receive_allocate_what_it_claims() -> None:
    async def body() -> None:
        async with make_cluster(2) as nodes:
            to0 = nodes[1].session.mesh.link(0)
            at0 = nodes[0].session.mesh.link(1)
            receive = at0.post(123, None, limit=100)  # an unsized receive (a name, an ack)
            await to0.send({"t": 123}, memoryview(bytearray(10 << 20)))
            with pytest.raises(ProtocolError, match="at most 100"):
                await receive
            arrays = [np.ones(10, np.float32) for _ in nodes]
            await asyncio.gather(*(n.allreduce(a) for n, a in zip(nodes, arrays, strict=True)))
            assert np.all(arrays[0] == 2)

    run(body())


@pytest.mark.parametrize(
    "abort",
    [
        {"kind": "mismatch", "ranks": "all", "reason": 5},
        {"kind": "lost", "ranks": [True, 10**9, -1], "reason": ["x"]},
        {"kind": {"nested": 1}, "reason": "x" * 5000},
    ],
)
def test_a_malformed_abort_frame_is_a_typed_error(abort: dict) -> None:
    async def body() -> None:
        async with make_cluster(2) as nodes:
            mesh = nodes[0].session.mesh
            loop = asyncio.get_running_loop()
            op = Operation(mesh, "probe", "probe", loop.time() + 10)
            waiting = asyncio.ensure_future(op.run(lambda: op.recv(1, 0, None)))
            await nodes[1].session.mesh.link(0).send({"t": op.base | ((1 << 24) - 1), **abort})
            with pytest.raises(P2PDLError) as caught:
                await waiting
            assert not isinstance(caught.value, (TypeError, KeyError))
            assert len(str(caught.value)) < 2000

    run(body())


def test_a_control_message_over_the_limit_fails_the_channel() -> None:
    async def body() -> None:
        from p2pdl.rendezvous import ControlChannel

        async with make_cluster(2) as nodes:
            at0 = ControlChannel(nodes[0].session.mesh.link(1), max_message=1024)
            to0 = nodes[1].session.mesh.link(0)
            await to0.send({"t": 1}, memoryview(msgpack.packb({"k": "x", "pad": "y" * 5000})))
            with pytest.raises(ProtocolError, match="exceeds the limit"):
                await at0.recv()

    run(body())


# ---------------------------------------------------------------------- secret hygiene
def test_secrets_are_required_strong_and_never_printed() -> None:
    with pytest.raises(ConfigError, match="without a shared secret"):
        NodeConfig(world_size=2)  # loopback too: any local user could join otherwise
    with pytest.raises(ConfigError, match="at least 16"):
        NodeConfig(world_size=2, secret=b"12345678")
    config = NodeConfig(world_size=2, secret=SECRET)
    assert SECRET.hex() not in repr(config) and repr(SECRET) not in repr(config)
    creds = Credentials("p2pdl", SECRET)
    assert repr(SECRET) not in repr(creds)
    insecure = NodeConfig(world_size=2, insecure=True)
    assert insecure.secret is None


def test_a_secret_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(os.urandom(32).hex())
    path.chmod(0o644)
    done = subprocess.run(
        [sys.executable, "-m", "p2pdl", "node", "--lead", "--nodes", "1", "--secret-file",
         str(path)],
        capture_output=True, text=True, timeout=60, cwd=str(ROOT),
    )  # fmt: skip
    assert done.returncode == 2 and "readable by others" in done.stderr, done.stderr
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    secret = subprocess.run(
        [sys.executable, "-m", "p2pdl", "secret"], capture_output=True, text=True, timeout=60
    )
    assert secret.returncode == 0 and len(bytes.fromhex(secret.stdout.strip())) == 32


def test_the_node_takes_p2pdl_secret_out_of_its_environment(local_cluster) -> None:
    cluster = local_cluster(2, run="tests.workers:environment_secret")
    assert cluster.results() == {0: None, 1: None}


# ------------------------------------------------------------ tasks a worker agrees to
def test_a_worker_runs_only_the_tasks_it_was_told_to_run(tmp_path: Path) -> None:
    from tests.sched_helpers import Procs, write_task

    marker = tmp_path / "imported"
    task_dir = write_task(
        tmp_path / "task",
        comment=f"\nif os.environ.get('MARK_IMPORT'):\n    Path({str(marker)!r}).touch()\n",
    )
    procs = Procs(tmp_path, task_dir)
    try:
        leader = procs.lead("sched_task:task", 2)
        procs.job = None  # the worker is told nothing
        address = leader.wait_event("ready")["address"]
        told_nothing = procs.start("w1", ["--leader", address], {"MARK_IMPORT": "1"})
        assert told_nothing.wait() == 1
        assert "was told to run no task" in told_nothing.err.read_text()
        assert leader.wait() == 1  # the leader does not start without its nodes
        leader = procs.start("leader2", ["--lead", "--job", "sched_task:task", "--nodes", "2"])
        address = leader.wait_event("ready")["address"]
        other = procs.start(
            "w2", ["--leader", address, "--allow-task", "other:task"], {"MARK_IMPORT": "1"}
        )
        assert other.wait() == 1
        assert "--allow-task sched_task:task" in other.err.read_text()
        assert not marker.exists(), "the refused task's module was imported"
        assert leader.wait() == 1
    finally:
        procs.close()

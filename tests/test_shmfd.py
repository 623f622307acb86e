"""Sealed memfd segments and their fd server, tried as a hostile process on the same host would.

Each test plays one attack on the shared-memory path (issue: secure by default, item 7) and
asserts that it is refused with a clear error before anything is mapped, that the server keeps
serving honest holders afterwards, and, in a cluster, that results stay right.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import mmap
import os
import socket
import tempfile

import numpy as np
import pytest
from helpers import make_cluster, on_all, run

from p2pdl.collectives import shmfd

pytestmark = pytest.mark.skipif(
    not hasattr(os, "memfd_create"), reason="no memfd_create on this system"
)

SIZE = 1 << 16


def deadline_in(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


@contextlib.contextmanager
def served(size: int = SIZE):
    """A server offering one sealed segment: (server, offer, the owner's fd)."""
    server = shmfd.FdServer()
    fd = shmfd.sealed_memfd(size)
    try:
        yield server, server.offer(1, fd, size), fd
    finally:
        server.close()
        os.close(fd)


def test_an_honest_holder_of_the_offer_gets_the_same_memory() -> None:
    async def body() -> None:
        with served() as (_server, offer, fd), mmap.mmap(fd, SIZE) as owner:
            owner[:5] = b"hello"
            got = await shmfd.fetch(shmfd.Offer.parse(offer.pack()), deadline_in(5))
            try:
                shmfd.check(got, SIZE)
                with mmap.mmap(got, SIZE, prot=mmap.PROT_READ) as peer:
                    assert peer[:5] == b"hello"
            finally:
                os.close(got)

    run(body())


def test_a_wrong_token_or_a_withdrawn_segment_is_refused_and_the_server_keeps_serving() -> None:
    async def body() -> None:
        with served() as (server, offer, _fd):
            forged = shmfd.Offer(offer.server, offer.segment, offer.size, bytes(32))
            with pytest.raises(ValueError, match="refused: no such segment, or a wrong token"):
                await shmfd.fetch(forged, deadline_in(5))
            guessed = shmfd.Offer(offer.server, offer.segment + 1, offer.size, offer.token)
            with pytest.raises(ValueError, match="refused"):
                await shmfd.fetch(guessed, deadline_in(5))
            got = await shmfd.fetch(offer, deadline_in(5))  # still serving the honest one
            os.close(got)
            server.withdraw(offer.segment)
            with pytest.raises(ValueError, match="refused"):
                await shmfd.fetch(offer, deadline_in(5))

    run(body())


def test_malformed_requests_and_silent_clients_do_not_stop_the_server() -> None:
    async def body() -> None:
        with served() as (_server, offer, _fd):
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as rogue:
                rogue.connect(offer.address)
                rogue.send(b"\xff" * 7)
                assert rogue.recv(256).startswith(b"\x00malformed request")
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as idle:
                idle.connect(offer.address)  # says nothing, then leaves
            got = await shmfd.fetch(offer, deadline_in(5))
            os.close(got)

    run(body())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_a_client_of_another_uid_is_refused_before_its_request_is_read() -> None:
    with served() as (_server, offer, _fd):
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: another user on this host, holding a stolen offer
            os.close(reader)
            answer = b"?"
            try:
                os.setgid(65534)
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                    sock.settimeout(5)
                    sock.connect(offer.address)
                    # The refusal comes before any request is read: nothing to send.
                    message, fds, _flags, _ = socket.recv_fds(sock, 256, 1)
                    answer = message if not fds else b"GOT A DESCRIPTOR"
            except BaseException as exc:
                answer = repr(exc).encode()
            os.write(writer, answer)
            os._exit(0)
        os.close(writer)
        with os.fdopen(reader, "rb") as pipe:
            answer = pipe.read()
        os.waitpid(pid, 0)
        assert answer.startswith(b"\x00uid 65534 is not the owner's uid"), answer


def test_descriptors_that_are_not_sealed_reserved_memfds_of_the_offered_size_are_refused() -> None:
    plain = os.memfd_create("p2pdl-test", os.MFD_CLOEXEC)  # no seals
    os.ftruncate(plain, SIZE)
    os.posix_fallocate(plain, 0, SIZE)
    sparse = os.memfd_create("p2pdl-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(sparse, SIZE)  # sealed but never reserved: SIGBUS on a full cgroup
    fcntl.fcntl(sparse, fcntl.F_ADD_SEALS, shmfd.SEALS)
    sealed = shmfd.sealed_memfd(SIZE)
    with tempfile.TemporaryFile() as regular:
        os.posix_fallocate(regular.fileno(), 0, SIZE)
        cases = {
            plain: "not sealed against shrinking",
            sparse: "pages are not reserved",
            regular.fileno(): "not sealed|cannot be sealed",
        }
        try:
            for fd, reason in cases.items():
                with pytest.raises(ValueError, match=reason):
                    shmfd.check(fd, SIZE)
            with pytest.raises(ValueError, match=f"offered as {2 * SIZE}"):
                shmfd.check(sealed, 2 * SIZE)  # a peer that overstates its size
            shmfd.check(sealed, SIZE)
        finally:
            for fd in (plain, sparse, sealed):
                os.close(fd)
    pipe_r, pipe_w = os.pipe()
    try:
        with pytest.raises(ValueError, match="not a regular file"):
            shmfd.check(pipe_r, SIZE)
    finally:
        os.close(pipe_r)
        os.close(pipe_w)


def test_a_sealed_segment_cannot_be_shrunk_under_a_reader() -> None:
    """The attack that killed readers with SIGBUS: the owner truncates what they map."""
    fd = shmfd.sealed_memfd(SIZE)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 2 * SIZE)
        with pytest.raises(PermissionError):  # and the seals cannot be lifted or added to
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        assert os.fstat(fd).st_size == SIZE
    finally:
        os.close(fd)


def test_peers_map_each_others_segments_read_only() -> None:
    async def body() -> None:
        async with make_cluster(2) as nodes:
            arrays = [np.full(1 << 18, 1.0, np.float32) for _ in nodes]
            await on_all(nodes, lambda node: node.allreduce(arrays[node.rank], algorithm="shm"))
            peer = nodes[0].collectives.shm.peers[1]
            view = peer.half(0, np.dtype(np.float32), 4)
            assert not view.flags.writeable
            with pytest.raises(TypeError):
                peer._map[0:1] = b"\x00"  # the mapping itself refuses writes

    run(body())


def test_a_rank_offering_an_unsealed_segment_is_refused_and_everyone_runs_sliced() -> None:
    """A hostile rank hands out a memfd it could shrink at will: its peers refuse to map
    it, every rank agrees that shared memory is not usable, and results stay right."""
    n, size = 3, 300_000

    def unsealed(nbytes: int) -> int:
        fd = os.memfd_create("p2pdl-segment", os.MFD_CLOEXEC)
        os.ftruncate(fd, nbytes)
        os.posix_fallocate(fd, 0, nbytes)
        return fd

    async def body() -> None:
        async with make_cluster(n) as nodes:
            hostile = nodes[1].collectives.shm
            hostile.close()  # from now on it hands out segments it could shrink
            hostile.make_fd = unsealed
            for node in nodes:
                node.collectives.shm.usable = None  # probe again, as a new group would
            arrays = [np.full(size, float(node.rank), np.float32) for node in nodes]
            await on_all(nodes, lambda node: node.allreduce(arrays[node.rank]))
            assert all(np.all(a == 0.0 + 1.0 + 2.0) for a in arrays)
            assert [node.collectives.shm.usable for node in nodes] == [False] * n
            assert [node.collectives.last_algorithm for node in nodes] == ["sliced"] * n

    run(body())

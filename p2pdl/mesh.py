"""The listening server and the full mesh of authenticated links of one membership epoch.

Each pair of ranks shares one connection: the higher rank dials the lower one. The server
keeps accepting after startup so that misbehaving clients are turned away one by one while
established links carry on, and so that a leader can take join requests.

Outsiders cannot disrupt it: a connection that has not authenticated costs a few KiB and
one task, at most `limits.max_unauthenticated` of them are open at once (the oldest goes
first when more arrive, so a flood cannot lock real peers out for long), each has
`timeouts.handshake` to finish, and a failed handshake touches no shared state: it is
counted and remembered, and named if the node later times out waiting for a rank.
Dialers retry refused and failed connections until their deadline.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import resource
from collections.abc import Awaitable, Callable
from typing import Any

from p2pdl.config import Limits, Timeouts
from p2pdl.errors import (
    AuthenticationError,
    CollectiveTimeoutError,
    ConfigError,
    P2PDLError,
    PeerLostError,
    ProtocolError,
)
from p2pdl.transport import Credentials, Link, Offload, accept_handshake, dial_handshake

log = logging.getLogger("p2pdl.mesh")

JoinHandler = Callable[[Link, dict[str, Any]], Awaitable[None]]


class Listener:
    """A TCP server whose accepted connections must authenticate before anything else."""

    def __init__(self, creds: Credentials, limits: Limits, timeouts: Timeouts) -> None:
        self.creds = creds
        self.limits = limits
        self.timeouts = timeouts
        self.rank = -1
        self.address: tuple[str, int] = ("", 0)
        self._server: asyncio.AbstractServer | None = None
        self._expected: dict[int, asyncio.Future[Link]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._open_links: set[Link] = set()
        self.join_handler: JoinHandler | None = None
        self.mesh_epoch = 0
        """Membership epoch whose mesh links are admitted (a new epoch means a new mesh)."""
        self._configured: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.rejected = 0
        """How many connections were turned away (bad handshakes, garbage, timeouts)."""
        self.refusals: collections.deque[str] = collections.deque(maxlen=8)
        """The latest refusals, for timeout messages (what a client claimed is unverified)."""
        self._unauthenticated: dict[Link, None] = {}
        """Connections still in their handshake, oldest first."""

    async def start(self, host: str, port: int) -> tuple[str, int]:
        raise_fd_limit()
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                self._make_link, host, port, reuse_address=True, backlog=128
            )
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        sockname = self._server.sockets[0].getsockname()
        self.address = (host, int(sockname[1]))
        return self.address

    def _make_link(self) -> Link:
        link = Link(self.limits, label="unauthenticated client")
        while len(self._unauthenticated) >= self.limits.max_unauthenticated:
            oldest = next(iter(self._unauthenticated))
            del self._unauthenticated[oldest]
            self._refused(oldest, "evicted: too many connections in their handshake")
            oldest.close()
        self._unauthenticated[link] = None
        task = asyncio.ensure_future(self._serve(link))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return link

    def prepare(self, epoch: int, rank: int, world_size: int) -> None:
        """Expect the higher ranks of membership `epoch` before anyone dials them (what was
        expected for an earlier epoch is forgotten)."""
        for future in self._expected.values():
            if not future.done():
                future.cancel()
        self._expected.clear()
        self.mesh_epoch = epoch
        self.configure(rank)
        for peer in range(rank + 1, world_size):
            self.expect(peer)

    def configure(self, rank: int) -> None:
        """This node's rank is known: answer peers' handshakes from now on."""
        self.rank = rank
        if not self._configured.done():
            self._configured.set_result(None)

    async def _own_rank(self, hello: dict[str, Any]) -> int:
        if hello.get("rank") == -1 and hello.get("join"):
            return 0  # only the leader, rank 0, takes join requests
        await self._configured
        return self.rank

    def expect(self, rank: int) -> asyncio.Future[Link]:
        """A future for the authenticated link that `rank` will dial in on."""
        future = self._expected.get(rank)
        if future is None or future.done():
            future = asyncio.get_running_loop().create_future()
            self._expected[rank] = future
        return future

    def _admit(self, hello: dict[str, Any]) -> dict[str, Any]:
        rank = hello["rank"]
        if rank == -1 and hello.get("join") and self.join_handler is not None:
            return {}
        epoch = hello.get("epoch", 0)
        if epoch != self.mesh_epoch:
            # A peer that is ahead (it heard of the new epoch first) dials again; one that
            # is behind dials for a membership that is over.
            ahead = isinstance(epoch, int) and epoch > self.mesh_epoch
            raise AuthenticationError(
                f"rank {rank} dials for membership epoch {epoch!r}, "
                f"this node is in epoch {self.mesh_epoch}",
                rank=rank,
                retry=ahead,
            )
        future = self._expected.get(rank)
        if future is None:
            raise ProtocolError(f"rank {rank} is not expected to connect to rank {self.rank}")
        if future.done():
            raise ProtocolError(f"rank {rank} is already connected")
        return {}

    def _refused(self, link: Link, why: str) -> None:
        self.rejected += 1
        source = f"{link.peer_address[0]}:{link.peer_address[1]}" if link.peer_address else "?"
        self.refusals.append(f"{source}: {why}")
        log.info("turned away a connection from %s: %s", source, why)

    async def _serve(self, link: Link) -> None:
        self._open_links.add(link)
        try:
            async with asyncio.timeout(self.timeouts.handshake):
                hello = await accept_handshake(link, self.creds, self._own_rank, self._admit)
        except (P2PDLError, TimeoutError) as exc:
            # Nothing shared changes: the rank this client claimed is still awaited.
            if link in self._unauthenticated:  # (an evicted one was counted already)
                self._refused(link, str(exc) or "handshake timed out")
            link.close()
            self._open_links.discard(link)
            self._unauthenticated.pop(link, None)
            return
        finally:
            self._unauthenticated.pop(link, None)
        if hello["rank"] == -1 and self.join_handler is not None:
            await self.join_handler(link, hello)
            return
        future = self._expected[hello["rank"]]
        if future.done():
            link.close()
        else:
            future.set_result(link)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for link in list(self._open_links):
            if not link.authenticated:
                link.close()
        for task in list(self._tasks):
            task.cancel()
        for future in self._expected.values():
            if not future.done():
                future.cancel()


async def dial(
    host: str,
    port: int,
    limits: Limits,
    deadline: float,
    *,
    label: str,
) -> Link:
    """Connect to host:port, retrying refused connections until `deadline` (loop time)."""
    loop = asyncio.get_running_loop()
    delay = 0.01
    while True:
        try:
            _transport, link = await loop.create_connection(
                lambda: Link(limits, label=label, dialing=True), host, port
            )
            return link
        except OSError as exc:
            if loop.time() + delay >= deadline:
                raise PeerLostError([], f"cannot reach {label} at {host}:{port}: {exc}") from None
            await asyncio.sleep(delay)  # back-off between connection attempts, not a sync point
            delay = min(delay * 2, 0.5)


async def dial_authenticated(
    host: str,
    port: int,
    creds: Credentials,
    limits: Limits,
    deadline: float,
    *,
    rank: int,
    expect: int,
    extra: dict[str, Any],
) -> Link:
    """An authenticated link to the node at host:port, trying again until `deadline`.

    Refused connections, connections dropped mid-handshake (the peer restarting, or evicting
    us from a flood of others) and refusals — a peer that is not there yet, or a node at that
    address that cannot prove the secret — are all retried: the real peer may still come.
    At the deadline the latest reason is the error.
    """
    loop = asyncio.get_running_loop()
    allowed = max(0.0, deadline - loop.time())
    label = "the leader" if rank == -1 else f"rank {expect}"
    delay = 0.01
    attempts = 0
    last: P2PDLError | None = None
    while True:
        attempts += 1
        try:
            link = await dial(host, port, limits, deadline, label=label)
        except PeerLostError as exc:  # refused until the deadline
            last = exc
            break
        try:
            async with asyncio.timeout_at(deadline):
                await dial_handshake(link, creds, rank, expect, extra)
            return link
        except TimeoutError:
            link.close()
            break
        except (PeerLostError, AuthenticationError, ProtocolError) as exc:
            link.close()
            last = exc
        if loop.time() + delay >= deadline:
            break
        await asyncio.sleep(delay)  # back-off between attempts, not a synchronisation point
        delay = min(delay * 2, 0.25)
    if isinstance(last, AuthenticationError) and not last.retry:
        raise AuthenticationError(
            f"could not authenticate {label} at {host}:{port} within {allowed:.3g}s "
            f"({attempts} attempts): {last}",
            rank=expect if expect >= 0 else None,
        )
    raise CollectiveTimeoutError(
        f"connecting to {label} at {host}:{port}",
        allowed,
        [expect] if expect >= 0 else [0],
        detail=f" ({attempts} attempts; the last: {last})" if last else "",
    )


def raise_fd_limit() -> None:
    """Raise the soft open-file limit to the hard one (a flood of connections must run out
    of our caps, not of file descriptors)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):
        pass


class Mesh:
    """Authenticated links from this rank to every other rank of one epoch."""

    def __init__(
        self,
        rank: int,
        addresses: list[tuple[str, int]],
        listener: Listener,
        timeouts: Timeouts,
        epoch: int = 0,
        offload: Offload | None = None,
    ) -> None:
        self.epoch = epoch
        self.offload = offload
        """Where the links seal and open large payloads (the session's reduce threads)."""
        self.rank = rank
        self.addresses = addresses
        self.world_size = len(addresses)
        self.listener = listener
        self.timeouts = timeouts
        self.links: dict[int, Link] = {}
        self.lost: dict[int, P2PDLError] = {}
        self._watchers: list[Callable[[int, P2PDLError], None]] = []
        self._op_counter = 0

    def next_op_id(self) -> int:
        """Collectives are numbered in call order; every rank must call them in one order."""
        self._op_counter += 1
        return self._op_counter

    async def connect(self, deadline: float | None = None) -> None:
        """Dial lower ranks and wait for higher ones, by `deadline` (loop time; default
        `timeouts.connect` from now)."""
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.timeouts.connect
        allowed = max(0.0, deadline - loop.time())
        incoming = {r: self.listener.expect(r) for r in range(self.rank + 1, self.world_size)}
        self.listener.configure(self.rank)
        dials = {r: asyncio.ensure_future(self._dial(r, deadline)) for r in range(self.rank)}
        pending: dict[int, asyncio.Future[Link]] = {**incoming, **dials}
        try:
            async with asyncio.timeout_at(deadline):
                for rank, future in pending.items():
                    self._adopt(rank, await future)
        except TimeoutError:
            missing = [r for r, f in pending.items() if not f.done() or f.cancelled()]
            refused = list(self.listener.refusals)
            detail = (
                f"; meanwhile {self.listener.rejected} connection(s) were turned away, the "
                f"latest: {'; '.join(refused[-3:])}"
                if refused
                else ""
            )
            raise CollectiveTimeoutError(
                f"rank {self.rank} connecting to the cluster", allowed, missing, detail=detail
            ) from None
        finally:
            for future in pending.values():
                if not future.done():
                    future.cancel()

    async def _dial(self, rank: int, deadline: float) -> Link:
        host, port = self.addresses[rank]
        return await dial_authenticated(
            host,
            port,
            self.listener.creds,
            self.listener.limits,
            deadline,
            rank=self.rank,
            expect=rank,
            extra={"epoch": self.epoch},
        )

    def _adopt(self, rank: int, link: Link) -> None:
        self.links[rank] = link
        link.offload = self.offload
        link.on_lost = lambda lost: self._on_lost(rank, lost)
        if link.lost is not None:
            self._on_lost(rank, link)

    def _on_lost(self, rank: int, link: Link) -> None:
        error = link.lost or PeerLostError([rank])
        if not isinstance(error, (PeerLostError, ProtocolError)):
            error = PeerLostError([rank], str(error))
        if rank in self.lost:
            return
        self.lost[rank] = error
        for watcher in list(self._watchers):
            watcher(rank, error)

    def watch(self, callback: Callable[[int, P2PDLError], None]) -> Callable[[], None]:
        """Call `callback(rank, error)` when a link is lost; returns the unsubscribe function."""
        self._watchers.append(callback)
        return lambda: self._watchers.remove(callback) if callback in self._watchers else None

    def link(self, rank: int) -> Link:
        """The link to `rank`, also once it is lost: frames it delivered before it went stay
        receivable, and everything else fails with the link's error."""
        return self.links[rank]

    async def close(self) -> None:
        """Close every link politely (`Link.shutdown`), all within the shutdown timeout."""
        links = list(self.links.values())
        if links:
            await asyncio.gather(*(link.shutdown(self.timeouts.shutdown) for link in links))

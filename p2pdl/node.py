"""`Node`: one rank of a p2pdl cluster, for asyncio programs — a facade over its session.

    async with p2pdl.Node(rank=0, peers=[("127.0.0.1", 29500), ...], secret=b"...") as node:
        await node.allreduce(array)

A node listens, finds its peers (static table, a leader to join, or the environment: see
`NodeConfig`), forms the session of membership epoch 0 and offers the collectives over the
current session. A reconfiguration (`enter`: the job runtime's epochs) replaces the session
through the one path every session is formed by. The node does not pick the event loop:
entry points do (uvloop in the CLI and examples).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from p2pdl.collectives.api import Collectives, OutsideGroup
from p2pdl.collectives.compute import Compute
from p2pdl.collectives.context import OnSlice
from p2pdl.config import Limits, NodeConfig, Timeouts
from p2pdl.membership import Membership
from p2pdl.rendezvous import ControlChannel, JoinDesk
from p2pdl.session import Endpoint, Session

__all__ = ["Node"]

log = logging.getLogger("p2pdl.node")


class Node:
    """One rank: an endpoint and its current session, as an async context manager.

    `Node(rank, peers, **settings)`, `Node(config=NodeConfig(...))` or `Node.from_env()`;
    the settings are `NodeConfig`'s fields.
    """

    def __init__(
        self,
        rank: int | None = None,
        peers: Any = None,
        *,
        config: NodeConfig | None = None,
        **settings: Any,
    ) -> None:
        if rank is not None:
            settings["rank"] = rank
        if peers is not None:
            settings["peers"] = peers
        self.config = NodeConfig.build(config, **settings)
        self.endpoint = Endpoint(self.config)
        self._session: Session | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **settings: Any) -> Node:
        """A node configured from P2PDL_* (or torchrun's) variables; `settings` win."""
        return cls(config=NodeConfig.from_env(os.environ if env is None else env, **settings))

    @property
    def timeouts(self) -> Timeouts:
        return self.config.timeouts

    @property
    def limits(self) -> Limits:
        return self.config.limits

    # ------------------------------------------------------------------------ lifecycle
    async def listen(self, on_listening: Callable[[tuple[str, int]], None] | None = None) -> Any:
        """Start listening; `on_listening(address)` is told the real address at once (a
        leader on port 0 uses it to tell the others where it is)."""
        address = await self.endpoint.open()
        if on_listening is not None:
            on_listening(address)
        return address

    async def start(self, on_listening: Callable[[tuple[str, int]], None] | None = None) -> Node:
        """Listen, find the peers, and form the session of membership epoch 0."""
        try:
            await self.listen(on_listening)
            membership, rank = await self.endpoint.bootstrap()
            await self.enter(membership, rank)
        except BaseException:
            await self.close()
            raise
        return self

    async def enter(
        self,
        membership: Membership,
        rank: int,
        *,
        deadline: float | None = None,
        compute: Compute | None = None,
    ) -> Session:
        """Leave the current session (if any) and form the one of `membership`."""
        await self.leave()
        self._session = await self.endpoint.form(
            membership, rank, deadline=deadline, compute=compute
        )
        return self._session

    async def leave(self) -> None:
        """Close the current session (links and shared memory); keep listening."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def close(self) -> None:
        """Close the session politely and stop listening; pending operations fail with
        PeerLostError."""
        try:
            await self.leave()
        finally:
            await self.endpoint.close()

    async def __aenter__(self) -> Node:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -------------------------------------------------------------------- joining (jobs)
    def join_desk(self) -> JoinDesk:
        """Take join requests (a job leader): each joiner becomes a control channel."""
        return self.endpoint.join_desk()

    async def dial_leader(self, deadline: float) -> ControlChannel:
        """Join the configured leader; the control channel, with the join message sent."""
        return await self.endpoint.dial_leader(self.config.rank, deadline)

    # ----------------------------------------------------------------------- identity
    @property
    def session(self) -> Session:
        if self._session is None:
            raise RuntimeError("use the node inside 'async with' (or after await node.start())")
        return self._session

    @property
    def has_session(self) -> bool:
        return self._session is not None

    @property
    def collectives(self) -> Collectives:
        """The current session's collectives."""
        return self.session.collectives

    @property
    def rank(self) -> int:
        if self._session is not None:
            return self._session.rank
        if self.config.mode != "join" and self.config.rank is not None:
            return self.config.rank
        raise RuntimeError("the node has not joined its cluster yet")

    @property
    def world_size(self) -> int:
        if self._session is not None:
            return self._session.world_size
        if self.config.world_size is None:
            raise RuntimeError("the node has not joined its cluster yet")
        return self.config.world_size

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) this node actually listens on."""
        return self.endpoint.address

    # -------------------------------------------------------------------- collectives
    async def allreduce(
        self,
        array: Any,
        op: str = "sum",
        algorithm: str = "auto",
        *,
        compression: str | None = None,
        premul: float | None = None,
        on_slice: OnSlice | None = None,
        on_chunk: OnSlice | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Reduce `array` (or a list of local buffers) across ranks, in place (sum, mean,
        min, max, prod; see `Collectives.allreduce`).

        Every algorithm reduces in a fixed order, so results are bit-identical on every rank
        and from run to run.
        """
        await self.collectives.allreduce(
            array,
            op=op,
            premul=premul,
            algorithm=algorithm,
            compression=compression,
            on_slice=on_slice,
            on_chunk=on_chunk,
            timeout=timeout,
        )
        return array

    async def reduce_scatter(
        self,
        array: Any,
        op: str = "sum",
        *,
        on_slice: OnSlice | None = None,
        timeout: float | None = None,
    ) -> tuple[int, int]:
        """Reduce into this rank's slice of `array`; returns that slice's (start, stop)."""
        return await self.collectives.reduce_scatter(
            array, op=op, on_slice=on_slice, timeout=timeout
        )

    async def allgather(self, array: Any, *, timeout: float | None = None) -> Any:
        """Copy every rank's slice of `array` to every rank, in place."""
        await self.collectives.allgather(array, timeout=timeout)
        return array

    async def broadcast(self, array: Any, root: int = 0, *, timeout: float | None = None) -> Any:
        """Copy `array` from `root` to every rank, in place."""
        await self.collectives.broadcast(array, root=root, timeout=timeout)
        return array

    async def barrier(self, *, timeout: float | None = None) -> None:
        """Wait until every rank has reached the barrier."""
        await self.collectives.barrier(timeout=timeout)

    async def reduce(
        self,
        array: Any,
        *,
        root: int = 0,
        op: str = "sum",
        premul: float | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Reduce every rank's `array` into root's; the others' stay unchanged."""
        await self.collectives.reduce(array, root=root, op=op, premul=premul, timeout=timeout)
        return array

    async def allgather_into(self, output: Any, input: Any, *, timeout: float | None = None) -> Any:
        """Rank i's `input` lands at output[i*m:(i+1)*m] on every rank."""
        await self.collectives.allgather_into(output, input, timeout=timeout)
        return output

    async def allgather_list(
        self, outputs: Sequence[Any], input: Any, *, timeout: float | None = None
    ) -> Any:
        """outputs[i] receives rank i's `input` (sizes may differ per rank)."""
        await self.collectives.allgather_list(outputs, input, timeout=timeout)
        return outputs

    async def reduce_scatter_into(
        self,
        output: Any,
        input: Any,
        *,
        op: str = "sum",
        premul: float | None = None,
        timeout: float | None = None,
    ) -> Any:
        """`output` gets the reduction of every rank's rank-th part of `input`."""
        await self.collectives.reduce_scatter_into(
            output, input, op=op, premul=premul, timeout=timeout
        )
        return output

    async def reduce_scatter_list(
        self,
        output: Any,
        inputs: Sequence[Any],
        *,
        op: str = "sum",
        premul: float | None = None,
        timeout: float | None = None,
    ) -> Any:
        """`output` gets the reduction of every rank's inputs[rank] (uneven sizes allowed)."""
        await self.collectives.reduce_scatter_list(
            output, inputs, op=op, premul=premul, timeout=timeout
        )
        return output

    async def gather(
        self,
        input: Any,
        outputs: Sequence[Any] | None = None,
        *,
        root: int = 0,
        timeout: float | None = None,
    ) -> Any:
        """On `root`, outputs[i] receives rank i's `input`; the others pass no outputs."""
        await self.collectives.gather(input, outputs, root=root, timeout=timeout)
        return outputs

    async def scatter(
        self,
        output: Any,
        inputs: Sequence[Any] | None = None,
        *,
        root: int = 0,
        timeout: float | None = None,
    ) -> Any:
        """Root's inputs[i] lands in rank i's `output`; the others pass no inputs."""
        await self.collectives.scatter(output, inputs, root=root, timeout=timeout)
        return output

    async def alltoall(
        self,
        output: Any,
        input: Any,
        *,
        output_splits: Sequence[int] | None = None,
        input_splits: Sequence[int] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Part j of `input` goes to rank j, into its `output` at part `rank` (splits in
        elements; None: equal parts)."""
        await self.collectives.alltoall(
            output,
            input,
            output_splits=output_splits,
            input_splits=input_splits,
            timeout=timeout,
        )
        return output

    async def alltoall_list(
        self, outputs: Sequence[Any], inputs: Sequence[Any], *, timeout: float | None = None
    ) -> Any:
        """inputs[j] goes to rank j, into its outputs[rank]."""
        await self.collectives.alltoall_list(outputs, inputs, timeout=timeout)
        return outputs

    async def allreduce_coalesced(
        self,
        arrays: Sequence[Any],
        *,
        op: str = "sum",
        premul: float | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Reduce several buffers of one element type as one call, in place."""
        await self.collectives.allreduce_coalesced(arrays, op=op, premul=premul, timeout=timeout)
        return arrays

    async def allgather_into_coalesced(
        self, outputs: Sequence[Any], inputs: Sequence[Any], *, timeout: float | None = None
    ) -> Any:
        """`allgather_into(outputs[i], inputs[i])` for every i, as one call."""
        await self.collectives.allgather_into_coalesced(outputs, inputs, timeout=timeout)
        return outputs

    async def send(
        self, array: Any, dst: int, *, tag: int = 0, timeout: float | None = None
    ) -> None:
        """Send `array` to rank `dst` (matched in order by its `recv` from this rank)."""
        await self.collectives.send(array, dst, tag=tag, timeout=timeout)

    async def recv(
        self, array: Any, src: int, *, tag: int = 0, timeout: float | None = None
    ) -> Any:
        """Receive the next message of rank `src` into `array`."""
        await self.collectives.recv(array, src, tag=tag, timeout=timeout)
        return array

    async def recv_any(self, array: Any, *, tag: int = 0, timeout: float | None = None) -> int:
        """Receive into `array` the next message of whichever rank's arrives first (same
        tag, size and dtype); returns the sender's rank."""
        return await self.collectives.recv_any(array, tag=tag, timeout=timeout)

    def subgroup(self, ranks: Sequence[int]) -> Collectives | OutsideGroup:
        """Collectives over `ranks` of the current session (see `Collectives.subgroup`)."""
        return self.collectives.subgroup(ranks)

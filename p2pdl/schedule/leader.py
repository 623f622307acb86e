"""The leader: admits nodes, plans and pushes iteration groups, and handles every boundary.

The leader is rank 0's node; its own worker trains like any other, talking to this
coordinator through an in-process channel. The coordinator is never on the per-step path:

* it pushes group g+1 (up to `lookahead` groups ahead) while g runs, and commits a group
  when every rank has reported it (reports arrive asynchronously, once per group);
* in BSP mode it plans one step at a time and pushes the next only after every rank
  reported the last: one leader round trip per step, the baseline;
* `group_size="auto"` asks `GroupSizeController` after every committed group and logs why;
* membership changes happen only at boundaries: a node that joins waits until the groups
  already pushed are done, then a new membership epoch includes it;
* a failure (a member's control channel lost, or a member reporting a failed collective)
  aborts the running group; every reconfiguration (after a failure, or to admit joiners at
  a boundary) goes through one path: every member stops and says which boundaries it holds
  (and which pieces of the sharded optimizer state), `decisions.choose_rollback` picks the
  latest boundary all of them hold and whose state they can rebuild together, and a new
  epoch (new session, ranks re-numbered by `decisions.plan_members`) is formed if at least
  `min_nodes` remain; the steps after that boundary are planned again — the planner covers
  the same samples, so none is lost or counted twice (the accounting travels in-band with
  the gradients and is rolled back with the weights);
* checkpoints: every `checkpoint_every` groups (and the last) the group is marked; at its
  boundary the members gather the optimizer state and rank 0 writes it;
* stall inspector: workers tell the leader when a step made no progress for T seconds; the
  leader logs which ranks the others are waiting for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from p2pdl.config import Timeouts
from p2pdl.errors import P2PDLError, ProtocolError
from p2pdl.membership import Membership, PeerAddress
from p2pdl.rendezvous import Channel, parse_join
from p2pdl.schedule.decisions import (
    Holding,
    Piece,
    Rollback,
    choose_rollback,
    holdings_from_wire,
    plan_members,
)
from p2pdl.schedule.errors import JobError
from p2pdl.schedule.group_size import GroupSizeController
from p2pdl.schedule.job import Job
from p2pdl.schedule.model import ModelState
from p2pdl.schedule.plan import IterationGroup, epoch_permutation, plan_groups
from p2pdl.schedule.protocol import LOST as _LOST
from p2pdl.schedule.protocol import check, counted

log = logging.getLogger("p2pdl.schedule.leader")


@dataclass(eq=False)
class NodeHandle:
    """A node as the leader sees it: its control channel, address and current rank."""

    node_id: int
    channel: Channel
    addr: tuple[str, int] | None = None
    state: str = "joining"
    """joining → setup (digest checked) → ready (set up, waiting for a boundary) → member."""
    rank: int = -1
    dead: bool = False
    pump: asyncio.Task[None] | None = None

    def label(self) -> str:
        return f"rank {self.rank}" if self.rank >= 0 else f"node {self.node_id}"


@dataclass
class _Track:
    plan: IterationGroup
    reports: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LeaderSettings:
    nodes: int
    lookahead: int
    bsp: bool
    group_size: int | str
    timeouts: Timeouts
    start_timeout: float
    leader_timeout: float
    controller: GroupSizeController = field(default_factory=GroupSizeController)
    checkpoint_every: int | None = None
    """Mark every this many groups (and the last) for a checkpoint; None: never."""


class Leader:
    """The coordinator of one job (see the module docstring)."""

    def __init__(
        self,
        *,
        job: Job,
        digest: str,
        params: int,
        optimizer: dict[str, Any],
        settings: LeaderSettings,
        local_channel: Channel,
        local_address: tuple[str, int],
        model: ModelState,
        emit: Callable[..., None],
        resumed: bool = False,
    ) -> None:
        self.job = job
        self.digest = digest
        self.params = params
        self.optimizer = optimizer
        self.settings = settings
        self.model = model
        self.emit = emit
        self.inbox: asyncio.Queue[tuple[NodeHandle, dict[str, Any]]] = asyncio.Queue()
        local = NodeHandle(0, local_channel, local_address, state="ready")
        self.local = local
        self.handles: list[NodeHandle] = [local]
        self.members: list[NodeHandle] = []
        self._next_id = 1
        self.epoch = -1
        self.membership: Membership | None = None
        self.start_step = model.next_step
        self.committed = model.next_step
        self.next_plan = model.next_step
        self.next_gid = 0
        self.inflight: dict[int, _Track] = {}
        controller = settings.controller
        if settings.bsp:
            self.size = 1
        elif settings.group_size == "auto":
            decision = controller.first()
            self.size = decision.size
            log.info("group size: %s", decision.reason)
        else:
            self.size = int(settings.group_size)
        self.decisions: list[dict[str, Any]] = []
        self.recoveries: list[dict[str, Any]] = []
        self.stalls: dict[tuple[int, int], dict[int, str]] = {}
        self.draining = False
        self.starting = True
        self.steps_run = 0
        self.groups_pushed = 0
        self.rank_time: dict[str, float] = {
            "t_wait": 0.0,
            "t_compute": 0.0,
            "t_reduce": 0.0,
            "t_boundary": 0.0,
        }
        self.reports = 0
        self.counted_closed = 0
        self.resumed = resumed
        """The leader's model starts from a checkpoint (its full state is handed out)."""
        self._pump(local)

    # ---------------------------------------------------------------- node admission
    def admit(self, channel: Channel) -> None:
        """A node joined (its channel's first message says where it listens): track it."""
        handle = NodeHandle(self._next_id, channel)
        channel.peer_label = f"node {self._next_id}"
        self._next_id += 1
        self.handles.append(handle)
        self._pump(handle)

    def _pump(self, handle: NodeHandle) -> None:
        async def pump() -> None:
            try:
                while True:
                    message = check(await handle.channel.recv(), sender=handle.label())
                    self.inbox.put_nowait((handle, message))
            except P2PDLError as exc:
                self.inbox.put_nowait((handle, {"k": _LOST, "error": str(exc)}))

        handle.pump = asyncio.ensure_future(pump())

    def _drop(self, handle: NodeHandle, why: str) -> None:
        if handle.dead:
            return
        handle.dead = True
        self.counted_closed += counted(handle.channel)
        log.warning("leader: dropping %s (%s)", handle.label(), why)
        if handle is not self.local:
            handle.channel.close()
            if handle.pump is not None:
                handle.pump.cancel()

    def _ready_joiners(self) -> list[NodeHandle]:
        return [h for h in self.handles if h.state == "ready" and not h.dead]

    async def _common(self, handle: NodeHandle, message: dict[str, Any]) -> None:
        """Messages that mean the same in every state of the leader."""
        kind = message["k"]
        if kind == _LOST:
            if handle is self.local:
                raise JobError(f"the leader's own worker stopped: {message['error']}")
            if not handle.dead:
                self._drop(handle, message["error"])
        elif kind == "join":
            await self._on_join(handle, message)
        elif kind == "hello":
            await self._on_hello(handle, message)
        elif kind == "setup_done":
            await self._on_setup_done(handle, message)
        elif kind == "stall":
            self._on_stall(handle, message)

    async def _stop_job(self, reason: str) -> NoReturn:
        """End the job on every node with `reason` (an error no recovery can get past)."""
        log.error("leader: stopping the job: %s", reason)
        for handle in self.members:
            if handle is not self.local and not handle.dead:
                with contextlib.suppress(P2PDLError):
                    await handle.channel.send({"k": "error", "reason": reason})
        raise JobError(reason)

    async def _reject(self, handle: NodeHandle, reason: str) -> None:
        log.error("leader: rejecting %s: %s", handle.label(), reason)
        with contextlib.suppress(P2PDLError):
            await handle.channel.send({"k": "error", "reason": reason})
        self._drop(handle, reason)
        if self.starting:
            raise JobError(reason)

    async def _on_join(self, handle: NodeHandle, message: dict[str, Any]) -> None:
        """The join protocol's first message: where the node listens. Send it the job."""
        try:
            address, _rank = parse_join(message)
        except ProtocolError as exc:
            self._drop(handle, str(exc))
            return
        handle.addr = address
        await self._send(
            handle,
            {
                "k": "job",
                "job": self.job.to_wire(),
                "node_id": handle.node_id,
                "digest": self.digest,
            },
        )

    async def _on_hello(self, handle: NodeHandle, message: dict[str, Any]) -> None:
        where = f"node at {handle.addr[0]}:{handle.addr[1]}" if handle.addr else "a node"
        if message["error"] is not None:
            await self._reject(handle, f"{where} cannot run the job: {message['error']}")
            return
        if handle.addr is None:
            await self._reject(handle, f"{where} did not say where it listens")
            return
        if message["digest"] != self.digest:
            await self._reject(
                handle,
                f"task digest mismatch: {where} has sha256 {message['digest']} of "
                f"{self.job.task.partition(':')[0]}'s source, the leader has {self.digest}; "
                "every node must run the same task code",
            )
            return
        handle.state = "setup"
        await handle.channel.send({"k": "welcome"})

    async def _on_setup_done(self, handle: NodeHandle, message: dict[str, Any]) -> None:
        if message["error"] is not None:
            await self._reject(handle, f"{handle.label()} failed in task setup: {message['error']}")
            return
        if message["params"] != self.params or message["optimizer"] != self.optimizer:
            await self._reject(
                handle,
                f"{handle.label()} built a model of {message['params']} weights with optimizer "
                f"{message['optimizer']}, the leader {self.params} with {self.optimizer}",
            )
            return
        handle.state = "ready"
        if not self.starting:
            log.info("leader: %s is set up and joins at the next boundary", handle.label())
            self.emit("joining", node=handle.node_id, after_step=self.committed)

    def _on_stall(self, handle: NodeHandle, message: dict[str, Any]) -> None:
        if message["epoch"] != self.epoch or handle.rank < 0:
            return
        key = (message["epoch"], message["step"])
        stalled = self.stalls.setdefault(key, {})
        stalled[handle.rank] = message["phase"]
        world = len(self.members)
        in_reduce = sorted(r for r, p in stalled.items() if p == "allreduce")
        waiting_for = sorted(r for r in range(world) if r not in in_reduce)
        log.warning(
            "stall inspector: step %d made no progress for %.1fs on rank %d (%s); ranks %s "
            "are waiting in the allreduce, waiting for rank(s) %s",
            message["step"],
            message["seconds"],
            handle.rank,
            message["phase"],
            in_reduce,
            waiting_for,
        )
        self.emit(
            "stall",
            step=message["step"],
            rank=handle.rank,
            phase=message["phase"],
            waiting_for=waiting_for,
        )

    async def _next(self, timeout: float | None) -> tuple[NodeHandle, dict[str, Any]] | None:
        try:
            if timeout is None:
                return await self.inbox.get()
            async with asyncio.timeout(timeout):
                return await self.inbox.get()
        except TimeoutError:
            return None

    # ------------------------------------------------------------------------- run
    async def run(self) -> dict[str, Any]:
        """Admit the first nodes, train to the end, stop everyone; returns the summary."""
        loop = asyncio.get_running_loop()
        await self._admit_initial()
        await self._reconfigure(first=True)
        self.starting = False
        t_start = loop.time()
        ping_every = self.settings.leader_timeout / 3
        total = self.job.total_steps
        while self.committed < total:
            await self._push()
            event = await self._next(ping_every)
            if event is None:
                await self._ping(ping_every)
                continue
            handle, message = event
            kind = message["k"]
            if handle in self.members and kind == "failed" and message["phase"] == "task":
                await self._stop_job(f"{handle.label()}'s task raised {message['error']}")
            if handle in self.members and (
                kind == _LOST or (kind == "failed" and message["epoch"] == self.epoch)
            ):
                if kind == _LOST:
                    self._drop(handle, message["error"])
                    reason = f"lost {handle.label()}: {message['error']}"
                else:
                    reason = f"{handle.label()} failed: {message['error']}"
                await self._recover(reason)
                continue
            if kind == "report":
                self._on_report(handle, message)
            else:
                await self._common(handle, message)
            if self._ready_joiners() and self.committed < total:
                self.draining = True
            if self.draining and not self.inflight and self.committed < total:
                log.info(
                    "leader: admitting %d node(s) at step %d",
                    len(self._ready_joiners()),
                    self.committed,
                )
                await self._reconfigure()
                self.draining = False
        wall = loop.time() - t_start
        byes = await self._stop()
        return self._summary(wall, byes)

    async def _admit_initial(self) -> None:
        need = self.settings.nodes
        deadline = asyncio.get_running_loop().time() + self.settings.start_timeout
        while len(self._ready_joiners()) < need:
            left = deadline - asyncio.get_running_loop().time()
            event = await self._next(max(0.0, left)) if left > 0 else None
            if event is None:
                have = len(self._ready_joiners())
                raise JobError(
                    f"only {have} of {need} nodes were ready within "
                    f"{self.settings.start_timeout:.3g}s"
                )
            await self._common(*event)

    async def _ping(self, every: float) -> None:
        now = asyncio.get_running_loop().time()
        for handle in [*self.members, *self._ready_joiners()]:
            if handle is not self.local and now - handle.channel.last_sent >= every:
                with contextlib.suppress(P2PDLError):
                    await handle.channel.send({"k": "ping"})

    async def _send(self, handle: NodeHandle, message: dict[str, Any]) -> None:
        try:
            await handle.channel.send(message)
        except P2PDLError as exc:
            self.inbox.put_nowait((handle, {"k": _LOST, "error": str(exc)}))

    # ------------------------------------------------------------------- groups
    async def _push(self) -> None:
        assert self.membership is not None
        total = self.job.total_steps
        limit = 1 if self.settings.bsp else 1 + self.settings.lookahead
        while not self.draining and len(self.inflight) < limit and self.next_plan < total:
            plan = plan_groups(self.job, self.membership, self.next_plan, self.size, self.next_gid)
            self.inflight[plan.group_id] = _Track(plan)
            self.next_gid += 1
            self.next_plan = plan.end_step
            self.groups_pushed += 1
            every = self.settings.checkpoint_every
            checkpoint = every is not None and (
                self.groups_pushed % every == 0 or plan.end_step >= total
            )
            message = {"k": "group", "plan": plan.to_wire(), "checkpoint": checkpoint}
            for handle in self.members:
                if handle is not self.local:
                    await self._send(handle, message)
            await self._send(self.local, message)

    def _on_report(self, handle: NodeHandle, message: dict[str, Any]) -> None:
        if message["epoch"] != self.epoch or handle.rank < 0:
            return
        track = self.inflight.get(message["group"])
        if track is None:
            return
        track.reports[handle.rank] = message
        self.reports += 1
        for name in self.rank_time:
            self.rank_time[name] += float(message[name])
        world = len(self.members)
        while self.inflight:
            gid = min(self.inflight)
            track = self.inflight[gid]
            if len(track.reports) < world:
                break
            del self.inflight[gid]
            steps = len(track.plan.steps)
            self.committed = track.plan.end_step
            self.steps_run += steps
            self._decide(track)

    def _decide(self, track: _Track) -> None:
        if self.settings.bsp or self.settings.group_size != "auto":
            return
        reports = list(track.reports.values())
        steps = len(track.plan.steps)
        coordination = max(float(r["t_wait"]) + float(r["t_boundary"]) for r in reports)
        step_time = sum(float(r["t_compute"]) + float(r["t_reduce"]) for r in reports) / (
            len(reports) * max(1, steps)
        )
        decision = self.settings.controller.next_size(self.size, coordination, step_time, steps)
        if decision.size != self.size:
            log.info("group size: %s", decision.reason)
            self.decisions.append(
                {"step": track.plan.end_step, "size": decision.size, "why": decision.reason}
            )
        else:
            log.debug("group size: %s", decision.reason)
        self.size = decision.size

    # ---------------------------------------------------------------- membership
    async def _collect(
        self, nodes: list[NodeHandle], kind: str, timeout: float
    ) -> tuple[bool, dict[NodeHandle, dict[str, Any]]]:
        """Wait for `kind` (this epoch) from every node; False if any failed, died or was late."""
        replies: dict[NodeHandle, dict[str, Any]] = {}
        deadline = asyncio.get_running_loop().time() + timeout
        ok = True
        while len(replies) < len(nodes):
            left = deadline - asyncio.get_running_loop().time()
            event = await self._next(left) if left > 0 else None
            if event is None:
                for handle in nodes:
                    if handle not in replies:
                        self._drop(handle, f"no {kind} reply within {timeout:.3g}s")
                return False, replies
            handle, message = event
            mkind = message["k"]
            if handle in nodes and mkind == kind and message["epoch"] == self.epoch:
                replies[handle] = message
            elif (
                handle in nodes
                and mkind == "failed"
                and message["epoch"] == self.epoch
                and kind != "aborted"  # the failure that caused the abort: expected
            ):
                log.warning(
                    "leader: %s failed during %s: %s", handle.label(), kind, message["error"]
                )
                replies[handle] = message
                return False, replies  # no point waiting for the others: this epoch is over
            elif handle in nodes and mkind == _LOST:
                self._drop(handle, message["error"])
                ok = False
                nodes = [h for h in nodes if h is not handle]
            else:
                await self._common(handle, message)
        return ok, replies

    async def _holdings(self) -> dict[NodeHandle, tuple[Holding, ...]]:
        """Stop every live member; the boundaries (and state pieces) each of them holds."""
        alive = [h for h in self.members if not h.dead]
        for handle in alive:
            await self._send(handle, {"k": "abort", "epoch": self.epoch})
        _ok, replies = await self._collect(alive, "aborted", self.settings.timeouts.operation)
        held: dict[NodeHandle, tuple[Holding, ...]] = {}
        for handle, message in replies.items():
            if message["k"] != "aborted":
                continue
            try:
                held[handle] = holdings_from_wire(
                    message["holdings"], size=self.params, sender=handle.label()
                )
            except ProtocolError as exc:
                self._drop(handle, str(exc))
        if self.local not in held:
            raise JobError("the leader's own worker did not stop for the reconfiguration")
        self.members = [h for h in alive if h in held and not h.dead]
        return held

    def _first_rollback(self) -> Rollback:
        if self.resumed and self.model.has_state:
            return Rollback(self.model.next_step, {0: (Piece(0, self.params, "full"),)})
        return Rollback(self.model.next_step, {})

    async def _reconfigure(self, *, first: bool = False) -> int:
        """Form a new membership epoch: the live members (rolled back to a common boundary)
        and the ready joiners. Returns the boundary step it starts from."""
        timeouts = self.settings.timeouts
        for attempt in range(5):
            if first:
                # The first epoch again (a node failed while it formed): everyone stops, and
                # all but the leader start over from the leader's state.
                if attempt:
                    await self._holdings()
                survivors: list[NodeHandle] = []
                rollback = self._first_rollback()
            else:
                held = await self._holdings()
                survivors = list(held)
                by_id = {h.node_id: held[h] for h in survivors}
                rollback = choose_rollback(by_id, self.params, has_state=self.model.has_state)
            joiners = [h for h in self._ready_joiners() if h not in survivors]
            order = plan_members(
                self.local.node_id,
                [h.node_id for h in survivors],
                [h.node_id for h in joiners],
                max_nodes=self.job.max_nodes,
                min_nodes=self.job.min_nodes,
            )
            handles = {h.node_id: h for h in self.handles}
            nodes = [handles[node_id] for node_id in order]
            joined = [h for h in nodes if h in joiners]
            self.epoch += 1
            for rank, handle in enumerate(nodes):
                handle.rank = rank
            peers = [list(h.addr) for h in nodes if h.addr is not None]
            assert len(peers) == len(nodes)
            sync = first or bool(joined)
            assemble = self.model.has_state and (bool(rollback.sources) or not first)
            for handle in nodes:
                keeps_state = handle in survivors
                pieces = rollback.sources.get(handle.node_id, ())
                await self._send(
                    handle,
                    {
                        "k": "epoch",
                        "epoch": self.epoch,
                        "rank": handle.rank,
                        "peers": peers,
                        "restore": rollback.step if keeps_state else None,
                        "sync": sync,
                        "assemble": assemble,
                        "contribute": [p.to_wire() for p in pieces],
                        "step": rollback.step,
                    },
                )
            ok, _ = await self._collect(nodes, "connected", timeouts.connect)
            if ok:
                for handle in nodes:
                    await self._send(handle, {"k": "start", "epoch": self.epoch})
                ok, _ = await self._collect(nodes, "started", timeouts.operation)
            self.members = [h for h in nodes if not h.dead]
            if not ok:
                continue
            for handle in nodes:
                handle.state = "member"
            self.membership = Membership(
                self.epoch,
                tuple(PeerAddress(h.rank, h.addr[0], h.addr[1]) for h in nodes if h.addr),
            )
            self.committed = self.next_plan = rollback.step
            log.info(
                "leader: membership epoch %d: %d node(s) from step %d%s",
                self.epoch,
                len(nodes),
                rollback.step,
                f" ({len(joined)} joined)" if joined and not first else "",
            )
            self.emit("epoch", epoch=self.epoch, world_size=len(nodes), step=rollback.step)
            return rollback.step
        raise JobError("could not form a new membership after 5 attempts")

    async def _recover(self, reason: str) -> None:
        """Abort the running group, roll everyone back to a common boundary, carry on."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        log.warning(
            "leader: aborting epoch %d at step >= %d: %s", self.epoch, self.committed, reason
        )
        before = list(self.members)
        planned = self.next_plan
        self.inflight.clear()
        if self.settings.group_size == "auto" and not self.settings.bsp:
            decision = self.settings.controller.after_failure(self.size)
            log.info("group size: %s", decision.reason)
            self.decisions.append(
                {"step": self.committed, "size": decision.size, "why": decision.reason}
            )
            self.size = decision.size
        target = await self._reconfigure()
        lost = sorted(h.rank for h in before if h not in self.members)
        seconds = loop.time() - t0
        record = {
            "reason": reason,
            "lost_ranks": lost,
            "rollback_to": target,
            "planned_steps_redone": planned - target,
            "seconds": round(seconds, 4),
            "world_size": len(self.members),
            "resumed_at": time.time(),
        }
        self.recoveries.append(record)
        log.warning(
            "leader: recovered in %.3fs: %d node(s) from step %d",
            seconds,
            len(self.members),
            target,
        )
        self.emit("recovered", **record)

    # ----------------------------------------------------------------------- end
    async def _stop(self) -> dict[int, dict[str, Any]]:
        nodes = [h for h in self.handles if not h.dead]
        for handle in nodes:
            await self._send(handle, {"k": "stop"})
        byes: dict[int, dict[str, Any]] = {}
        deadline = asyncio.get_running_loop().time() + self.settings.timeouts.operation
        waiting = {h for h in self.members if not h.dead}
        while waiting:
            left = deadline - asyncio.get_running_loop().time()
            event = await self._next(left) if left > 0 else None
            if event is None:
                break
            handle, message = event
            if message["k"] == "bye" and handle in waiting:
                byes[message["rank"]] = message
                waiting.discard(handle)
            elif message["k"] == _LOST:
                waiting.discard(handle)
        for handle in self.handles:
            if handle is not self.local and not handle.dead:
                self.counted_closed += counted(handle.channel)
                handle.dead = True
                handle.channel.close()
                if handle.pump is not None:
                    handle.pump.cancel()
        return byes

    def accounting(self) -> dict[str, Any]:
        """Samples and index sums per data epoch, against what a full pass must give."""
        job = self.job
        totals = self.model.totals
        used = min(job.dataset_size, job.steps_per_epoch * job.global_batch)
        checked = job.global_batch * job.dataset_size < 2**24
        epochs = []
        exact = True
        for epoch in range(job.epochs):
            samples = int(totals[epoch, 0])
            row: dict[str, Any] = {"epoch": epoch, "samples": samples, "expected": used}
            if checked:
                expected_sum = int(
                    epoch_permutation(job.seed, epoch, job.dataset_size)[:used].sum()
                )
                row["index_sum"] = int(totals[epoch, 1])
                row["expected_index_sum"] = expected_sum
                exact &= row["index_sum"] == expected_sum
            exact &= samples == used
            epochs.append(row)
        return {"exact": bool(exact), "index_sums_checked": checked, "epochs": epochs}

    def _summary(self, wall: float, byes: dict[int, dict[str, Any]]) -> dict[str, Any]:
        totals = self.model.totals
        samples = int(totals[:, 0].sum())
        last = totals[-1]
        steps = self.steps_run
        workers = max(1, len(self.members) - 1)
        counted = self.counted_closed
        hashes = {rank: bye["weights_sha256"] for rank, bye in sorted(byes.items())}
        ranks = max(1, len(self.members))
        return {
            "rank": 0,
            "steps": self.committed,
            "steps_this_run": steps,
            "samples": samples,
            "loss": float(last[2] / last[0]) if last[0] else None,
            "loss_by_epoch": [float(t[2] / t[0]) if t[0] else None for t in totals],
            "wall_s": round(wall, 4),
            "iterations_per_s": round(steps / wall, 2) if wall > 0 else None,
            "world_size": len(self.members),
            "membership_epochs": self.epoch + 1,
            "group_size": self.size,
            "bsp": self.settings.bsp,
            "groups": self.groups_pushed,
            "leader_messages": counted,
            "leader_messages_per_iteration": round(counted / max(1, steps) / workers, 5),
            "worker_wait_s": round(self.rank_time["t_wait"] / ranks, 4),
            "worker_compute_s": round(self.rank_time["t_compute"] / ranks, 4),
            "worker_allreduce_s": round(self.rank_time["t_reduce"] / ranks, 4),
            "worker_boundary_s": round(self.rank_time["t_boundary"] / ranks, 4),
            "accounting": self.accounting(),
            "failures": len(self.recoveries),
            "recoveries": self.recoveries,
            "group_size_decisions": self.decisions[-20:],
            "weights_sha256": self.model.weights_sha256(),
            "weights_by_rank": hashes,
            "weights_identical": len(set(hashes.values())) <= 1
            and len(hashes) == len(self.members),
        }

"""`P2PDLProcessGroup`: torch.distributed's ProcessGroup interface mapped onto p2pdl's calls.

Each torch collective becomes one call of p2pdl's collective API (or a short sequence of
them, for torch's list-of-tensors forms), run on the node's loop thread through the one sync
bridge; the call returns a `P2PDLWork` at once. Nothing here reduces, slices or routes data:
the algorithms are p2pdl's.

Order: ranks must start collectives in the same order (p2pdl numbers them in call order), so
the collectives of one group run one after another on the loop, in the order torch issued
them; compute overlaps with them because they run on the loop thread. Point-to-point messages
are matched per peer pair in call order and start at once (a send never waits behind a
collective, so crossed sends and receives cannot deadlock).

Tensors must be CPU tensors; a non-contiguous one is exchanged through a contiguous copy
that is written back before the Work completes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from p2pdl.errors import ConfigError
from p2pdl.sync import SyncNode
from p2pdl.torch.work import P2PDLWork, work_of

__all__ = ["P2PDLProcessGroup", "reduce_op"]

BACKEND_NAME = "p2pdl"

_OPS = {
    dist.ReduceOp.SUM: "sum",
    dist.ReduceOp.AVG: "mean",
    dist.ReduceOp.MIN: "min",
    dist.ReduceOp.MAX: "max",
    dist.ReduceOp.PRODUCT: "prod",
}


def reduce_op(op: Any) -> tuple[str, float | None]:
    """torch's ReduceOp as p2pdl's (op name, premultiplier); BAND/BOR/BXOR are refused."""
    if op == dist.ReduceOp.PREMUL_SUM:
        _, factor = op.__getstate__()
        if isinstance(factor, torch.Tensor):
            factor = float(factor.item())
        return "sum", float(factor)
    for torch_op, name in _OPS.items():
        if op == torch_op:
            return name, None
    name = getattr(getattr(op, "op", op), "name", str(op))
    raise ValueError(
        f"the p2pdl backend does not support ReduceOp.{name} (it reduces with SUM, AVG, MIN, "
        "MAX, PRODUCT and PREMUL_SUM)"
    )


def _check_tensor(tensor: Any, what: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise TypeError(f"the p2pdl backend exchanges CPU tensors; {what} is on {tensor.device}")
    if tensor.is_sparse or tensor.layout != torch.strided:
        raise TypeError(f"the p2pdl backend exchanges dense tensors; {what} is {tensor.layout}")
    if tensor.is_complex():
        # A complex tensor is exchanged as its real view (sums and copies are per part).
        return torch.view_as_real(tensor)
    return tensor


class _Staged:
    """Contiguous stand-ins for the given tensors, copied back after the call."""

    def __init__(self) -> None:
        self._back: list[tuple[torch.Tensor, torch.Tensor]] = []

    def take(self, tensor: Any, what: str, *, out: bool = True) -> torch.Tensor:
        checked = _check_tensor(tensor, what)
        if checked.is_contiguous():
            return checked
        staged = checked.contiguous()
        if out:
            self._back.append((checked, staged))
        return staged

    def write_back(self) -> None:
        for original, staged in self._back:
            original.copy_(staged)


class P2PDLProcessGroup(dist.ProcessGroup):
    """One torch process group over one p2pdl node (`SyncNode`), whose rank is the group rank."""

    def __init__(self, node: SyncNode, *, timeout: float, owned: bool = True) -> None:
        super().__init__(node.rank, node.world_size)
        self._node = node
        self._timeout = timeout
        self._owned = owned
        self._tail: asyncio.Future[None] | None = None
        """The latest collective of this group on the loop (touched on the loop only)."""
        self._group_name = ""
        self._group_desc = ""
        self._closed = False

    # ------------------------------------------------------------------- identity
    def getBackendName(self) -> str:
        return BACKEND_NAME

    def getGroupName(self) -> str:
        return self._group_name

    def setGroupName(self, name: str) -> None:
        self._group_name = name

    def getGroupDesc(self) -> str:
        return self._group_desc

    def setGroupDesc(self, desc: str) -> None:
        self._group_desc = desc

    @property
    def group_name(self) -> str:
        return self._group_name

    @property
    def group_desc(self) -> str:
        return self._group_desc

    @property
    def node(self) -> SyncNode:
        """The p2pdl node under this group."""
        return self._node

    def __repr__(self) -> str:
        return (
            f"P2PDLProcessGroup(rank={self.rank()}, size={self.size()}, name={self._group_name!r})"
        )

    # ------------------------------------------------------------------- running
    @property
    def _collectives(self) -> Any:
        return self._node.node.collectives

    def _deadline(self, opts: Any = None) -> float:
        timeout = getattr(opts, "timeout", None)
        if isinstance(timeout, timedelta) and timeout.total_seconds() > 0:
            return timeout.total_seconds()
        return self._timeout

    def _start(
        self,
        body: Callable[[], Coroutine[Any, Any, Any]],
        result: Callable[[Any], Any],
        *,
        ordered: bool = True,
        staged: _Staged | None = None,
    ) -> P2PDLWork:
        """Run `body()` on the loop (after this group's previous collective when `ordered`);
        the Work's value is `result(what body returned)`, after staged copies are back."""
        if self._closed:
            raise RuntimeError("this p2pdl process group has been destroyed")
        running = self._node.submit(self._ordered(body) if ordered else body())
        returned: list[Any] = []

        def value() -> Any:
            if staged is not None:
                staged.write_back()
            return result(returned[0] if returned else None)

        def keep(done: Any) -> None:
            if not done.cancelled() and done.exception() is None:
                returned.append(done.result())

        running.add_done_callback(keep)
        return work_of(running, value)

    async def _ordered(self, body: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        previous = self._tail
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tail = mine
        try:
            if previous is not None and not previous.done():
                await asyncio.wait([previous])
            return await body()
        finally:
            mine.set_result(None)
            if self._tail is mine:
                self._tail = None

    # ---------------------------------------------------------------- reductions
    def allreduce(self, tensors: Any, opts: Any = None) -> P2PDLWork:
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        if opts is None or isinstance(opts, dist.ReduceOp):
            op_arg = dist.ReduceOp.SUM if opts is None else opts
            opts = dist.AllreduceOptions()
            opts.reduceOp = op_arg
        op, premul = reduce_op(opts.reduceOp)
        staged = _Staged()
        bufs = [staged.take(t, f"tensor {i}") for i, t in enumerate(tensors)]
        timeout = self._deadline(opts)
        coll = self._collectives
        arg = bufs[0] if len(bufs) == 1 else bufs
        return self._start(
            lambda: coll.allreduce(arg, op=op, **_premul(premul), timeout=timeout),
            lambda _: list(tensors),
            staged=staged,
        )

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> P2PDLWork:
        opts = opts or dist.AllreduceCoalescedOptions()
        op, premul = reduce_op(opts.reduceOp)
        staged = _Staged()
        bufs = [staged.take(t, f"tensor {i}") for i, t in enumerate(tensors)]
        timeout = self._deadline(opts)
        coll = self._collectives
        return self._start(
            lambda: coll.allreduce_coalesced(bufs, op=op, **_premul(premul), timeout=timeout),
            lambda _: list(tensors),
            staged=staged,
        )

    def reduce(self, tensors: list[torch.Tensor], opts: Any) -> P2PDLWork:
        op, premul = reduce_op(opts.reduceOp)
        root = opts.rootRank
        staged = _Staged()
        buf = staged.take(_one(tensors, "reduce"), "tensor")
        timeout = self._deadline(opts)
        coll = self._collectives
        return self._start(
            lambda: coll.reduce(buf, root=root, op=op, **_premul(premul), timeout=timeout),
            lambda _: list(tensors),
            staged=staged,
        )

    def reduce_scatter(
        self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any
    ) -> P2PDLWork:
        op, premul = reduce_op(opts.reduceOp)
        staged = _Staged()
        out = staged.take(_one(outputs, "reduce_scatter"), "output")
        ins = [staged.take(t, f"input {i}", out=False) for i, t in enumerate(_one(inputs, "x"))]
        timeout = self._deadline(opts)
        coll = self._collectives
        return self._start(
            lambda: coll.reduce_scatter_list(out, ins, op=op, **_premul(premul), timeout=timeout),
            lambda _: list(outputs),
            staged=staged,
        )

    def _reduce_scatter_base(
        self, output: torch.Tensor, input: torch.Tensor, opts: Any
    ) -> P2PDLWork:
        return self.reduce_scatter_single(output, input, opts)

    def reduce_scatter_single(
        self, output: torch.Tensor, input: torch.Tensor, opts: Any = None
    ) -> P2PDLWork:
        opts = opts or dist.ReduceScatterOptions()
        op, premul = reduce_op(opts.reduceOp)
        staged = _Staged()
        out = staged.take(output, "output")
        inp = staged.take(input, "input", out=False)
        timeout = self._deadline(opts)
        coll = self._collectives
        return self._start(
            lambda: coll.reduce_scatter_into(out, inp, op=op, **_premul(premul), timeout=timeout),
            lambda _: output,
            staged=staged,
        )

    def reduce_scatter_tensor_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any
    ) -> P2PDLWork:
        op, premul = reduce_op(opts.reduceOp)
        staged = _Staged()
        pairs = [
            (staged.take(o, f"output {i}"), staged.take(x, f"input {i}", out=False))
            for i, (o, x) in enumerate(zip(outputs, inputs, strict=True))
        ]
        timeout = self._deadline(opts)
        coll = self._collectives

        async def body() -> None:
            for out, inp in pairs:
                await coll.reduce_scatter_into(out, inp, op=op, **_premul(premul), timeout=timeout)

        return self._start(body, lambda _: list(outputs), staged=staged)

    # ----------------------------------------------------------------- copies
    def broadcast(self, tensors: Any, opts: Any = None) -> P2PDLWork:
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        if opts is None or isinstance(opts, int):
            root = 0 if opts is None else opts
            opts = dist.BroadcastOptions()
            opts.rootRank = root
        root = opts.rootRank
        staged = _Staged()
        buf = staged.take(_one(tensors, "broadcast"), "tensor")
        timeout = self._deadline(opts)
        coll = self._collectives
        return self._start(
            lambda: coll.broadcast(buf, root=root, timeout=timeout),
            lambda _: list(tensors),
            staged=staged,
        )

    def allgather(
        self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None
    ) -> P2PDLWork:
        opts = opts or dist.AllgatherOptions()
        staged = _Staged()
        outs = [staged.take(t, f"output {i}") for i, t in enumerate(_one(outputs, "allgather"))]
        inp = staged.take(_one(inputs, "allgather"), "input", out=False)
        timeout = self._deadline(opts)
        coll = self._collectives
        return self._start(
            lambda: coll.allgather_list(outs, inp, timeout=timeout),
            lambda _: list(outputs),
            staged=staged,
        )

    def _allgather_base(
        self, output: torch.Tensor, input: torch.Tensor, opts: Any = None
    ) -> P2PDLWork:
        return self.all_gather_single(output, input, opts)

    def all_gather_single(
        self, output: torch.Tensor, input: torch.Tensor, opts: Any = None
    ) -> P2PDLWork:
        opts = opts or dist.AllgatherOptions()
        staged = _Staged()
        out = staged.take(output, "output")
        inp = staged.take(input, "input", out=False)
        timeout = self._deadline(opts)
        coll = self._collectives
        return self._start(
            lambda: coll.allgather_into(out, inp, timeout=timeout),
            lambda _: output,
            staged=staged,
        )

    def allgather_coalesced(
        self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None
    ) -> P2PDLWork:
        """torch's `all_gather_coalesced`: outputs[r][i] receives rank r's inputs[i]."""
        opts = opts or dist.AllgatherOptions()
        staged = _Staged()
        per_input = [
            [staged.take(outputs[r][i], f"output [{r}][{i}]") for r in range(len(outputs))]
            for i in range(len(inputs))
        ]
        ins = [staged.take(t, f"input {i}", out=False) for i, t in enumerate(inputs)]
        timeout = self._deadline(opts)
        coll = self._collectives

        async def body() -> None:
            for outs, inp in zip(per_input, ins, strict=True):
                await coll.allgather_list(outs, inp, timeout=timeout)

        return self._start(body, lambda _: list(outputs), staged=staged)

    def allgather_into_tensor_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> P2PDLWork:
        opts = opts or dist.AllgatherOptions()
        staged = _Staged()
        outs = [staged.take(t, f"output {i}") for i, t in enumerate(outputs)]
        ins = [staged.take(t, f"input {i}", out=False) for i, t in enumerate(inputs)]
        timeout = self._deadline(opts)
        coll = self._collectives
        return self._start(
            lambda: coll.allgather_into_coalesced(outs, ins, timeout=timeout),
            lambda _: list(outputs),
            staged=staged,
        )

    def gather(
        self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any
    ) -> P2PDLWork:
        root = opts.rootRank
        staged = _Staged()
        inp = staged.take(_one(inputs, "gather"), "input", out=False)
        outs = None
        if self.rank() == root:
            outs = [staged.take(t, f"output {i}") for i, t in enumerate(_one(outputs, "gather"))]
        timeout = self._deadline(opts)
        coll = self._collectives
        return self._start(
            lambda: coll.gather(inp, outs, root=root, timeout=timeout),
            lambda _: list(outputs),
            staged=staged,
        )

    def scatter(
        self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any
    ) -> P2PDLWork:
        root = opts.rootRank
        staged = _Staged()
        out = staged.take(_one(outputs, "scatter"), "output")
        ins = None
        if self.rank() == root:
            ins = [staged.take(t, f"input {i}", out=False) for i, t in enumerate(_one(inputs, "s"))]
        timeout = self._deadline(opts)
        coll = self._collectives
        return self._start(
            lambda: coll.scatter(out, ins, root=root, timeout=timeout),
            lambda _: list(outputs),
            staged=staged,
        )

    def alltoall_base(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: Sequence[int],
        input_split_sizes: Sequence[int],
        opts: Any = None,
    ) -> P2PDLWork:
        return self.all_to_all_single(output, input, output_split_sizes, input_split_sizes, opts)

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: Sequence[int],
        input_split_sizes: Sequence[int],
        opts: Any = None,
    ) -> P2PDLWork:
        """torch's splits count rows (dim 0); p2pdl's count elements of the flat buffers."""
        opts = opts or dist.AllToAllOptions()
        staged = _Staged()
        out = staged.take(output, "output")
        inp = staged.take(input, "input", out=False)
        out_splits = _element_splits(output, output_split_sizes)
        in_splits = _element_splits(input, input_split_sizes)
        timeout = self._deadline(opts)
        coll = self._collectives
        return self._start(
            lambda: coll.alltoall(
                out, inp, output_splits=out_splits, input_splits=in_splits, timeout=timeout
            ),
            lambda _: output,
            staged=staged,
        )

    def alltoall(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> P2PDLWork:
        opts = opts or dist.AllToAllOptions()
        staged = _Staged()
        outs = [staged.take(t, f"output {i}") for i, t in enumerate(outputs)]
        ins = [staged.take(t, f"input {i}", out=False) for i, t in enumerate(inputs)]
        timeout = self._deadline(opts)
        coll = self._collectives
        return self._start(
            lambda: coll.alltoall_list(outs, ins, timeout=timeout),
            lambda _: list(outputs),
            staged=staged,
        )

    def barrier(self, opts: Any = None) -> P2PDLWork:
        timeout = self._deadline(opts)
        coll = self._collectives
        return self._start(lambda: coll.barrier(timeout=timeout), lambda _: [])

    # ------------------------------------------------------------ point to point
    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> P2PDLWork:
        buf = _check_tensor(_one(tensors, "send"), "tensor").contiguous()
        timeout = self._timeout
        coll = self._collectives
        return self._start(
            lambda: coll.send(buf, dst, tag=tag, timeout=timeout),
            lambda _: list(tensors),
            ordered=False,
        )

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> P2PDLWork:
        staged = _Staged()
        buf = staged.take(_one(tensors, "recv"), "tensor")
        timeout = self._timeout
        coll = self._collectives
        return self._start(
            lambda: coll.recv(buf, src, tag=tag, timeout=timeout),
            lambda _: list(tensors),
            ordered=False,
            staged=staged,
        )

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int = 0) -> P2PDLWork:
        staged = _Staged()
        buf = staged.take(_one(tensors, "recv"), "tensor")
        timeout = self._timeout
        coll = self._collectives
        if not hasattr(coll, "recv_any"):
            raise NotImplementedError("this p2pdl version has no receive from any rank")
        source: list[int] = []

        def value(src: Any) -> list[torch.Tensor]:
            source.append(int(src))
            return list(tensors)

        work = self._start(
            lambda: coll.recv_any(buf, tag=tag, timeout=timeout),
            value,
            ordered=False,
            staged=staged,
        )
        work.source_of = source
        return work

    # ------------------------------------------------------------------ closing
    def shutdown(self) -> None:
        """Close this group's node (destroy_process_group); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owned:
            self._node.close()

    def abort(self) -> None:
        self.shutdown()


def _premul(premul: float | None) -> dict[str, float]:
    """The premultiplier argument, given only when there is one (PREMUL_SUM)."""
    return {} if premul is None else {"premul": premul}


def _one(items: Sequence[Any], what: str) -> Any:
    """The single entry of torch's per-device list (p2pdl runs one device per process)."""
    if len(items) != 1:
        raise ValueError(
            f"{what}: the p2pdl backend takes one tensor (list) per process, got {len(items)}"
        )
    return items[0]


def _element_splits(tensor: torch.Tensor, rows: Sequence[int]) -> list[int] | None:
    if not rows:
        return None
    if tensor.dim() == 0:
        raise ConfigError("all_to_all splits need a tensor with a first dimension")
    per_row = tensor.numel() // tensor.shape[0] if tensor.shape[0] else 0
    return [int(r) * per_row for r in rows]

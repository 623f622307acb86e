"""The torch.distributed backend "p2pdl" with real processes: init methods, every collective,
Work semantics, DDP features, FSDP2/DTensor, object collectives, and bad input.

Each test starts its ranks as fresh interpreters running this file as a script (a scenario
name and the init method on the command line, torchrun's variables in the environment),
then checks every rank's exit status and output. Scenarios compare results with values
computed locally from every rank's inputs, so a wrong result fails, not only a crash.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import pytest

torch = pytest.importorskip("torch")

SECRET = "torch-backend-test-secret-0123456789"
DTYPES = (
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int8",
    "uint8",
    "int16",
    "int32",
    "int64",
    "bool",
)
SHORT = 8.0
"""The process-group timeout of the bad-input scenarios (seconds): each failure must show
within it on every rank."""


# ------------------------------------------------------------------------ rank side
def _init(init: str, timeout: float | None = None) -> None:
    import torch.distributed as dist

    import p2pdl.torch  # noqa: F401 - registers "p2pdl"

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    kwargs: dict[str, Any] = {}
    if timeout is not None:
        kwargs["timeout"] = timedelta(seconds=timeout)
    if init == "env":
        dist.init_process_group("p2pdl", **kwargs)
    elif init == "tcp":
        url = f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        dist.init_process_group("p2pdl", init_method=url, rank=rank, world_size=world, **kwargs)
    else:  # a given store
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, rank == 0
        )
        dist.init_process_group("p2pdl", store=store, rank=rank, world_size=world, **kwargs)


def _inputs(dtype: Any, rank: int, n: int = 7) -> Any:
    """Rank `rank`'s input: small values (no overflow in int8 sums or products)."""
    base = torch.arange(n, dtype=torch.float64) % 3 + rank + 1
    if dtype == torch.bool:
        return (torch.arange(n) + rank) % 2 == 0
    if dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        return base.to(dtype)
    return (base * 0.5).to(dtype)


def _expected(dtype: Any, op: str, world: int, n: int = 7) -> Any:
    stack = torch.stack([_inputs(dtype, r, n) for r in range(world)])
    if dtype == torch.bool:
        return stack.any(0) if op in ("sum", "max") else stack.all(0)
    wide = stack.double()
    value = {
        "sum": wide.sum(0),
        "avg": wide.mean(0),
        "min": wide.min(0).values,
        "max": wide.max(0).values,
        "product": wide.prod(0),
    }[op]
    return value.to(dtype)


def _scenario_collectives(init: str) -> dict[str, Any]:
    """Every collective torch lists, on several dtypes and ops, checked against local math."""
    import torch.distributed as dist
    from torch.distributed import ReduceOp

    _init(init)
    rank, world = dist.get_rank(), dist.get_world_size()
    checked: list[str] = []
    assert dist.get_backend() == "p2pdl"
    ops = {
        "sum": ReduceOp.SUM,
        "avg": ReduceOp.AVG,
        "min": ReduceOp.MIN,
        "max": ReduceOp.MAX,
        "product": ReduceOp.PRODUCT,
    }
    for name in DTYPES:
        dtype = getattr(torch, name)
        for op_name, op in ops.items():
            if op_name == "avg" and not dtype.is_floating_point:
                continue
            t = _inputs(dtype, rank)
            dist.all_reduce(t, op=op)
            want = _expected(dtype, op_name, world)
            tolerance = {"atol": 1e-2, "rtol": 1e-2} if dtype.itemsize == 2 else {}
            torch.testing.assert_close(t, want, **tolerance, msg=f"{name} {op_name}")
        checked.append(f"allreduce {name}")
    # premultiplied sum (FSDP's gradient divide factor)
    t = _inputs(torch.float32, rank)
    dist.all_reduce(t, op=dist._make_nccl_premul_sum(0.25))
    torch.testing.assert_close(t, _expected(torch.float32, "sum", world) * 0.25)
    checked.append("premul_sum")
    # a non-contiguous tensor goes through a staged copy and comes back in place
    base = torch.zeros(4, 6)
    view = base[:, ::2]
    view.fill_(rank + 1.0)
    dist.all_reduce(view)
    assert torch.all(view == sum(range(1, world + 1))) and torch.all(base[:, 1::2] == 0)
    checked.append("non-contiguous")
    # broadcast and reduce from the last rank
    root = world - 1
    b = torch.full((5,), float(rank), dtype=torch.float64)
    dist.broadcast(b, src=root)
    assert torch.all(b == root)
    r = _inputs(torch.int32, rank)
    dist.reduce(r, dst=root, op=ReduceOp.MAX)
    if rank == root:
        assert torch.equal(r, _expected(torch.int32, "max", world))
    checked += ["broadcast", "reduce"]
    # all_gather (list and into one tensor), uneven per-rank sizes
    outs = [torch.empty(3, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(outs, torch.full((3,), rank, dtype=torch.int64))
    assert [int(o[0]) for o in outs] == list(range(world))
    flat = torch.empty(world * 2)
    dist.all_gather_into_tensor(flat, torch.full((2,), float(rank)))
    assert flat.tolist() == [float(r) for r in range(world) for _ in range(2)]
    uneven = [torch.empty(r + 1) for r in range(world)]
    dist.all_gather(uneven, torch.full((rank + 1,), float(rank)))
    assert all(torch.all(u == r) for r, u in enumerate(uneven))
    checked += ["all_gather", "all_gather_into_tensor", "all_gather uneven"]
    # reduce_scatter (tensor and list), with AVG
    inp = torch.arange(world * 4, dtype=torch.float32) + rank
    out = torch.empty(4)
    dist.reduce_scatter_tensor(out, inp, op=ReduceOp.AVG)
    mean_input = torch.arange(world * 4, dtype=torch.float32) + (world - 1) / 2
    torch.testing.assert_close(out, mean_input[rank * 4 : (rank + 1) * 4])
    pieces = [torch.full((2,), float(rank * 10 + j)) for j in range(world)]
    mine = torch.empty(2)
    dist.reduce_scatter(mine, pieces, op=ReduceOp.SUM)
    assert torch.all(mine == sum(r * 10 + rank for r in range(world)))
    checked += ["reduce_scatter_tensor avg", "reduce_scatter"]
    # gather and scatter to/from rank 0
    g = [torch.empty(2) for _ in range(world)] if rank == 0 else None
    dist.gather(torch.full((2,), float(rank)), g, dst=0)
    if rank == 0:
        assert [float(x[0]) for x in g] == [float(r) for r in range(world)]
    s = torch.empty(3, dtype=torch.int16)
    parts = [torch.full((3,), r, dtype=torch.int16) for r in range(world)] if rank == 0 else None
    dist.scatter(s, parts, src=0)
    assert torch.all(s == rank)
    checked += ["gather", "scatter"]
    # all_to_all: equal, uneven splits (rows), and lists
    a_in = torch.arange(world, dtype=torch.float32) + 100 * rank
    a_out = torch.empty(world)
    dist.all_to_all_single(a_out, a_in)
    assert a_out.tolist() == [100.0 * r + rank for r in range(world)]
    in_splits = [r + 1 for r in range(world)]  # rank sends r+1 rows to rank r
    rows = torch.full((sum(in_splits), 2), float(rank))
    out_splits = [rank + 1] * world
    got = torch.empty(sum(out_splits), 2)
    dist.all_to_all_single(got, rows, out_splits, in_splits)
    assert got[:, 0].tolist() == [float(r) for r in range(world) for _ in range(rank + 1)]
    lo = [torch.empty(1) for _ in range(world)]
    dist.all_to_all(lo, [torch.tensor([float(rank * world + r)]) for r in range(world)])
    assert [float(x) for x in lo] == [float(r * world + rank) for r in range(world)]
    checked += ["all_to_all_single", "all_to_all_single uneven", "all_to_all"]
    # point to point in a ring, tagged, and batched isend/irecv
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    msg = torch.full((4,), float(rank))
    box = torch.empty(4)
    ops_ = [dist.P2POp(dist.isend, msg, nxt, tag=3), dist.P2POp(dist.irecv, box, prv, tag=3)]
    for w in dist.batch_isend_irecv(ops_):
        w.wait()
    assert torch.all(box == prv)
    if rank == 0:
        dist.send(torch.tensor([7, 8]), dst=1, tag=5)
    elif rank == 1:
        got2 = torch.empty(2, dtype=torch.int64)
        dist.recv(got2, src=0, tag=5)
        assert got2.tolist() == [7, 8]
    checked += ["batch_isend_irecv", "send/recv"]
    # coalesced forms
    xs = [torch.full((3,), float(rank)), torch.full((2,), float(rank * 2))]
    dist.all_reduce_coalesced(xs, op=ReduceOp.SUM)
    total = sum(range(world))
    assert torch.all(xs[0] == total) and torch.all(xs[1] == 2 * total)
    outs2 = [[torch.empty(1), torch.empty(2)] for _ in range(world)]
    dist.all_gather_coalesced(outs2, [torch.tensor([float(rank)]), torch.full((2,), -rank * 1.0)])
    assert [float(o[0][0]) for o in outs2] == [float(r) for r in range(world)]
    checked += ["all_reduce_coalesced", "all_gather_coalesced"]
    # Work semantics: async, is_completed, get_future().then, wait
    t = torch.ones(1000)
    work = dist.all_reduce(t, async_op=True)
    doubled = work.get_future().then(lambda f: f.value()[0] * 2)
    assert work.wait() is True and work.is_completed()
    assert torch.all(doubled.wait() == 2 * world)
    checked.append("work semantics")
    # objects
    objs: list[Any] = [None] * world
    dist.all_gather_object(objs, {"rank": rank})
    assert [o["rank"] for o in objs] == list(range(world))
    lst = [f"from {rank}", rank] if rank == 0 else [None, None]
    dist.broadcast_object_list(lst, src=0)
    assert lst == ["from 0", 0]
    got_obj: list[Any] = [None]
    dist.scatter_object_list(got_obj, [r * 3 for r in range(world)] if rank == 0 else None, 0)
    assert got_obj[0] == rank * 3
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(("x", rank), gathered, dst=0)
    if rank == 0:
        assert gathered == [("x", r) for r in range(world)]
    checked.append("object collectives")
    # subgroups: ranks 1.. (their rank inside is the index), and a full group
    members = list(range(1, world))
    sub = dist.new_group(members)
    if rank in members:
        v = torch.tensor([float(rank)])
        dist.all_reduce(v, group=sub)
        assert float(v) == sum(members)
        assert dist.get_rank(sub) == members.index(rank)
        w0 = torch.tensor([float(rank)])
        dist.broadcast(w0, src=members[-1], group=sub)  # a global rank, as torch takes it
        assert float(w0) == members[-1]
    full = dist.new_group()
    v = torch.tensor([1.0])
    dist.all_reduce(v, group=full)
    assert float(v) == world
    dist.destroy_process_group(sub)
    dist.barrier()
    checked += ["new_group", "destroy subgroup", "barrier"]
    dist.destroy_process_group()
    return {"checked": checked}


def _scenario_ddp(init: str) -> dict[str, Any]:
    """Unmodified torch DDP: buckets, find_unused_parameters, static_graph, no_sync, fp16 and
    PowerSGD hooks; gradients equal those of one model on the whole global batch."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
    from torch.nn.parallel import DistributedDataParallel as DDP

    _init(init)
    rank, world = dist.get_rank(), dist.get_world_size()
    features: list[str] = []

    class Net(torch.nn.Module):
        def __init__(self, unused: bool = False) -> None:
            super().__init__()
            self.a = torch.nn.Linear(12, 40)
            self.b = torch.nn.Linear(40, 40)
            if unused:  # a layer forward never uses (find_unused_parameters)
                self.unused = torch.nn.Linear(40, 40)
            self.c = torch.nn.Linear(40, 3)

        def forward(self, x: Any) -> Any:
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    def data(step: int) -> tuple[Any, Any]:
        gen = torch.Generator().manual_seed(step)
        return torch.randn(world * 4, 12, generator=gen), torch.randn(world * 4, 3, generator=gen)

    def reference_grads(steps: range, unused: bool) -> dict[str, Any]:
        torch.manual_seed(0)
        net = Net(unused)
        for step in steps:
            x, y = data(step)
            (torch.nn.functional.mse_loss(net(x), y) / len(steps)).backward()
        return {n: p.grad for n, p in net.named_parameters() if p.grad is not None}

    def run(
        name: str,
        tolerance: float = 1e-5,
        hook: Any = None,
        state: Any = None,
        accumulate: int = 1,
        **ddp_kwargs: Any,
    ) -> None:
        unused = bool(ddp_kwargs.get("find_unused_parameters"))
        torch.manual_seed(0)
        model = DDP(Net(unused), bucket_cap_mb=0.005, **ddp_kwargs)  # several buckets
        if hook is not None:
            model.register_comm_hook(state, hook)
        mine = slice(rank * 4, (rank + 1) * 4)
        for step in range(accumulate):
            x, y = data(step)
            loss = torch.nn.functional.mse_loss(model(x[mine]), y[mine]) / accumulate
            if step < accumulate - 1:
                with model.no_sync():
                    loss.backward()
            else:
                loss.backward()
        got = dict(model.module.named_parameters())
        want = reference_grads(range(accumulate), unused)
        assert len(want) == len(got) - 2 * unused
        for key, w in want.items():
            g = got[key].grad
            torch.testing.assert_close(g, w, atol=tolerance, rtol=tolerance, msg=f"{name} {key}")
        if unused:
            assert got["unused.weight"].grad is None or not got["unused.weight"].grad.any()
        features.append(name)

    run("buckets")
    run("find_unused_parameters", find_unused_parameters=True)
    run("static_graph", static_graph=True)
    run("no_sync", accumulate=3)
    run("fp16 hook", 2e-3, default_hooks.fp16_compress_hook, None)
    state = powersgd.PowerSGDState(
        process_group=None,
        matrix_approximation_rank=64,
        start_powerSGD_iter=2,
        min_compression_rate=0.5,
        use_error_feedback=False,
        warm_start=False,
    )
    run("PowerSGD hook", 1e-4, powersgd.powerSGD_hook, state)  # vanilla for 2 iterations
    torch.manual_seed(0)
    # One bucket: with several, PowerSGD's callbacks issue their nested allreduces from
    # several threads in an order that differs across ranks (gloo deadlocks on that; p2pdl
    # fails with CollectiveMismatchError, see docs/torch.md).
    model = DDP(Net())
    model.register_comm_hook(state, powersgd.powerSGD_hook)
    x, y = data(0)
    for _ in range(3):  # beyond start_powerSGD_iter: compressed, nested allreduces in .then
        torch.nn.functional.mse_loss(model(x), y).backward()
    flat = torch.cat([p.grad.reshape(-1) for p in model.module.parameters() if p.grad is not None])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    assert torch.equal(flat, ref), "PowerSGD gradients differ across ranks"
    features.append("PowerSGD compressed steps")
    dist.destroy_process_group()
    return {"features": features}


def _scenario_fsdp_dtensor(init: str) -> dict[str, Any]:
    """FSDP2 equals a single-process reference; DTensor sharding and redistribution."""
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    _init(init)
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    model = copy.deepcopy(ref)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        x, y = torch.randn(world * 4, 6, generator=gen), torch.randn(world * 4, 2, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(
            model(x[rank * 4 : rank * 4 + 4]), y[rank * 4 : rank * 4 + 4]
        ).backward()
        opt.step()
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.detach().full_tensor(), q.detach(), atol=1e-5, rtol=1e-5)
    # DTensor: shard a tensor, reduce a sharded product, redistribute to replicated
    big = torch.arange(world * 6, dtype=torch.float32).reshape(world * 2, 3)
    d = distribute_tensor(big, mesh, [Shard(0)])
    assert d.to_local().shape == (2, 3)
    torch.testing.assert_close(d.redistribute(mesh, [Replicate()]).to_local(), big)
    torch.testing.assert_close(d.sum().full_tensor(), big.sum())
    dist.destroy_process_group()
    return {"features": ["fsdp2 equals reference", "dtensor shard/redistribute/sum"]}


def _scenario_bad_input(init: str) -> dict[str, Any]:
    """Bad calls fail with a clear error on every rank within the timeout, never hang."""
    import torch.distributed as dist

    _init(init, timeout=SHORT)
    rank, world = dist.get_rank(), dist.get_world_size()
    errors: dict[str, str] = {}

    def expect(name: str, call: Any, *words: str) -> None:
        started = time.monotonic()
        try:
            call()
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            assert all(w in text for w in words), f"{name}: {text}"
            errors[name] = text.splitlines()[0][:200]
            spent = time.monotonic() - started
            assert spent < SHORT * 3, f"{name} took {spent:.1f}s"
            return
        raise AssertionError(f"{name}: no error")

    expect("meta device", lambda: dist.all_reduce(torch.ones(2, device="meta")), "CPU")
    expect("unsupported op", lambda: dist.all_reduce(torch.ones(2), op=dist.ReduceOp.BAND), "BAND")
    expect("unsupported dtype", lambda: dist.all_reduce(torch.ones(2, dtype=torch.uint16)))
    expect(
        "mismatched shapes",
        lambda: dist.all_reduce(torch.ones(3 + rank)),
        "CollectiveMismatchError",
    )
    t = torch.ones(2)  # after a failed call, the group still works
    dist.all_reduce(t)
    assert torch.all(t == world), t
    store = dist.distributed_c10d._get_default_store()
    if rank != world - 1:  # the last rank never calls this one
        expect(
            "a rank that never calls",
            lambda: dist.all_reduce(torch.ones(4)),
            "CollectiveTimeoutError",
            f"rank {world - 1}",
        )
        store.set(f"timed out {rank}", "1")
    else:  # stay (leaving would be a lost peer, not a timeout) until the others gave up
        store.wait([f"timed out {r}" for r in range(world - 1)], timedelta(seconds=120))
    dist.destroy_process_group()
    return {"errors": errors}


SCENARIOS = {
    "collectives": _scenario_collectives,
    "ddp": _scenario_ddp,
    "fsdp_dtensor": _scenario_fsdp_dtensor,
    "bad_input": _scenario_bad_input,
}


def _rank_main(scenario: str, init: str) -> None:
    torch.set_num_threads(1)
    result = SCENARIOS[scenario](init)
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------- pytest side
def _ranks(
    scenario: str,
    world: int,
    init: str = "env",
    *,
    env: dict[str, str] | None = None,
    timeout: float = 180,
) -> list[subprocess.CompletedProcess[str]]:
    from p2pdl.launch.procs import free_port

    port = free_port()
    procs = []
    for rank in range(world):
        rank_env = dict(os.environ)
        rank_env.update(
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            P2PDL_SECRET=SECRET,
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
        )
        rank_env.update(env or {})
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, scenario, init],
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def _results(done: list[subprocess.CompletedProcess[str]]) -> list[dict[str, Any]]:
    results = []
    for rank, proc in enumerate(done):
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
        assert "Traceback" not in proc.stderr, f"rank {rank}:\n{proc.stderr[-4000:]}"
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        assert lines, f"rank {rank} printed no result:\n{proc.stdout[-2000:]}"
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    return results


def test_import_registers_the_backend() -> None:
    import torch.distributed as dist

    import p2pdl.torch  # noqa: F401

    assert "p2pdl" in dist.Backend.backend_list
    assert dist.Backend("p2pdl") == "p2pdl"


@pytest.mark.slow
@pytest.mark.parametrize(("world", "init"), [(2, "tcp"), (3, "env")])
def test_every_collective_matches_local_math(world: int, init: str) -> None:
    results = _results(_ranks("collectives", world, init))
    assert all(r == results[0] for r in results)
    assert "object collectives" in results[0]["checked"]


@pytest.mark.slow
def test_unmodified_ddp_features() -> None:
    results = _results(_ranks("ddp", 2, "store"))
    assert results[0]["features"] == [
        "buckets",
        "find_unused_parameters",
        "static_graph",
        "no_sync",
        "fp16 hook",
        "PowerSGD hook",
        "PowerSGD compressed steps",
    ]


@pytest.mark.slow
def test_fsdp2_and_dtensor() -> None:
    results = _results(_ranks("fsdp_dtensor", 2, "env"))
    assert "fsdp2 equals reference" in results[0]["features"]


@pytest.mark.slow
def test_bad_input_fails_clearly_on_every_rank() -> None:
    results = _results(_ranks("bad_input", 3, "env"))
    for rank, result in enumerate(results):
        names = set(result["errors"])
        assert {"meta device", "unsupported op", "mismatched shapes"} <= names, (rank, names)
        assert ("a rank that never calls" in names) == (rank != 2)


def test_a_missing_secret_is_refused_on_every_rank() -> None:
    done = _ranks("collectives", 2, "env", env={"P2PDL_SECRET": ""}, timeout=120)
    for rank, proc in enumerate(done):
        assert proc.returncode != 0, f"rank {rank} started without a secret"
        assert "needs a shared secret" in proc.stderr and "P2PDL_INSECURE" in proc.stderr


def test_an_unreachable_store_fails_within_the_timeout() -> None:
    done = _ranks("bad_input", 1, "tcp", env={"RANK": "1", "WORLD_SIZE": "2"}, timeout=120)
    (proc,) = done
    assert proc.returncode != 0
    assert "timeout" in proc.stderr.lower() or "timed out" in proc.stderr.lower()


if __name__ == "__main__":
    _rank_main(sys.argv[1], sys.argv[2])

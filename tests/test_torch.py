"""p2pdl.torch: flat buffers, the sharded optimizer, the DDP-style wrapper, checkpoints, TorchTask.

Multi-node cases run either as several asyncio Nodes in one loop (tests/helpers.py), as
blocking nodes in threads of this process (`_threads`), or, against torch's own DDP on gloo,
as real processes.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import os
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import p2pdl  # noqa: E402
from p2pdl.launch import free_port  # noqa: E402
from p2pdl.torch import (  # noqa: E402
    DistributedDataParallel,
    FlatParameters,
    OptimizerConfig,
    ShardedOptimizer,
    load_checkpoint,
    optimizer_config,
    sample_plan,
    save_checkpoint,
    torch_optimizer,
    train,
    weights_digest,
)

sys.path.insert(0, str(Path(__file__).parent))
from helpers import make_cluster, run, test_timeouts  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _threads(n: int, fn: Callable[[Any], Any], timeout: float = 240.0) -> list[Any]:
    """Run `fn(node)` on `n` blocking nodes (one thread each) of a fresh cluster; rank order."""
    port = free_port()
    secret = secrets.token_bytes(16)

    def one(rank: int) -> Any:
        common = {"secret": secret, "timeouts": test_timeouts(), "host": "127.0.0.1"}
        if rank == 0:
            node = p2pdl.connect(0, world_size=n, port=port, **common)
        else:
            node = p2pdl.connect(leader=("127.0.0.1", port), port=0, **common)
        with node:
            return node.rank, fn(node)

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(one, r) for r in range(n)]
        results = [f.result(timeout) for f in futures]
    return [value for _rank, value in sorted(results, key=lambda item: item[0])]


def _mlp(seed: int = 0, dtype: Any = None) -> Any:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(100, 120), torch.nn.Tanh(), torch.nn.Linear(120, 7))
    return model.to(dtype) if dtype is not None else model


def _flat(model: Any) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()


# ------------------------------------------------------------------------------ flat buffers
def test_flat_parameters_are_views_of_one_buffer() -> None:
    model = _mlp()
    before = _flat(model).copy()
    flat = FlatParameters(model)
    assert flat.numel == before.size
    np.testing.assert_array_equal(flat.weights_np, before)
    for p, view in flat.views(flat.weights):
        assert p.data_ptr() == view.data_ptr()
    for p, view in flat.views(flat.grads):
        assert p.grad is not None and p.grad.data_ptr() == view.data_ptr()
    model(torch.randn(4, 100)).sum().backward()
    assert flat.grads.abs().sum() > 0  # backward accumulated straight into the buffer
    flat.weights.zero_()
    assert all(float(p.detach().abs().sum()) == 0 for p in model.parameters())
    for p in model.parameters():  # torch's zero_grad(set_to_none=True) detaches them...
        p.grad = None
    flat.zero_grad()  # ...and this re-attaches
    for p, view in flat.views(flat.grads):
        assert p.grad is not None and p.grad.data_ptr() == view.data_ptr()


def test_optimizer_config_from_torch_optimizers() -> None:
    params = list(_mlp().parameters())
    sgd = torch.optim.SGD(params, lr=0.3, momentum=0.8, nesterov=True, weight_decay=0.1)
    assert optimizer_config(sgd) == OptimizerConfig(
        kind="sgd", lr=0.3, momentum=0.8, weight_decay=0.1, nesterov=True
    )
    adamw = torch.optim.AdamW(params, lr=0.01, betas=(0.8, 0.9), weight_decay=0.2)
    assert optimizer_config(adamw).kind == "adamw"
    assert optimizer_config({"kind": "Adam", "lr": 1e-3}).kind == "adam"
    with pytest.raises(ValueError, match="nesterov"):
        optimizer_config({"kind": "sgd", "nesterov": True})
    with pytest.raises(ValueError, match="unknown"):
        optimizer_config({"kind": "sgd", "momentun": 0.9})


# -------------------------------------------------------------------- sharded optimizer
CONFIGS = {
    "sgd-momentum": {"kind": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
    "sgd-nesterov": {"kind": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
    "adam": {"kind": "adam", "lr": 0.01, "weight_decay": 0.01},
    "adamw-amsgrad": {"kind": "adamw", "lr": 0.01, "weight_decay": 0.01, "amsgrad": True},
}


@pytest.mark.parametrize(
    ("strategy", "algorithm"),
    [("allreduce", "auto"), ("allreduce", "shm"), ("scatter_gather", "auto")],
)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("n", [1, 3])
def test_sharded_step_equals_torch_optim_on_summed_gradient(
    n: int, config: str, strategy: str, algorithm: str
) -> None:
    """float64, several steps (so momentum / Adam state matters); weights identical on ranks.
    `shm`: the owners update their slices straight out of the shared segments."""
    spec = CONFIGS[config]
    base = _mlp(dtype=torch.float64)  # 12,967 parameters: the sliced algorithm at n=3
    reference = copy.deepcopy(base)
    ref_opt = torch_optimizer(optimizer_config(spec), reference.parameters())

    async def body() -> None:
        async with make_cluster(n) as nodes:
            models = [copy.deepcopy(base) for _ in nodes]
            opts = [
                ShardedOptimizer(spec, m, node, op="sum", strategy=strategy, algorithm=algorithm)
                for m, node in zip(models, nodes, strict=True)
            ]
            rng = np.random.default_rng(1)
            for _ in range(3):
                grads = [rng.standard_normal(opts[0].flat.numel) for _ in nodes]
                for opt, g in zip(opts, grads, strict=True):
                    opt.flat.grads_np[:] = g
                total = np.sum(grads, axis=0)
                for p, view in FlatParameters(reference).views(torch.from_numpy(total)):
                    p.grad = view.clone()
                ref_opt.step()
                await asyncio.gather(*(opt.step_async() for opt in opts))
                want = _flat(reference)
                for opt in opts:
                    got = opt.flat.weights_np
                    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
                assert len({weights_digest(m) for m in models}) == 1
                assert all(float(opt.flat.grads.abs().max()) == 0 for opt in opts)
            # The gathered state is torch.optim's, and torch.optim loads it.
            states = await asyncio.gather(*(opt.state_dict_async() for opt in opts))
            mine, theirs = states[0], ref_opt.state_dict()
            assert mine["param_groups"][0].keys() == theirs["param_groups"][0].keys()
            for index, entry in theirs["state"].items():
                for key, value in entry.items():
                    torch.testing.assert_close(
                        mine["state"][index][key], value, rtol=1e-6, atol=1e-12
                    )
            torch_optimizer(optimizer_config(spec), base.parameters()).load_state_dict(mine)

    run(body())


def test_sharded_optimizer_state_round_trip_continues_identically() -> None:
    """Loading the gathered state into fresh optimizers (other slicing) continues the run."""
    spec = CONFIGS["adam"]
    base = _mlp(dtype=torch.float64)

    async def body() -> None:
        rng = np.random.default_rng(3)
        steps = [[rng.standard_normal(12967) for _ in range(2)] for _ in range(4)]
        async with make_cluster(2) as nodes:
            models = [copy.deepcopy(base) for _ in nodes]
            opts = [
                ShardedOptimizer(spec, m, nd, op="sum") for m, nd in zip(models, nodes, strict=True)
            ]
            for i, grads in enumerate(steps):
                if i == 2:
                    state = (await asyncio.gather(*(o.state_dict_async() for o in opts)))[0]
                    halfway = copy.deepcopy(models[0])
                for opt, g in zip(opts, grads, strict=True):
                    opt.flat.grads_np[:] = g
                await asyncio.gather(*(opt.step_async() for opt in opts))
            straight = _flat(models[0]).copy()
        async with make_cluster(2) as nodes:  # resume from the state taken halfway
            models = [copy.deepcopy(halfway) for _ in nodes]
            opts = [
                ShardedOptimizer(spec, m, nd, op="sum") for m, nd in zip(models, nodes, strict=True)
            ]
            for opt in opts:
                opt.load_state_dict(state)
            for grads in steps[2:]:
                for opt, g in zip(opts, grads, strict=True):
                    opt.flat.grads_np[:] = g
                await asyncio.gather(*(opt.step_async() for opt in opts))
            np.testing.assert_array_equal(_flat(models[0]), straight)

    run(body())


# ----------------------------------------------------------------------------- the task
def _load_digits_example() -> Any:
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "examples/train_digits.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_local_partitions_sum_like_one_replica() -> None:
    """K replicas in threads (phase 1 with the kernels) step like one model on the batch."""
    digits = _load_digits_example()

    def run_with(k: int) -> np.ndarray:
        def fn(node: Any) -> np.ndarray:
            job = digits.make_task(partitions=k)
            train(job, node, steps=5, global_batch=64)
            job.close()
            return job.flats[0].weights_np.copy()

        return _threads(1, fn)[0]

    one, three = run_with(1), run_with(3)
    np.testing.assert_allclose(three, one, rtol=1e-4, atol=1e-6)


def test_four_nodes_reach_single_process_accuracy_with_identical_weights() -> None:
    digits = _load_digits_example()
    steps, batch = 150, 64

    def fn(node: Any) -> tuple[float, str]:
        job = digits.make_task()
        train(job, node, steps=steps, global_batch=batch)
        job.close()
        return job.evaluate()["accuracy"], weights_digest(job.flats[0])

    ((single, _),) = _threads(1, fn)
    results = _threads(4, fn)
    assert len({digest for _acc, digest in results}) == 1
    accuracy = results[0][0]
    assert single >= 0.9
    assert abs(accuracy - single) <= 0.01, (accuracy, single)


def test_checkpoint_stop_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    digits = _load_digits_example()
    path = tmp_path / "ckpt.pt"

    def straight(node: Any) -> np.ndarray:
        job = digits.make_task()
        train(job, node, steps=8, global_batch=32)
        return job.flats[0].weights_np.copy()

    def first_half(node: Any) -> None:
        job = digits.make_task()
        train(job, node, steps=4, global_batch=32)
        save_checkpoint(path, job.model, job.sharded, extra={"step": 4})

    def second_half(node: Any) -> np.ndarray:
        job = digits.make_task()
        job.setup(node)
        job.flats[0].weights.normal_()  # everything must come from the checkpoint
        extra = load_checkpoint(path, job.model, job.sharded)
        train(job, node, steps=8 - extra["step"], global_batch=32, start_step=extra["step"])
        return job.flats[0].weights_np.copy()

    want = _threads(2, straight)
    _threads(2, first_half)
    got = _threads(2, second_half)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(g, w)

    # What was saved loads in plain PyTorch.
    checkpoint = torch.load(path, weights_only=True)
    model = digits.make_model()
    model.load_state_dict(checkpoint["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    opt.load_state_dict(checkpoint["optimizer"])
    assert len(opt.state) == len(list(model.parameters()))


def test_sample_plan_is_a_partition_of_the_global_batch() -> None:
    shares = sample_plan(100, 40, 3, 3, seed=1)
    flat = [i for share in shares for i in share]
    assert len(flat) == 40 and len(set(flat)) == 40
    assert [len(s) for s in shares] == [14, 13, 13]  # the job planner: the first ranks get more
    assert shares == sample_plan(100, 40, 3, 3, seed=1)


# ------------------------------------------------------------------- DDP-style wrapper
def test_ddp_wrapper_grads_average_across_nodes_when_backward_returns() -> None:
    base = _mlp()

    def fn(node: Any) -> list[np.ndarray]:
        model = DistributedDataParallel(
            copy.deepcopy(base), node, bucket_mb=0.02, first_bucket_mb=0.01
        )
        assert len(model.buckets) > 1
        out = []
        for step in range(3):
            gen = torch.Generator().manual_seed(10 * step + node.rank)
            x = torch.randn(8, 100, generator=gen)
            model.zero_grad(set_to_none=step == 1)
            model(x).pow(2).mean().backward()
            out.append(_flat_grads(model.module))
        with model.no_sync():  # local accumulation only
            model(torch.ones(2, 100)).sum().backward()
        return out

    ranks = _threads(2, fn)
    for step in range(3):
        np.testing.assert_array_equal(ranks[0][step], ranks[1][step])
        local = []
        for rank in range(2):
            gen = torch.Generator().manual_seed(10 * step + rank)
            model = copy.deepcopy(base)
            model(torch.randn(8, 100, generator=gen)).pow(2).mean().backward()
            local.append(_flat_grads(model))
        np.testing.assert_allclose(ranks[0][step], (local[0] + local[1]) / 2, rtol=1e-5)


def _flat_grads(model: Any) -> np.ndarray:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy()


GLOO_WORKER = """
import copy, os, sys
import numpy as np, torch, torch.distributed as dist
import p2pdl
from p2pdl.torch import DistributedDataParallel

rank, world = int(os.environ["P2PDL_RANK"]), int(os.environ["P2PDL_WORLD_SIZE"])
torch.set_num_threads(1)
torch.manual_seed(0)
base = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256),
                           torch.nn.Tanh(), torch.nn.Linear(256, 10))
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["GLOO_PORT"],
                        rank=rank, world_size=world)
theirs = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base), bucket_cap_mb=0.1)
with p2pdl.connect() as node:
    ours = DistributedDataParallel(copy.deepcopy(base), node, bucket_mb=0.1, first_bucket_mb=0.05)
    results = {}
    for step in range(3):
        gen = torch.Generator().manual_seed(100 * step + rank)
        x, y = torch.randn(16, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        for name, model in (("gloo", theirs), ("p2pdl", ours)):
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            grads = [p.grad.reshape(-1) for p in model.module.parameters()]
            results[f"{name}{step}"] = torch.cat(grads).numpy().copy()
    np.savez(sys.argv[1], **results)
dist.destroy_process_group()
"""


def test_ddp_wrapper_matches_torch_ddp_on_gloo(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(GLOO_WORKER))
    env = dict(
        os.environ,
        P2PDL_WORLD_SIZE="2",
        P2PDL_LEADER=f"127.0.0.1:{free_port()}",
        P2PDL_SECRET=secrets.token_hex(16),
        GLOO_PORT=str(free_port()),
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / f"rank{r}.npz")],
            env=dict(env, P2PDL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=180)
            outputs.append(out.decode(errors="replace"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    for step in range(3):
        for rank in ranks:
            np.testing.assert_allclose(rank[f"p2pdl{step}"], rank[f"gloo{step}"], rtol=1e-6)
        np.testing.assert_array_equal(ranks[0][f"p2pdl{step}"], ranks[1][f"p2pdl{step}"])


# ------------------------------------------------------------------------------- misc
def test_import_without_torch_names_the_fix() -> None:
    code = "import sys; sys.modules['torch'] = None; import p2pdl.torch"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode != 0
    assert "p2pdl.torch needs PyTorch" in proc.stderr and "pip install" in proc.stderr


def test_sharded_optimizer_without_loop_asks_for_async() -> None:
    async def body() -> None:
        async with make_cluster(1) as (node,):
            opt = ShardedOptimizer({"kind": "sgd", "lr": 0.1}, _mlp(), node)
            with pytest.raises(TypeError, match="_async"):
                opt.step()
            await opt.step_async()
            assert opt.steps == 1

    run(body())


def test_task_as_the_group_runtime_sees_it() -> None:
    """setup(ctx) / step(ctx, samples, lr) -> metrics, from the node's loop (step_async)."""
    digits = _load_digits_example()

    async def body() -> None:
        async with make_cluster(2) as nodes:
            jobs = [digits.make_task() for _ in nodes]
            for job, node in zip(jobs, nodes, strict=True):
                job.setup(node)
            await asyncio.gather(*(job.sharded.broadcast_weights_async() for job in jobs))
            for step in range(3):
                shares = sample_plan(len(jobs[0]), 32, step, 2)
                metrics = await asyncio.gather(
                    *(
                        job.local_step_async(node, shares[node.rank], 0.05)
                        for job, node in zip(jobs, nodes, strict=True)
                    )
                )
                assert all(m["samples"] == 16 and m["loss"] > 0 for m in metrics)
            assert len({weights_digest(job.flats[0]) for job in jobs}) == 1

    run(body())


def test_tensor_dataset_and_item_datasets_batch_alike() -> None:
    from torch.utils.data import TensorDataset

    from p2pdl.torch.task import _batch

    x, y = torch.randn(10, 3), torch.arange(10)
    a = _batch((x, y), [3, 1])
    b = _batch(TensorDataset(x, y), [3, 1])
    c = _batch([(x[i], y[i]) for i in range(10)], [3, 1])
    for got in (b, c):
        torch.testing.assert_close(got[0], a[0])
        torch.testing.assert_close(got[1], a[1])

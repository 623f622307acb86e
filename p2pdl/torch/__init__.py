"""PyTorch on p2pdl: flat buffers, a sharded optimizer, a DDP-style wrapper, checkpoints, a task.

Ways to train a torch model here:

* **Existing loops** change two lines::

      node = p2pdl.connect()                                     # 1
      model = p2pdl.torch.DistributedDataParallel(model, node)   # 2
      ...                                                        # unchanged loop:
      loss.backward()            # .grad holds the average across nodes when this returns
      optimizer.step()

  or use the sharded update (BigDL's phase 2) instead of a local optimizer::

      opt = p2pdl.torch.ShardedOptimizer({"kind": "adam", "lr": 1e-3}, model, node)
      loss.backward(); opt.step()      # one allreduce; each owner updates its weight range

* **Group-scheduled jobs** use :class:`TorchTask` (a model factory, a loss, an indexable data
  set, an optimizer config); ``python -m p2pdl node --lead --job examples.train_digits:task``.

Modules: `flat` (parameters as views of flat buffers), `optim` (the sharded optimizer, torch
optimizers as p2pdl configs), `ddp` (the bucketed wrapper), `checkpoint`, `task`
(`TorchTask`), `loop` (a plain training loop), `attach` (the node a torch object blocks on).
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "p2pdl.torch needs PyTorch, which is not installed; install it with "
        "`pip install 'p2pdl[torch]'` (or `pip install torch`)"
    ) from _exc

from p2pdl.collectives.sharded import OptimizerConfig
from p2pdl.torch.backend import register as _register_backend
from p2pdl.torch.checkpoint import load_checkpoint, save_checkpoint
from p2pdl.torch.ddp import DistributedDataParallel
from p2pdl.torch.flat import FlatParameters, weights_digest
from p2pdl.torch.loop import Progress, sample_plan, train
from p2pdl.torch.optim import ShardedOptimizer, optimizer_config, torch_optimizer
from p2pdl.torch.task import TorchTask, default_partitions

_register_backend()  # torch.distributed.init_process_group("p2pdl")

__all__ = [
    "DistributedDataParallel",
    "FlatParameters",
    "OptimizerConfig",
    "Progress",
    "ShardedOptimizer",
    "TorchTask",
    "default_partitions",
    "load_checkpoint",
    "optimizer_config",
    "sample_plan",
    "save_checkpoint",
    "torch_optimizer",
    "train",
    "weights_digest",
]

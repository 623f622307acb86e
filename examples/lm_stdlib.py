"""A byte-level GPT-style language model trained on the Python standard library's own source.

Real text that every Python installation ships, so it runs offline: fixed training and
held-out validation files (below) read from this interpreter's stdlib, cut into windows of
`CONTEXT + 1` bytes. The model (about 5.4M parameters) is small enough to step on a CPU and
large enough that exchanging its gradient (21 MiB in float32) dominates a step on 1 Gbit/s
links — the regime where moving fewer bytes is what makes training sooner.

    python -m p2pdl launch -n 2 examples/lm_stdlib.py --steps 50        # p2pdl (sharded step)
    python -m p2pdl launch -n 2 examples/lm_stdlib.py --compression int8-ef  # 8-bit wire
    python -m p2pdl node --lead --nodes 2 --job examples.lm_stdlib:task  # group-scheduled job
    torchrun --nproc-per-node 2 examples/lm_stdlib.py --ddp --backend gloo   # plain torch DDP
    torchrun --nproc-per-node 2 examples/lm_stdlib.py --ddp --backend p2pdl  # the same on p2pdl

Each prints the validation loss every `--eval-every` steps and one JSON line at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sysconfig
import time
from pathlib import Path

import torch
from torch import nn

SEED = 0
CONTEXT = 64
WIDTH = 384
LAYERS = 3
HEADS = 6
VOCAB = 256

TRAIN_FILES = (
    "argparse.py", "ast.py", "calendar.py", "collections/__init__.py", "configparser.py",
    "contextlib.py", "csv.py", "dataclasses.py", "datetime.py", "difflib.py", "enum.py",
    "fractions.py", "functools.py", "gettext.py", "gzip.py", "heapq.py", "inspect.py",
    "ipaddress.py", "json/decoder.py", "json/encoder.py", "locale.py", "logging/__init__.py",
    "mailbox.py", "pathlib.py", "pickle.py", "pprint.py", "random.py", "shutil.py",
    "smtplib.py", "socket.py", "subprocess.py", "tarfile.py", "tempfile.py", "textwrap.py",
    "threading.py", "traceback.py", "typing.py", "uuid.py", "zipfile.py",
)  # fmt: skip
"""Training text: modules present in every CPython 3.11 and later."""
VALID_FILES = ("statistics.py", "string.py", "queue.py", "bisect.py", "copy.py")
"""Held out: never trained on."""
VALID_WINDOWS = 256
"""Validation windows (the first ones of the held-out text): the same for every run."""


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def read_corpus(names: tuple[str, ...]) -> bytes:
    """The files' bytes, concatenated in the listed order (a missing file is an error)."""
    root = stdlib_dir()
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{root} lacks {missing}: this stdlib differs from 3.11's")
    return b"".join((root / n).read_bytes() for n in names)


def windows(text: bytes, context: int = CONTEXT) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of `context + 1` bytes: inputs and next-byte targets."""
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    count = (len(data) - 1) // context
    x = data[: count * context].view(count, context)
    y = data[1 : count * context + 1].view(count, context)
    return x.contiguous(), y.contiguous()


TRAIN_TEXT = read_corpus(TRAIN_FILES)
VALID_TEXT = read_corpus(VALID_FILES)
X_TRAIN, Y_TRAIN = windows(TRAIN_TEXT)
_xv, _yv = windows(VALID_TEXT)
X_VALID, Y_VALID = _xv[:VALID_WINDOWS], _yv[:VALID_WINDOWS]
CORPUS_DIGEST = hashlib.sha256(TRAIN_TEXT + VALID_TEXT).hexdigest()[:16]


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True, bias=False)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ByteGPT(nn.Module):
    """Next-byte prediction over a window of `context` bytes."""

    def __init__(
        self, width: int = WIDTH, layers: int = LAYERS, heads: int = HEADS, context: int = CONTEXT
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)
        mask = torch.triu(torch.full((context, context), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        x = self.embed(tokens) + self.position[:n]
        for block in self.blocks:
            x = block(x, self.mask[:n, :n])
        return self.head(self.norm(x))


def make_model() -> nn.Module:
    return ByteGPT()


def next_byte_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def validation_loss(model: nn.Module) -> dict[str, float]:
    """Mean next-byte loss (nats) on the held-out windows, and bits per byte."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = float(next_byte_loss(model(X_VALID), Y_VALID))
    model.train(was_training)
    return {"val_loss": loss, "bits_per_byte": loss / math.log(2)}


GLOBAL_BATCH = 16
LR = 1e-3


def make_task(
    partitions: int = 1,
    global_batch: int = GLOBAL_BATCH,
    lr: float = LR,
    compression: str | None = None,
):
    """The model as a p2pdl task (`--job examples.lm_stdlib:task`)."""
    from p2pdl.torch import TorchTask

    return TorchTask(
        model_fn=make_model,
        loss_fn=next_byte_loss,
        dataset=(X_TRAIN, Y_TRAIN),
        optimizer={"kind": "adam", "lr": lr},
        partitions=partitions,
        seed=SEED,
        eval_fn=validation_loss,
        global_batch=global_batch,
        epochs=1,
        compression=compression,
    )


task = make_task()
"""The job for the group-scheduled runtime."""


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=GLOBAL_BATCH, help="global batch")
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--ddp", action="store_true", help="plain torch DDP (torchrun env)")
    parser.add_argument("--backend", default="gloo", help="with --ddp: gloo or p2pdl")
    parser.add_argument(
        "--compression", help="p2pdl's sharded step: int8-ef (8-bit, error feedback)"
    )
    parser.add_argument(
        "--json", dest="json_path", help="also write the result here ({rank}: per rank)"
    )
    return parser.parse_args(argv)


def tx_bytes() -> int:
    """Bytes this network namespace has sent on its interfaces other than loopback: the
    wire bytes of a step, counted by the kernel (one rank per namespace host)."""
    with open("/proc/net/dev", encoding="ascii") as dev:
        rows = [line.split(":", 1) for line in dev.readlines()[2:]]
    return sum(int(fields.split()[8]) for name, fields in rows if name.strip() != "lo")


class Meter:
    """Validation loss against training wall time, and wire bytes per step, both counted
    from the end of the first step: it carries the one-time costs (weights broadcast, DDP's
    buckets, kernels loaded), which are not what a long run spends its time on."""

    def __init__(self, steps: int, every: int) -> None:
        self.steps, self.every = steps, every
        self.curve: list[tuple[int, float, dict[str, float]]] = []
        self.begin = time.perf_counter()
        self._tx: int | None = None
        self.tx_per_step = 0.0

    def after(self, done: int, model: nn.Module) -> None:
        if done == 1:
            self._tx = tx_bytes()
            self.begin = time.perf_counter()
        elif done == self.steps and self._tx is not None:
            self.tx_per_step = (tx_bytes() - self._tx) / (self.steps - 1)
        if done % self.every == 0 or done == self.steps:
            elapsed = time.perf_counter() - self.begin
            self.curve.append((done, elapsed, validation_loss(model)))
            self.begin += time.perf_counter() - self.begin - elapsed  # evaluation is not training

    def result(self) -> dict[str, object]:
        return {"curve": self.curve, "tx_bytes_per_step": self.tx_per_step,
                "wall_s": self.curve[-1][1] if self.curve else 0.0}  # fmt: skip


def run_ddp(args: argparse.Namespace) -> dict[str, object]:
    """Unmodified torch DDP: only `--backend` names the process group's backend."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if args.backend == "p2pdl":
        import p2pdl.torch  # noqa: F401  (registers the backend)
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(SEED)
    model = DistributedDataParallel(make_model())
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    from p2pdl.torch import sample_plan

    meter = Meter(args.steps, args.eval_every)
    for step in range(args.steps):
        share = sample_plan(len(X_TRAIN), args.batch, step, world, SEED)[rank]
        optimizer.zero_grad(set_to_none=False)
        loss = next_byte_loss(model(X_TRAIN[share]), Y_TRAIN[share])
        loss.backward()
        optimizer.step()
        meter.after(step + 1, model.module)
    dist.destroy_process_group()
    return {"rank": rank, "world_size": world, **meter.result()}


def run_p2pdl(args: argparse.Namespace) -> dict[str, object]:
    """p2pdl's own loop: forward/backward, then the sharded optimizer step."""
    import p2pdl
    from p2pdl.torch import train

    job = make_task(global_batch=args.batch, lr=args.lr, compression=args.compression)
    with p2pdl.connect() as node:
        meter = Meter(args.steps, args.eval_every)
        train(
            job,
            node,
            steps=args.steps,
            global_batch=args.batch,
            on_step=lambda step, _metrics: meter.after(step + 1, job.model),
        )
        rank, world = node.rank, node.world_size
    job.close()
    return {"rank": rank, "world_size": world, **meter.result()}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)
    result = run_ddp(args) if args.ddp else run_p2pdl(args)
    result.update(
        system=f"ddp-{args.backend}"
        if args.ddp
        else "p2pdl" + (f":{args.compression}" if args.compression else ""),
        steps=args.steps,
        global_batch=args.batch,
        corpus=CORPUS_DIGEST,
        parameters=sum(p.numel() for p in make_model().parameters()),
    )
    if args.json_path:  # "{rank}" in the path: one file per rank
        Path(args.json_path.format(rank=result["rank"])).write_text(json.dumps(result))
    if result["rank"] == 0:
        for step, seconds, metrics in result["curve"]:
            print(f"step {step:5d}  {seconds:8.2f} s  val loss {metrics['val_loss']:.4f}")
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())

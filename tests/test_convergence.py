"""The real workload (examples/lm_stdlib.py) and the time-to-target arithmetic of
`bench convergence`: the same training on torch DDP-gloo and on p2pdl gives the same losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2pdl.bench.convergence import EXAMPLE, Run, time_to_target

ROOT = Path(__file__).resolve().parents[1]


def test_time_to_target_takes_the_references_final_loss() -> None:
    ref = Run("ddp-gloo", 4, [(10, 5.0, 3.0), (20, 10.0, 2.5)], 8e7)
    fast = Run("p2pdl:int8-ef", 4, [(10, 2.0, 2.9), (20, 4.0, 2.4999)], 2e7)
    never = Run("p2pdl", 4, [(10, 6.0, 3.1), (20, 12.0, 2.6)], 8e7)
    table = time_to_target([ref, fast, never])
    assert table["target_val_loss"] == 2.5
    rows = table["systems"]
    assert rows["ddp-gloo"]["time_to_target_s"] == 10.0
    assert rows["p2pdl:int8-ef"]["time_to_target_s"] == 4.0
    assert rows["p2pdl:int8-ef"]["speedup_vs_reference"] == 2.5
    assert rows["p2pdl"]["time_to_target_s"] is None
    assert rows["p2pdl"]["wire_bytes_per_step"] == 8e7
    with pytest.raises(ValueError, match="no ddp-gloo run"):
        time_to_target([fast])


def _run(launcher: list[str], script_args: list[str], out: Path) -> dict:
    """Two steps of the example under `launcher`; rank 0's result."""
    done = subprocess.run(
        [*launcher, str(EXAMPLE), *script_args, "--steps", "2", "--eval-every", "2",
         "--batch", "4", "--json", str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(Path(str(out).format(rank=0)).read_text())


def test_the_language_model_trains_identically_on_ddp_gloo_and_on_p2pdl(tmp_path: Path) -> None:
    """Same seed, data order, batch and optimizer: the held-out loss after two steps is the
    same (to float noise: the sums run in another order) on both."""
    p2pdl = _run(
        [sys.executable, "-m", "p2pdl", "launch", "-n", "2"], [], tmp_path / "p2pdl-{rank}.json"
    )
    ddp = _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
        ["--ddp", "--backend", "gloo"],
        tmp_path / "ddp-{rank}.json",
    )
    assert p2pdl["system"] == "p2pdl" and ddp["system"] == "ddp-gloo"
    assert p2pdl["parameters"] == ddp["parameters"] > 5_000_000
    ((p_step, _pt, p_metrics),) = p2pdl["curve"]
    ((d_step, _dt, d_metrics),) = ddp["curve"]
    assert p_step == d_step == 2
    assert p_metrics["val_loss"] == pytest.approx(d_metrics["val_loss"], rel=1e-5)

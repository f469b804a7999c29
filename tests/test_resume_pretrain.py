"""The real product: ``python -m pretrain`` (ViT-MAE on the shipped MNIST, 2 DataLoader workers)
killed with SIGKILL after its second checkpoint, rerun with the same command (resume=auto),
ends with the weights of an uninterrupted run, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch.checkpoint import TRAINER_FILE, latest

ARGS = [
    "trainer.max_steps=24",
    "trainer.checkpoint.every_steps=4",
    "trainer.log.every_steps=2",
    "trainer.log.progress=false",
    "linear_probe=false",
    "export=false",
    "picture=false",
]


def _pretrain(run_dir: Path, data_root: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(f"{run_dir}.log", "a") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "pretrain", f"run_dir={run_dir}", f"data.root={data_root}", *ARGS],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )


def _final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    newest = latest(run_dir / "checkpoints")
    assert newest is not None and newest.name == "step-00000024"
    return torch.load(newest / TRAINER_FILE, weights_only=True)["model"]


@pytest.mark.slow
def test_pretrain_cli_kill9_resume_bit_identical(tmp_path):
    data_root = tmp_path / "data"
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert _pretrain(reference, data_root).wait(timeout=900) == 0, Path(f"{reference}.log").read_text()[-3000:]
    proc = _pretrain(run, data_root)
    while not (run / "checkpoints" / "step-00000008").exists():
        assert proc.poll() is None, Path(f"{run}.log").read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert _pretrain(run, data_root).wait(timeout=900) == 0, Path(f"{run}.log").read_text()[-3000:]
    assert "resumed from" in Path(f"{run}.log").read_text()
    a, b = _final_model(reference), _final_model(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

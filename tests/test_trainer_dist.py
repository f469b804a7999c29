"""Real multi-process runs (torchrun, gloo, CPU) against a 1-process reference.

2 ranks x batch 8 x 2 accumulation steps and 1 rank x batch 32 see the same images per
step (see ``trainer_tiny``), so their weights must agree; DeepSpeed ZeRO-2 / ZeRO-3 runs
that stop, checkpoint and resume must agree with the uninterrupted 1-process run too.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from distrun import TORCHRUN
from trainer_tiny import run

pytestmark = pytest.mark.dist
SCRIPT = Path(__file__).with_name("trainer_tiny.py")
COMMON = ["epochs=2", "optim.warmup_steps=2", "optim.clip_grad=1.0", "log.every_steps=2"]


def torchrun(run_dir: Path, *overrides: str) -> dict:
    cmd = [
        *TORCHRUN,
        str(SCRIPT),
        str(run_dir),
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(run_dir / "final.pt")


def gloo_threads_at_exit(run_dir: Path) -> list[int]:
    """Per rank, the gloo worker threads left after launch.dist's teardown at exit (see trainer_tiny):
    one still running when the interpreter finalizes can abort the process after a complete run."""
    return [int((run_dir / f"gloo-threads-at-exit-{rank}").read_text()) for rank in range(2)]


def assert_same_weights(ref: dict, got: dict) -> None:
    for name, value in ref.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_two_processes_equal_one_process(tmp_path):
    two = torchrun(tmp_path / "two", *COMMON, "batch_size=8", "accum_steps=2", "skips=1")
    one = run(str(tmp_path / "one"), [*COMMON, "batch_size=32"])
    assert two["steps"] == one.steps == 6
    # rank r reports r + 1 skipped samples per batch, 2 batches per step: the log shows the sum over ranks
    records = [json.loads(r) for r in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if '"train"' in r]
    assert [r["skipped_samples"] for r in records] == [12, 24, 36]
    assert two["reductions"] == 6  # one bucket all-reduce per optimizer step, none on the first micro-batch
    assert_same_weights(one.task.state_dict(), two["state"])
    assert two["loss"] == pytest.approx(one.final_loss, rel=1e-5)
    assert gloo_threads_at_exit(tmp_path / "two") == [0, 0]


@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_deepspeed_zero_trains_checkpoints_and_resumes(tmp_path, stage):
    ds = [*COMMON, "optim.schedule=constant", "batch_size=8", "backend=deepspeed", f"zero_stage={stage}"]
    # a fresh engine in the same processes resumes the first run's checkpoint (saves a torchrun start)
    resumed = torchrun(tmp_path / "ds", *ds, "max_steps=3", "--then", "max_steps=5")
    first = tmp_path / "ds" / "checkpoints" / "step-00000003"
    assert (first / "COMPLETE").is_file() and list(first.rglob("*optim_states.pt"))  # DeepSpeed's own files
    assert resumed["steps"] == 5
    log = (tmp_path / "ds" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in log if '"train"' in r] == [2, 3, 4, 5]  # the second fit began at 3
    one = run(str(tmp_path / "one"), [*COMMON, "optim.schedule=constant", "batch_size=16", "max_steps=5"])
    assert_same_weights(one.task.state_dict(), resumed["state"])
    # ZeRO-3 keeps its groups: DeepSpeed memoizes PartitionedParameterCoordinator.__params_to_release in a
    # class-level lru_cache, which holds every coordinator (so its parameters and their groups) for good
    if stage == 2:
        assert gloo_threads_at_exit(tmp_path / "ds") == [0, 0]  # DeepSpeed's own subgroups too

"""Changing a run on resume: a new schedule (length, warmup, lr) is taken; a new batch continues at the same sample."""

from __future__ import annotations

import json
import math

import pytest
from trainer_tiny import run

BASE = ["optim.warmup_steps=2", "optim.base_lr=0.05", "optim.min_lr=0.001", "log.every_steps=1", "batch_size=16"]


def _logged_lr(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in records if r["split"] == "train"}


def _cosine(step: int, peak: float, total: int, warmup: int = 2, floor: float = 0.001) -> float:
    """The lr logged after ``step`` (the one step ``step + 1`` uses)."""
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))


def test_extending_a_finished_run_follows_the_longer_schedule(tmp_path):
    first = run(str(tmp_path), [*BASE, "max_steps=6"])
    assert first.steps == 6 and _logged_lr(tmp_path)[6] == pytest.approx(0.001)  # finished at min_lr
    second = run(str(tmp_path), [*BASE, "max_steps=12"])
    lr = _logged_lr(tmp_path)
    peak = 0.05 * 16 / 256
    assert second.steps == 12
    for step in range(7, 13):  # steps 7-12 train on the 12-step cosine, not at the old schedule's floor
        assert lr[step] == pytest.approx(_cosine(step, peak, 12)), step
    assert lr[7] > 0.1 * peak


def test_shortening_a_run_takes_its_length_and_peak_lr(tmp_path):
    run(str(tmp_path), [*BASE, "max_steps=12", "checkpoint.every_steps=6", "checkpoint.keep=3"])
    middle = tmp_path / "checkpoints" / "step-00000006"
    shorter = [*BASE, "max_steps=9", "optim.base_lr=0.1", f"checkpoint.resume={middle}"]
    result = run(str(tmp_path), shorter)
    lr = _logged_lr(tmp_path)
    assert result.steps == 9
    for step in range(7, 10):
        assert lr[step] == pytest.approx(_cosine(step, 0.1 * 16 / 256, 9)), step


@pytest.mark.parametrize("change,images,resumed", [("batch_size=8", 8, 8), ("accum_steps=2", 32, 2)])
def test_changing_the_batch_on_resume_continues_at_the_same_sample(tmp_path, caplog, change, images, resumed):
    """Another global batch (issue 15; DDP, one process here): 4 steps of 16 reached sample 64, which is
    step 8 of batch 8 or step 2 of batch 32; the run continues there, says so, and trains on this
    run's 12-step schedule at the peak lr of the new batch (the same samples: test_resume_elastic)."""
    from faults_driver import MaskedTiny

    from launch.config import TrainerConfig, load_config
    from launch.data import DataConfig
    from launch.trainer import fit

    data = load_config(DataConfig, None, ["source=digits", f"root={tmp_path / 'data'}", "workers=0"])
    quiet = ["log.progress=false", "log.tensorboard=false", "eval_every_epochs=0", "log.images_every_epochs=0"]
    for overrides in (["max_steps=4"], ["max_steps=12", change]):
        cfg = load_config(TrainerConfig, None, [*BASE, *quiet, *overrides])
        with caplog.at_level("WARNING", logger="launch.trainer"):
            result = fit(MaskedTiny(seeded=True), cfg, data, tmp_path / "run", seed=0, img_size=8)
    assert f"global batch 16 -> {images} images per step" in caplog.text
    assert f"as step {resumed} of 12 (was step 4)" in caplog.text
    assert result.steps == 12
    lr = _logged_lr(tmp_path / "run")
    for step in range(resumed + 1, 13):
        assert lr[step] == pytest.approx(_cosine(step, 0.05 * images / 256, 12)), step

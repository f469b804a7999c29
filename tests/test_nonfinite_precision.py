"""A poisoned (NaN) step is skipped with the weights unchanged and the next step trains, in
every precision path: fp16 with its GradScaler and gradient clipping, and DeepSpeed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from faults_driver import finish, start
from trainer_tiny import TinyTask, synthetic_factory

from launch.checkpoint import TRAINER_FILE, load_file
from launch.config import TrainerConfig, load_config
from launch.trainer import Trainer


@pytest.fixture
def cpu_grad_scaler(monkeypatch):
    """Accelerate builds the fp16 GradScaler on accelerators only: give it the CPU one, so the
    GradScaler protocol (scale, unscale_ for clipping, step, update) runs here as on CUDA."""
    init = Accelerator.__init__

    def with_scaler(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self.mixed_precision == "fp16":
            self.scaler, self.native_amp = torch.amp.GradScaler("cpu"), True

    monkeypatch.setattr(Accelerator, "__init__", with_scaler)


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:08d}" / TRAINER_FILE)["model"]


def test_fp16_clipped_run_skips_a_poisoned_step_and_trains_on(tmp_path, cpu_grad_scaler):
    """Step 2 is poisoned: skipped (weights of step 1 kept), the scale backs off once, and the
    clip of step 3 unscales again (it raised "unscale_() has already been called")."""
    cfg = load_config(
        TrainerConfig,
        None,
        [
            "log.progress=false",
            "precision=fp16",
            "optim.clip_grad=1.0",
            "max_steps=4",
            "batch_size=16",
            "log.every_steps=1",
            "checkpoint.every_steps=1",
            "checkpoint.keep=10",
        ],
    )
    torch.manual_seed(0)
    trainer = Trainer(TinyTask(), cfg, None, tmp_path, seed=0, img_size=4, loader_factory=synthetic_factory(poison=1))
    assert trainer.backend.scaler is not None
    result = trainer.fit()
    assert result.steps == 4 and math.isfinite(result.final_loss)
    weights = {step: _weights(tmp_path, step) for step in (1, 2, 3)}
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])
    assert not torch.equal(weights[2]["net.1.weight"], weights[3]["net.1.weight"])
    assert all(torch.isfinite(v).all() for v in result.task.state_dict().values())
    assert trainer.backend.scaler.get_scale() == 2.0**16 * 0.5  # one back-off, for the poisoned step


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("digits")


def _masters(run: Path, step: int) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints" / f"step-{step:08d}"), tag="engine")


@pytest.mark.dist
@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow), 3])
def test_deepspeed_bf16_skips_a_poisoned_step_and_trains_on(tmp_path, digits, stage):
    """Rank 0's batch of step 3 is NaN: under ZeRO the gradients live in DeepSpeed's own buffers
    (``p.grad`` is None), so the skip must clear those; the fp32 masters of steps 2 and 3 are
    equal, step 4 trains, every weight stays finite."""
    run = tmp_path / "run"
    code, log = finish(
        start(
            run,
            "--fault=nan@3",
            "backend=deepspeed",
            f"zero_stage={stage}",
            "precision=bf16",
            "max_steps=5",
            "checkpoint.every_steps=1",
            "checkpoint.keep=100",
            "log.every_steps=1",
            data_root=digits,
            nproc=2,
        ),
        run,
        timeout=600,
    )
    assert code == 0, log[-3000:]
    assert "step 3: non-finite loss or gradients, step skipped (1 in a row)" in log
    weights = {step: _masters(run, step) for step in (2, 3, 4)}
    assert all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])
    assert not torch.equal(weights[3]["decoder.weight"], weights[4]["decoder.weight"])
    final = torch.load(run / "final.pt")
    assert all(torch.isfinite(v).all() for v in [*weights[4].values(), *final.values()])

"""The shipped launch files agree with the run stack, and a contradicting launcher is refused."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from launch import launcher
from launch.config import TrainerConfig, load_config
from launch.errors import ConfigError
from launch.launcher import check_launcher, deepspeed_config

ROOT = Path(__file__).resolve().parents[1]


def _cfg(*overrides: str) -> TrainerConfig:
    return load_config(TrainerConfig, None, list(overrides))


@pytest.mark.parametrize("stage", [2, 3])
def test_shipped_deepspeed_files_fill_from_the_run_config(stage):
    accelerate = yaml.safe_load((ROOT / f"launch/accelerate/zero{stage}.yaml").read_text())
    assert accelerate["distributed_type"] == "DEEPSPEED"
    json_file = ROOT / accelerate["deepspeed_config"]["deepspeed_config_file"]
    cfg = _cfg(
        "backend=deepspeed",
        f"zero_stage={stage}",
        "batch_size=32",
        "accum_steps=4",
        "precision=bf16",
        "optim.clip_grad=3.0",
        f"deepspeed_config={json_file}",
    )
    ds = deepspeed_config(cfg, world=16)
    assert ds["train_batch_size"] == 32 * 4 * 16 and ds["gradient_accumulation_steps"] == 4
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False} and ds["gradient_clipping"] == 3.0
    assert ds["zero_optimization"]["stage"] == stage and ds["zero_optimization"]["overlap_comm"] is True
    with pytest.raises(ConfigError, match=f"sets zero_optimization.stage={stage} but the run config gives"):
        deepspeed_config(cfg.model_copy(update={"zero_stage": 5 - stage}), world=16)


def test_accelerate_files_leave_precision_to_the_run_config():
    """'no' where Accelerate would otherwise pick one; absent from DeepSpeed files, where
    Accelerate refuses any value next to a DeepSpeed config file."""
    for path in sorted((ROOT / "launch/accelerate").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        deepspeed = config["distributed_type"] == "DEEPSPEED"
        assert config.get("mixed_precision", "absent") == ("absent" if deepspeed else "no"), path.name


def test_launcher_environment_must_agree():
    env: dict[str, str] = {}
    check_launcher(_cfg(), env)
    env["ACCELERATE_MIXED_PRECISION"] = "bf16"
    with pytest.raises(ConfigError, match="launcher asks mixed_precision=bf16 but trainer.precision=fp32"):
        check_launcher(_cfg(), env)
    check_launcher(_cfg("precision=bf16"), env)
    env["ACCELERATE_USE_DEEPSPEED"] = "true"
    with pytest.raises(ConfigError, match="DeepSpeed Accelerate config but trainer.backend=ddp"):
        check_launcher(_cfg("precision=bf16"), env)
    env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] = "3"
    with pytest.raises(ConfigError, match="ZeRO stage 3 but trainer.zero_stage=2"):
        check_launcher(_cfg("precision=bf16", "backend=deepspeed"), env)
    check_launcher(_cfg("precision=bf16", "backend=deepspeed", "zero_stage=3"), env)


def test_launcher_deepspeed_file_is_read_from_the_environment(monkeypatch, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_accumulation_steps": 8}))
    monkeypatch.setitem(launcher.LAUNCH_ENV, "ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    with pytest.raises(ConfigError, match="sets gradient_accumulation_steps=8 but the run config gives 1"):
        deepspeed_config(_cfg("backend=deepspeed"), world=2)


def test_slurm_script_requeues_on_the_preemption_status():
    from launch.preemption import EXIT_REQUEUE

    script = (ROOT / "launch/slurm/pretrain.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "launch/slurm/pretrain.sbatch")]).returncode == 0
    assert f"EXIT_REQUEUE={EXIT_REQUEUE}" in script and "scontrol requeue" in script
    assert "--rdzv_backend c10d" in script and "trainer.checkpoint.resume=auto" in script


def test_a_later_ddp_fit_follows_its_own_config_after_a_deepspeed_launch(monkeypatch):
    """The probe after a DeepSpeed pretraining started by `accelerate launch`: the launcher was
    the first fit's business; the DDP fit neither trips the check nor gets a DeepSpeed engine."""
    from launch.backend import Backend

    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": "no"}
    monkeypatch.setattr(launcher, "LAUNCH_ENV", env)
    monkeypatch.setattr(Backend, "_launcher_checked", False)
    with pytest.raises(ConfigError, match="DeepSpeed Accelerate config but trainer.backend=ddp"):
        Backend(_cfg())  # the fit the launcher started must agree with it
    monkeypatch.setattr(Backend, "_launcher_checked", True)
    later = Backend(_cfg())
    assert later.accelerator.distributed_type.value != "DEEPSPEED" and "ACCELERATE_USE_DEEPSPEED" not in os.environ

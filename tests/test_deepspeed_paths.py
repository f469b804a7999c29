"""DeepSpeed in the precision and at the scale it is used: real 2-process runs (torchrun, gloo).

ZeRO-3 runs set ``stage3_param_persistence_threshold`` 0, so every parameter of the tiny
models is partitioned as a ViT-L's are. What is checked: every task trains in bf16 at every
stage; evaluation, pictures, exports and the probe read whole weights; results and exports
are DeepSpeed's fp32 masters; exports from every stage hold every tensor and load in timm.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import timm
import torch
from distrun import TORCHRUN

pytestmark = pytest.mark.dist
TESTS = Path(__file__).parent
ROOT = TESTS.parent
TINY_MAE = [
    "model.preset=mae_vit_mnist_p4",
    "model.img_size=8",
    "model.embed_dim=16",
    "model.depth=1",
    "model.num_heads=2",
    "model.decoder_embed_dim=16",
    "model.decoder_depth=1",
    "model.decoder_num_heads=2",
]


def torchrun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [*TORCHRUN, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def bf16_pretraining(run_dir: Path, digits: Path, stage: int) -> list[str]:
    """``-m pretrain`` of the tiny MAE on the digits under DeepSpeed ZeRO ``stage`` in bf16."""
    return [
        "-m",
        "pretrain",
        f"run_dir={run_dir}",
        f"data.root={digits}",
        "data.source=digits",
        "data.workers=0",
        "data.hflip=0",
        *TINY_MAE,
        "trainer.backend=deepspeed",
        f"trainer.zero_stage={stage}",
        "trainer.precision=bf16",
    ]


def ds_json(tmp_path: Path, stage: int) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}))
    return path


def masters(ckpt: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's fp32 master weights: DeepSpeed's own consolidation, or at ZeRO stage 0
    (which it cannot consolidate) the trainer's copy."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from launch.checkpoint import TRAINER_FILE, load_file

    state = load_file(ckpt / TRAINER_FILE)
    return state["model"] if "model" in state else get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="engine")


def assert_masters(state: dict[str, torch.Tensor], ckpt: Path) -> None:
    """``state`` holds the fp32 masters exactly (the bf16 module copy differs in the 3rd digit)."""
    for name, master in masters(ckpt).items():
        if name in state and "pos_embed" not in name:  # frozen: no master, DeepSpeed saves the module's
            assert state[name].dtype == torch.float32 and torch.equal(state[name], master.float()), name


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from launch.data import DataConfig, dataset_info

    root = tmp_path_factory.mktemp("data")
    dataset_info(DataConfig(source="digits", root=str(root)))
    return root


@pytest.mark.parametrize(
    "stage",
    [
        3,
        pytest.param(0, marks=pytest.mark.slow),
        pytest.param(1, marks=pytest.mark.slow),
        pytest.param(2, marks=pytest.mark.slow),
    ],
)
def test_bf16_pretraining_evaluates_pictures_exports_and_probes(tmp_path, digits, stage):
    """``-m pretrain`` under DeepSpeed bf16: eval + pictures every epoch, export, linear probe.
    The exports are the fp32 masters; ``mae-export`` of the checkpoint gives every tensor."""
    from pretrain.export import load_full, run

    run_dir = tmp_path / "run"
    torchrun(
        *bf16_pretraining(run_dir, digits, stage),
        f"trainer.deepspeed_config={ds_json(tmp_path, stage)}",
        "trainer.max_steps=4",
        "trainer.batch_size=64",
        "trainer.eval_batches=1",
        "trainer.log.every_steps=1",
        "trainer.log.progress=false",
        "trainer.log.images_every_epochs=1",
        "probe.trainer.max_steps=2",
        "probe.trainer.batch_size=32",
        "probe.trainer.eval_batches=1",
        "probe.trainer.log.progress=false",
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["split"] == "train"]
    assert len(train) == 4 and all(math.isfinite(x) for x in train)
    assert [r["step"] for r in records if r["split"] == "eval"] == [4] and math.isfinite(records[-1]["loss"])
    assert (run_dir / "reconstruction.png").stat().st_size > 0
    assert json.loads((run_dir / "summary.json").read_text())["probe_top1"] is not None
    ckpt = run_dir / "checkpoints" / "step-00000004"
    exported, _ = load_full(run_dir / "export" / "full")
    assert_masters(exported.state_dict(), ckpt)
    assert run([str(ckpt), "--out", str(tmp_path / "again")]) == 0  # from DeepSpeed's files, every stage
    again, _ = load_full(tmp_path / "again" / "full")
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], value, rtol=0, atol=0, msg=name)
    for folder in (run_dir / "export" / "timm", tmp_path / "again" / "timm"):
        vit = timm.create_model(f"local-dir:{folder}", pretrained=True)
        assert vit(torch.zeros(1, 1, 8, 8)).shape == (1, 16)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_task_trains_under_deepspeed_bf16(tmp_path, stage):
    """MAE, probe, fine-tune (mixup + cutmix) and every single-optimizer baseline: finite losses,
    and ``fit`` hands back the task itself, whole, in fp32, with DeepSpeed's attributes gone."""
    out = tmp_path / "out"
    kinds = ["mae", "probe", "finetune", "ae", "dae", "cae", "vae", "sdae"]
    torchrun(str(TESTS / "deepspeed_tasks.py"), str(out), str(stage), "bf16", ",".join(kinds))
    results = json.loads((out / "results.json").read_text())
    assert sorted(results) == sorted(kinds)
    for kind, record in results.items():
        fits = {k: v for k, v in record.items() if isinstance(v, dict)}
        for name, fit in fits.items():
            values = [fit["loss"], *fit["eval"].values()]
            assert all(math.isfinite(v) for v in values) and fit["same_task"], (kind, name, fit)
        assert record["whole"] and record["dtypes"] == ["torch.float32"] and not record["deepspeed_leftovers"], kind
    assert_masters(torch.load(out / "states.pt")["mae"], Path(results["mae"]["train"]["checkpoint"]))


def accelerate_env(config: Path) -> dict[str, str]:
    """The ``ACCELERATE_*`` variables ``accelerate launch --config_file CONFIG`` gives its processes,
    computed by Accelerate's own launcher code (on a CPU ``accelerate launch`` starts one process,
    so torchrun starts the two)."""
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", "2", "-m", "pretrain"])
    args, defaults, mixed_from_file = _validate_launch_command(args)
    fields = [*defaults.deepspeed_config, *(["mixed_precision"] if mixed_from_file else [])]
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)  # as accelerate's launch_command
    _, env = prepare_deepspeed_cmd_env(args)
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_accelerate_launch_with_the_shipped_zero_files_runs_through_the_probe(tmp_path, digits, stage):
    """``accelerate launch --config_file launch/accelerate/zeroN.yaml -m pretrain ...``: DeepSpeed
    pretraining with the shipped JSON, then the DDP linear probe in the same processes."""
    run_dir = tmp_path / "run"
    env = accelerate_env(ROOT / "launch" / "accelerate" / f"zero{stage}.yaml")
    torchrun(
        *bf16_pretraining(run_dir, digits, stage),
        "trainer.max_steps=2",
        "trainer.batch_size=64",
        "trainer.eval_batches=1",
        "trainer.log.progress=false",
        "probe.trainer.max_steps=2",
        "probe.trainer.batch_size=32",
        "probe.trainer.eval_batches=1",
        "probe.trainer.log.progress=false",
        env=env,
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"]) and summary["probe_top1"] is not None
    assert list((run_dir / "checkpoints" / "step-00000002" / "engine").glob("*optim_states.pt"))  # DeepSpeed's files

"""FSDP2 (``trainer.backend=fsdp``) in real processes: torchrun, gloo, CPU.

2 ranks x batch 8 x 2 accumulation steps see the same images per step as 1 rank x batch 32
(see ``trainer_tiny``): the sharded run must land on the DDP weights. Its asynchronous
sharded checkpoint, written by 2 ranks while training went on, must resume bit-identically
with 2; a sharded MAE pretraining checkpoint exports to timm from one process.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from distrun import TORCHRUN
from test_trainer_dist import COMMON, assert_same_weights, torchrun
from trainer_tiny import run

from pretrain.export import load_full
from pretrain.export import main as export_main

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[1]


def test_fsdp_two_processes_equal_one_process_and_resume_bit_identically(tmp_path):
    run_dir = tmp_path / "fsdp"
    fsdp = [
        *COMMON,
        "batch_size=8",
        "accum_steps=2",
        "backend=fsdp",
        "checkpoint.every_steps=2",
        "checkpoint.async_save=true",
        "checkpoint.keep=3",
    ]
    # the first fit runs 6 steps uninterrupted; the second resumes the first's step-4 checkpoint
    resumed = torchrun(run_dir, *fsdp, "--then", f"checkpoint.resume={run_dir / 'checkpoints' / 'step-00000004'}")
    first = torch.load(run_dir / "first.pt")
    one = run(str(tmp_path / "one"), [*COMMON, "batch_size=32"])
    assert first["steps"] == resumed["steps"] == one.steps == 6
    assert_same_weights(one.task.state_dict(), first["state"])
    for name, value in first["state"].items():
        assert torch.equal(resumed["state"][name], value), name
    step4 = run_dir / "checkpoints" / "step-00000004"
    assert (step4 / "COMPLETE").is_file() and {"__0_0.distcp", "__1_0.distcp"} <= {
        p.name for p in (step4 / "sharded").iterdir()
    }
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


TINY_MAE = [
    "model.depth=2",
    "model.decoder_depth=1",
    "trainer.max_steps=3",
    "trainer.batch_size=8",
    "trainer.backend=fsdp",
    "trainer.precision=bf16",
    "trainer.eval_batches=2",
    "trainer.log.tensorboard=false",
    "trainer.log.progress=false",
    "linear_probe=false",
    "picture=false",
    "data.workers=0",
]


@pytest.mark.slow
def test_sharded_pretraining_checkpoint_exports_to_timm_from_one_process(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        *TORCHRUN,
        "-m",
        "pretrain",
        f"run_dir={run_dir}",
        f"data.root={tmp_path / 'data'}",
        *TINY_MAE,
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = run_dir / "checkpoints" / "step-00000003"
    assert (ckpt / "sharded" / ".metadata").is_file() and "model" not in torch.load(
        ckpt / "trainer.pt", weights_only=True
    )
    assert export_main([str(run_dir), "--out", str(tmp_path / "out")]) == 0  # this process has no process group
    # the run's own export holds the weights its 2 ranks all-gathered at the end
    gathered = safetensors.torch.load_file(run_dir / "export" / "full" / "model.safetensors")
    consolidated = safetensors.torch.load_file(tmp_path / "out" / "full" / "model.safetensors")
    assert gathered.keys() == consolidated.keys() and all(torch.equal(gathered[k], consolidated[k]) for k in gathered)
    vit = timm.create_model(f"local-dir:{tmp_path / 'out' / 'timm'}", pretrained=True).eval()
    full, _ = load_full(tmp_path / "out" / "full")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), full.forward_features(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_bench_backends_section_rows(tmp_path):
    from benchmarks.__main__ import main as bench_main

    out = tmp_path / "bench.json"
    assert (
        bench_main(
            [
                "sections=[backends]",
                "backends=[ddp,fsdp]",
                "backend_preset=mae_vit_tiny",
                "img_size=32",
                "batch_size=2",
                "warmup=1",
                "steps=1",
                "repeats=1",
                "model_overrides={depth: 1, decoder_depth: 1}",
                f"out={out}",
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())["backends"]["rows"]
    assert [r["backend"] for r in rows] == ["ddp", "fsdp"]
    assert all(r["images_per_s"] > 0 and len(r["peak_memory_mb_per_rank"]) == 2 for r in rows)
    assert rows[0]["final_loss"] == pytest.approx(rows[1]["final_loss"], rel=1e-4)  # same model, same batches

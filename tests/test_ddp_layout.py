"""DDP's gradient buckets: no parameter whose gradient layout differs from its bucket view.

DDP warns "Grad strides do not match bucket view strides" when a gradient comes back in another
memory layout than its parameter (e.g. a channels-last conv weight gradient for a contiguous
weight), and then copies that gradient at every all-reduce. A 2-process pretraining run on
3-channel photos (the patch-embedding conv sees RGB input) must not warn."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distrun import TORCHRUN
from PIL import Image

from finetune.backbone import build_vit, resolve_backbone
from pretrain.presets import MAEConfig
from pretrain.task import build_task


def _photo_folder(root: Path, size: int = 32) -> Path:
    """An ImageFolder of 48 RGB crops (two classes) from scikit-image's sample photos."""
    import skimage.data

    for i, name in enumerate(["astronaut", "coffee", "chelsea", "rocket"]):
        photo = Image.fromarray(getattr(skimage.data, name)()[..., :3])
        for j in range(12):
            split = "val" if j >= 10 else "train"
            out = root / split / "ab"[i % 2]
            out.mkdir(parents=True, exist_ok=True)
            box = (17 * j, 13 * j, 17 * j + 160, 13 * j + 160)
            photo.crop(box).resize((size, size)).save(out / f"{name}-{j}.jpg")
    return root


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_every_gradient_has_its_parameters_layout(layout: torch.memory_format) -> None:
    """What DDP's bucket views assume, for the MAE and the fine-tuned ViT, also for channels-last
    input (a decoder's HWC buffer viewed as CHW)."""
    task = build_task(MAEConfig(preset="mae_vit_tiny", img_size=32, depth=1, decoder_depth=1))
    vit = build_vit(resolve_backbone(task.model), num_classes=3)
    images = torch.randn(2, 3, 32, 32).contiguous(memory_format=layout)
    (task({"image": images})["loss"] + vit(images).sum()).backward()
    for name, param in [*task.named_parameters(), *vit.named_parameters()]:
        assert param.is_contiguous(), name
        assert param.grad is None or param.grad.stride() == param.stride(), name


@pytest.mark.dist
@pytest.mark.slow
def test_two_process_pretraining_copies_no_gradient(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    photos = _photo_folder(tmp_path / "photos")
    subprocess.run(
        [sys.executable, "-m", "launch.data", str(photos), "--out", str(tmp_path / "shards")],
        env=env,
        check=True,
        capture_output=True,
    )
    cmd = [
        *TORCHRUN,
        "-m",
        "pretrain",
        f"data.source={tmp_path / 'shards'}",
        "data.workers=0",
        f"run_dir={tmp_path / 'run'}",
        "model.preset=mae_vit_tiny",
        "model.img_size=32",
        "model.depth=1",
        "model.decoder_depth=1",
        "trainer.max_steps=2",
        "trainer.batch_size=8",
        "trainer.log.progress=false",
        "linear_probe=false",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bucket view strides" not in proc.stderr, proc.stderr[-3000:]
    assert np.isfinite(float(proc.stdout.split("final loss ")[1].split()[0]))

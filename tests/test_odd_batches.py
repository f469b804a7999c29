"""An odd or short last batch never crashes a recipe nor outweighs full batches (issue 13 row 4).

Training loaders drop the incomplete last global micro-batch, as the official MAE code does
(``drop_last=True``): the same number of full batches on every rank; evaluation still reads
every sample once. A batch left odd by a corrupt sample is mixed on its even part."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from distrun import TORCHRUN

from finetune.backbone import build_vit, resolve_backbone
from finetune.finetune import FinetuneConfig, FinetuneTask, build_mixup, run_finetune
from launch.data import DataConfig, build_loader
from launch.data.prepare import prepare
from pretrain.presets import create_mae

QUIET = {"log": {"progress": False, "tensorboard": False}}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sklearn digits as shards: train 1,497 samples in 8 shards, val 300."""
    out = tmp_path_factory.mktemp("odd") / "digits"
    prepare("digits", out, shard_samples=200)
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_training_loader_drops_the_short_last_batch_on_every_rank(digits: Path, world: int) -> None:
    cfg = DataConfig(source=str(digits), workers=2, shuffle_buffer=50)
    keys: list[str] = []
    for rank in range(world):
        loader = build_loader(
            cfg,
            "train",
            preset="pretrain",
            batch_size=64,
            img_size=8,
            seed=0,
            rank=rank,
            world_size=world,
            drop_last=True,
        )
        batches = list(loader)
        assert len(batches) == len(loader) == 1497 // (world * 64)  # equal on every rank: nobody waits
        assert all(len(b["key"]) == 64 for b in batches)  # every micro-batch weighs the same in the DDP mean
        keys += [k for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys)) == 1497 // (world * 64) * world * 64  # no sample twice within the epoch


def test_eval_loader_still_reads_every_sample_once(digits: Path) -> None:
    cfg = DataConfig(source=str(digits), workers=0)
    keys = [
        k
        for rank in range(2)
        for b in build_loader(cfg, "val", preset="eval", batch_size=64, img_size=8, seed=0, rank=rank, world_size=2)
        for k in b["key"]
    ]
    assert len(keys) == len(set(keys)) == 300


@pytest.mark.parametrize("size", [7, 1])
def test_mixup_batch_left_odd_by_a_corrupt_sample_trains(size: int) -> None:
    torch.manual_seed(0)
    vit = build_vit(
        resolve_backbone(create_mae("mae_vit_mnist_p7", depth=1, embed_dim=32, num_heads=2)), num_classes=10
    )
    task = FinetuneTask(vit, mixup=build_mixup(FinetuneConfig(), 10), smoothing=0.1).train()
    loss = task({"image": torch.randn(size, 1, 28, 28), "label": torch.arange(size) % 10})["loss"]
    loss.backward()
    assert torch.isfinite(loss) and vit.head.weight.grad is not None


def test_default_recipe_finetunes_a_split_with_an_odd_last_batch(digits: Path, tmp_path: Path) -> None:
    """1,497 digits at batch 256: 5 full batches and one of 217, which crashed timm's Mixup."""
    torch.manual_seed(0)
    mae = create_mae("mae_vit_mnist_p7", depth=1, embed_dim=32, num_heads=2)
    cfg = FinetuneConfig.model_validate({"img_size": 28, "trainer": {"epochs": 1, "batch_size": 256, **QUIET}})
    assert cfg.mixup > 0 and cfg.cutmix > 0  # the default recipe
    data = DataConfig(source=str(digits), workers=0)
    result = run_finetune(cfg, backbone=mae, data=data, run_dir=tmp_path, seed=0)
    assert result.steps == 5 and 0 <= result.eval["top1"] <= 100


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_finetune_the_default_recipe_to_the_end_of_the_epoch(digits: Path, tmp_path: Path) -> None:
    """748 / 749 digits per rank at batch 64 left rank 1 a last batch of 45: Mixup's assertion there,
    rank 0 waiting in the all-reduce. Now 11 full batches on each rank."""
    backbone = "{img_size: 28, in_chans: 1, patch_size: 7, depth: 1, embed_dim: 32, num_heads: 2}"
    cmd = [
        *TORCHRUN,
        "-m",
        "finetune.finetune",
        "backbone=vit_tiny_patch16_224",
        f"finetune.model_args={backbone}",
        f"data.source={digits}",
        "data.workers=0",
        "finetune.img_size=28",
        "finetune.trainer.epochs=1",
        "finetune.trainer.log.progress=false",
        f"run_dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(11 steps," in proc.stdout

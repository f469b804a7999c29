"""The shipped recipes against the official MAE code where they used to deviate (issue 13)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from finetune.backbone import resolve_backbone
from finetune.finetune import FinetuneConfig, build_classifier
from launch.config import OptimConfig, load_config
from launch.optim import build_optimizer
from pretrain.config import PretrainConfig
from pretrain.presets import create_mae

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_final_norm_and_head_train_at_the_full_lr(pool: str) -> None:
    """Official ``param_groups_lrd``: blocks decay, everything after them (final norm or fc_norm, head)
    trains at ``lr``; timm's group_matcher merges the final norm into the last block's group."""
    vit = VisionTransformer(
        img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=3, num_heads=2, num_classes=10, global_pool=pool
    )
    opt = build_optimizer(vit, OptimConfig(layer_decay=0.5), lr=1.0)
    lr_of = {n: g["lr"] for g in opt.param_groups for p in g["params"] for n, q in vit.named_parameters() if q is p}
    norm = "norm" if pool == "token" else "fc_norm"
    assert lr_of[f"{norm}.weight"] == lr_of[f"{norm}.bias"] == lr_of["head.weight"] == pytest.approx(1.0)
    assert lr_of["blocks.2.norm1.weight"] == pytest.approx(0.5)  # a block's own norms still decay


def test_finetune_head_starts_at_the_official_std() -> None:
    torch.manual_seed(0)
    mae = create_mae("mae_vit_mnist_p7", depth=1, embed_dim=64, num_heads=2)
    vit = build_classifier(FinetuneConfig(), resolve_backbone(mae), num_classes=100)
    assert vit.head.weight.std().item() == pytest.approx(2e-5, rel=0.1)  # timm's default: 0.02
    assert torch.count_nonzero(vit.head.bias) == 0


def test_imagenet_probe_trains_on_random_resized_crops_with_flips() -> None:
    cfg = load_config(PretrainConfig, CONFIGS / "pretrain" / "vit_base_in1k.yaml")
    assert cfg.probe.train_preset == "pretrain" and cfg.data.hflip == 0.5
    assert cfg.probe.trainer.optim.name == "lars" and cfg.probe.trainer.optim.weight_decay == 0.0

"""Every backbone spelling resolves to the same strict timm ViT (same features as the MAE encoder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.backbone import build_vit, resolve_backbone
from launch.errors import CheckpointError, ConfigError
from launch.export import export_timm
from pretrain.export import export_full
from pretrain.presets import create_mae

X = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def mae() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_mae("mae_vit_mnist_p7", depth=2, embed_dim=128, num_heads=2).eval()  # heads of 64, as official


def _features(spec) -> torch.Tensor:
    vit = build_vit(resolve_backbone(spec), num_classes=0).eval()
    with torch.no_grad():
        return vit.forward_features(X)


def test_all_sources_give_the_encoder_features(mae, tmp_path: Path) -> None:
    with torch.no_grad():
        want = mae.forward_features(X)
    export_timm(mae, tmp_path / "export" / "timm", mean=(0.13,), std=(0.31,))
    export_full(mae, tmp_path / "export" / "full", mean=(0.13,), std=(0.31,))
    torch.save({"model": mae.state_dict()}, tmp_path / "official.pth")
    for spec in (
        mae,
        tmp_path / "export",
        tmp_path / "export" / "timm",
        tmp_path / "export" / "full",
        tmp_path / "official.pth",
    ):
        assert torch.allclose(_features(spec), want, atol=1e-6), spec
    source = resolve_backbone(tmp_path / "export")
    assert source.mean == (0.13,) and source.std == (0.31,)


def test_heads_and_pooling(mae) -> None:
    vit = build_vit(resolve_backbone(mae), num_classes=10, global_pool="avg", drop_path_rate=0.1)
    assert vit.head.out_features == 10 and isinstance(vit.norm, torch.nn.Identity)
    assert torch.equal(vit.fc_norm.weight, torch.ones(128))  # fresh, as in the official fine-tune
    token = build_vit(resolve_backbone(mae), num_classes=3, global_pool="token")
    assert torch.equal(token.norm.weight, mae.norm.weight) and token.head.out_features == 3


def test_timm_name_is_random_init_and_unknown_names_fail() -> None:
    source = resolve_backbone("vit_tiny_patch16_224", {"img_size": 28, "patch_size": 7, "in_chans": 1, "depth": 1})
    assert source.state is None
    assert build_vit(source, num_classes=0).patch_embed.proj.in_channels == 1
    with pytest.raises(ConfigError, match="neither an existing export"):
        resolve_backbone("vit_tinyy")


def test_foreign_checkpoint_is_one_line(tmp_path: Path) -> None:
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError):
        resolve_backbone(tmp_path / "foreign.pth")

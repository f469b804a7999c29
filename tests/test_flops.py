"""FLOPs per image: paper reference values and an independent count by PyTorch's FlopCounterMode."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from launch.errors import ConfigError
from launch.flops import gpu_peak_flops, mae_flops, mfu, peak_flops, vit_flops
from pretrain.model import MaskedAutoencoderViT

PAPER_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mask_ratio=0.75)


def _measured_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Forward FLOPs per image counted by PyTorch at the aten level."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / x.shape[0]


def _explicit_attention(model: torch.nn.Module) -> torch.nn.Module:
    # FlopCounterMode has no formula for the CPU fused-SDPA kernel; the explicit path
    # runs the same two matmuls as bmm, which it does count.
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


@pytest.mark.parametrize(
    ("encoder", "expected_gflop"),
    [(dict(embed_dim=768, depth=12, num_heads=12), 59.0), (dict(embed_dim=1024, depth=24, num_heads=16), 125.0)],
)
def test_mae_train_flops_match_paper_scale(encoder: dict, expected_gflop: float) -> None:
    count = mae_flops(img_size=224, patch_size=16, in_chans=3, **encoder, **PAPER_DECODER)
    assert count.train == pytest.approx(expected_gflop * 1e9, rel=0.02)
    assert count.train == pytest.approx(3 * count.forward)


def test_visible_only_saves_about_3x_encoder_flops_for_vit_large() -> None:
    kwargs = dict(img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16, **PAPER_DECODER)
    ratio = mae_flops(**kwargs, visible_only=False).forward / mae_flops(**kwargs).forward
    assert 3.0 < ratio < 3.5  # the MAE paper reports 3.3x


def test_vit_flops_equal_flop_counter_mode() -> None:
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0, num_classes=10
    )
    measured = _measured_flops(_explicit_attention(model).eval(), torch.randn(2, 3, 32, 32))
    counted = vit_flops(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4, num_classes=10)
    assert counted.forward == pytest.approx(measured, rel=1e-6)


def test_mae_flops_equal_flop_counter_mode_on_the_project_model() -> None:
    arch = dict(
        img_size=32,
        patch_size=8,
        in_chans=3,
        embed_dim=64,
        depth=2,
        num_heads=4,
        mlp_ratio=4.0,
        decoder_embed_dim=32,
        decoder_depth=2,
        decoder_num_heads=4,
    )
    model = _explicit_attention(MaskedAutoencoderViT(**arch)).eval()

    def forward(imgs: torch.Tensor) -> torch.Tensor:
        latent, _, ids_restore = model.forward_encoder(imgs, 0.75)
        return model.forward_decoder(latent, ids_restore)

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        forward(torch.randn(2, 3, 32, 32))
    assert mae_flops(**arch, mask_ratio=0.75).forward == pytest.approx(counter.get_total_flops() / 2, rel=1e-6)


def test_peak_flops_table_and_overrides() -> None:
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert gpu_peak_flops("NVIDIA A10", "bf16") == 125e12  # not confused with A100
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "fp32", tf32=True) == pytest.approx(494.7e12)
    assert gpu_peak_flops("Some Future GPU") is None
    assert peak_flops("cpu", "fp32") is None
    assert peak_flops("cpu", "bf16", override=1e12) == 1e12
    assert mfu(100.0, 1e9, 1e12) == pytest.approx(0.1)
    assert mfu(100.0, None, 1e12) is None


def test_bad_architecture_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not a multiple"):
        vit_flops(img_size=30, patch_size=8, in_chans=3, embed_dim=64, depth=1, num_heads=4)
    with pytest.raises(ConfigError, match="divisible"):
        mae_flops(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=1, num_heads=5)
    with pytest.raises(ConfigError, match="mask_ratio"):
        mae_flops(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=1, num_heads=4, mask_ratio=1.0)

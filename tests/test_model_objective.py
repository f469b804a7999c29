"""The MAE loss and the pixel layout: hand computations and exact invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.masking import gather_tokens
from pretrain.objective import mae_loss, normalize_patches, removed_patch_loss
from pretrain.presets import create_mae


def _hand_loss(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, norm: bool) -> float:
    total, count = 0.0, 0
    for n in range(pred.shape[0]):
        for i in range(pred.shape[1]):
            if mask[n, i] != 1:
                continue
            t = target[n, i]
            if norm:
                mean = sum(t) / len(t)
                var = sum((v - mean) ** 2 for v in t) / (len(t) - 1)  # unbiased, as the official code
                t = [(v - mean) / (var + 1e-6) ** 0.5 for v in t]
            total += sum((p - v) ** 2 for p, v in zip(pred[n, i], t)) / len(t)
            count += 1
    return total / count


@pytest.mark.parametrize("norm", [True, False])
def test_loss_matches_a_hand_computation(norm: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 10, 12, generator=gen), torch.randn(3, 10, 12, generator=gen) * 3 + 1
    mask = (torch.rand(3, 10, generator=gen) > 0.4).float()
    expected = _hand_loss(pred.double().numpy(), target.double().numpy(), mask.numpy(), norm)
    assert mae_loss(pred, target, mask, norm_pix_loss=norm).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.filterwarnings("ignore:.*degrees of freedom:UserWarning")
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("pixels", [1, 12])
def test_removed_only_loss_equals_the_masked_loss(norm: bool, pixels: int) -> None:
    """The training path scores just the gathered removed patches; same value and gradient as mae_loss."""
    gen = torch.Generator().manual_seed(1)
    pred = torch.randn(3, 10, pixels, generator=gen, requires_grad=True)
    target = torch.randn(3, 10, pixels, generator=gen) * 3 + 1
    ids = torch.argsort(torch.rand(3, 10, generator=gen), dim=1)[:, 4:]  # 6 removed per sample
    mask = torch.zeros(3, 10).scatter_(1, ids, 1.0)
    full = mae_loss(pred, target, mask, norm_pix_loss=norm)
    part = removed_patch_loss(gather_tokens(pred, ids), gather_tokens(target, ids), norm_pix_loss=norm)
    torch.testing.assert_close(part, full, rtol=1e-6, atol=1e-7, equal_nan=True)
    if full.isfinite():  # one pixel per patch has no unbiased variance (NaN, as the official code)
        torch.testing.assert_close(*(torch.autograd.grad(loss, pred)[0] for loss in (part, full)), rtol=1e-5, atol=1e-8)
    nothing_removed = removed_patch_loss(pred[:, :0], target[:, :0], norm_pix_loss=norm)
    assert nothing_removed.item() == 0.0 and nothing_removed.requires_grad


def test_loss_ignores_predictions_at_visible_positions() -> None:
    pred, target = torch.randn(4, 16, 49), torch.randn(4, 16, 49)
    mask = torch.zeros(4, 16)
    mask[:, ::3] = 1
    base = mae_loss(pred, target, mask)
    changed = torch.where(mask[..., None] > 0, pred, torch.randn_like(pred) * 100)
    assert torch.equal(mae_loss(changed, target, mask), base)
    changed[0, 1] = float("nan")  # even a non-finite prediction where nothing is scored
    assert torch.equal(mae_loss(changed, target, mask), base)
    # a removed position does count
    moved = pred.clone()
    moved[0, 0] += 1
    assert mae_loss(moved, target, mask) != base


def test_loss_is_fp32_under_low_precision_inputs() -> None:
    pred, target, mask = torch.randn(2, 4, 8).bfloat16(), torch.randn(2, 4, 8), torch.ones(2, 4)
    loss = mae_loss(pred, target, mask)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(mae_loss(pred.float(), target, mask).item(), rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        part = removed_patch_loss(pred, target.bfloat16())
    assert part.dtype == torch.float32


def test_constant_patch_normalizes_to_zero_without_nan() -> None:
    patches = torch.full((1, 2, 16), 3.0)
    normed, mean, std = normalize_patches(patches)
    assert torch.equal(normed, torch.zeros_like(normed)) and torch.all(mean == 3.0)
    assert torch.allclose(std, torch.full_like(std, 1e-3))


@pytest.mark.parametrize(
    ("preset", "chans", "size"), [("mae_vit_mnist_p4", 1, 28), ("mae_vit_mnist_p7", 3, 28), ("mae_vit_tiny", 3, 32)]
)
def test_patchify_round_trips_and_follows_official_layout(preset: str, chans: int, size: int) -> None:
    small = dict(embed_dim=16, depth=1, num_heads=1, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=1)
    model = create_mae(preset, in_chans=chans, img_size=size, **small)
    imgs = torch.randn(2, chans, size, size)
    patches = model.patchify(imgs)
    p = model.patch_size
    assert patches.shape == (2, (size // p) ** 2, p * p * chans)
    assert torch.equal(model.unpatchify(patches), imgs)
    # the official code's reshape + einsum('nchpwq->nhwpqc'), written out
    h = size // p
    official = imgs.reshape(2, chans, h, p, h, p).permute(0, 2, 4, 3, 5, 1).reshape(2, h * h, p * p * chans)
    assert torch.equal(patches, official)
    assert torch.equal(patches[0, 1], imgs[0, :, :p, p : 2 * p].permute(1, 2, 0).flatten())

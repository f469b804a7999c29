"""MAE reconstruction loss: per-patch MSE on removed patches, optionally normalized targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """patches: (N, L, P) -> (normalized, mean (N, L, 1), std (N, L, 1)).

    Each patch by its own pixel mean and (unbiased, as the official code) variance:
    ``(x - mean) / sqrt(var + eps)``.
    """
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + eps).sqrt()
    return (patches - mean) / std, mean, std


def mae_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix_loss: bool = True, eps: float = 1e-6) -> Tensor:
    """Mean over removed patches of the mean squared pixel error, computed in fp32.

    pred, target: (N, L, P) predicted / true patches (``model.patchify(imgs)``);
    mask: (N, L), 1 = removed (scored), 0 = visible (ignored). Returns a scalar.
    """
    pred, target = pred.float(), target.float()
    if norm_pix_loss:
        target = normalize_patches(target, eps)[0]
    per_patch = (pred - target).pow(2).mean(dim=-1)
    removed = mask > 0
    # where, not multiply: a non-finite prediction at a visible position must not leak in
    total = torch.where(removed, per_patch, torch.zeros_like(per_patch)).sum()
    return total / removed.sum().clamp_min(1)


def removed_patch_loss(pred: Tensor, target: Tensor, norm_pix_loss: bool = True, eps: float = 1e-6) -> Tensor:
    """``mae_loss`` given only the removed patches, computed in fp32 with fewer passes over memory.

    pred, target: (N, M, P) predicted / true removed patches (M removed per sample, as
    ``random_masking`` removes); equals ``mae_loss`` on the full tensors up to float rounding.
    """
    pred, target = pred.float(), target.float()
    if pred.shape[1] == 0:  # mask_ratio 0 removes nothing: loss 0, as mae_loss
        return pred.sum()
    if norm_pix_loss:
        target = _normalized(target, eps)
    return F.mse_loss(pred, target)


def _normalized(patches: Tensor, eps: float) -> Tensor:
    """``normalize_patches(patches, eps)[0]`` as one fused ``layer_norm`` (biased variance).

    With c = (P - 1) / P, the unbiased variance is var / c, so
    (x - mean) / sqrt(var / c + eps) = sqrt(c) * (x - mean) / sqrt(var + c * eps).
    """
    p = patches.shape[-1]
    if p < 2:  # the unbiased variance of one pixel is undefined: keep the reference's result
        return normalize_patches(patches, eps)[0]
    c = (p - 1) / p
    return F.layer_norm(patches, (p,), patches.new_full((p,), c**0.5), None, c * eps)

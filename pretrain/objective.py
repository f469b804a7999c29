"""MAE reconstruction loss: per-patch MSE on removed patches, optionally normalized targets."""

from __future__ import annotations

import torch
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

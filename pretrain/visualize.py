"""Reconstruction pictures: original | masked | prediction | prediction with visible patches pasted.

``mae-visualize SOURCE --data data.yaml --out grid.png`` draws them for a trained model.
SOURCE is an ``mae-export`` full-model folder (its ``mae/`` folder or the export root),
a run directory (its full export, else its latest checkpoint), or a ``.pth`` /
``.safetensors`` state_dict in the official MAE naming (e.g. ``mae_visualize_vit_large.pth``).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

from launch.cli import entry_point
from pretrain.model import MaskedAutoencoderViT
from pretrain.objective import normalize_patches

log = logging.getLogger(__name__)
PANELS = ("original", "masked", "reconstruction", "pasted")
_MASKED_GRAY = 0.5  # removed patches drawn mid-gray so they stand out on dark and light images


@torch.no_grad()
def reconstruction_panels(
    model: MaskedAutoencoderViT,
    imgs: Tensor,
    mask_ratio: float,
    norm_pix_loss: bool,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    noise: Tensor | None = None,
) -> dict[str, Tensor]:
    """imgs: (N, C, H, W) normalized as in training -> ``PANELS`` name -> (N, C, H, W) in [0, 1].

    With ``norm_pix_loss`` the prediction is in per-patch normalized units; it is mapped
    back with each true patch's mean and std. ``mean`` / ``std`` undo the dataset
    normalization; without them every panel is scaled by its original's min and max.
    """
    was_training = model.training
    model.eval()
    latent, mask, ids_restore = model.forward_encoder(imgs, mask_ratio, noise)
    pred = model.forward_decoder(latent, ids_restore).float()  # (N, L, p*p*C)
    model.train(was_training)
    target = model.patchify(imgs.float())
    if norm_pix_loss:
        _, patch_mean, patch_std = normalize_patches(target)
        pred = pred * patch_std + patch_mean
    removed = model.unpatchify(mask.unsqueeze(-1).expand_as(pred)) > 0  # (N, C, H, W)
    show = _display_map(imgs.float(), mean, std)
    original, reconstruction = show(imgs.float()), show(model.unpatchify(pred))
    return {
        "original": original,
        "masked": torch.where(removed, torch.full_like(original, _MASKED_GRAY), original),
        "reconstruction": reconstruction,
        "pasted": torch.where(removed, reconstruction, original),
    }


def reconstruction_grid(model: MaskedAutoencoderViT, imgs: Tensor, mask_ratio: float, norm_pix_loss: bool, **kwargs: Any) -> Tensor:
    """One row per image, the four ``PANELS`` as columns: (3, rows, cols) in [0, 1], 2-px white gaps."""
    panels = reconstruction_panels(model, imgs, mask_ratio, norm_pix_loss, **kwargs)
    tiles = torch.stack([panels[name] for name in PANELS], dim=1).flatten(0, 1)  # image-major, panel-minor
    return make_grid(tiles.cpu(), nrow=len(PANELS), padding=2, pad_value=1.0)


def _display_map(original: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None):
    """``x -> x * scale + shift`` clamped to [0, 1], the same map for every panel of an image."""
    if mean is not None and std is not None:
        scale = torch.tensor(std, dtype=original.dtype, device=original.device).view(1, -1, 1, 1)
        shift = torch.tensor(mean, dtype=original.dtype, device=original.device).view(1, -1, 1, 1)
    else:
        lo = original.amin(dim=(1, 2, 3), keepdim=True)
        scale = 1.0 / (original.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-12)
        shift = -lo * scale
    return lambda x: (x * scale + shift).clamp(0.0, 1.0)

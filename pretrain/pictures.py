"""Reconstruction pictures of an MAE: original | masked | prediction | prediction with the visible
patches pasted. ``MAETask`` logs them during training; ``mae-visualize`` saves them for a trained model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import make_grid

from pretrain.model import MaskedAutoencoderViT
from pretrain.objective import normalize_patches

PANELS = ("original", "masked", "reconstruction", "pasted")
#: cells smaller than this are enlarged by a whole factor with nearest-neighbour: a 28-px digit is
#: drawn 4x, each image pixel a crisp square, so patches and errors stay visible
MIN_CELL_PX = 112
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


def reconstruction_grid(
    model: MaskedAutoencoderViT, imgs: Tensor, mask_ratio: float, norm_pix_loss: bool, **kwargs: Any
) -> Tensor:
    """One row per image, the four ``PANELS`` as columns: (3, rows, cols) in [0, 1], 2-px white gaps.

    imgs (N, C, H, W) -> cells of (k*H, k*W), k = ceil(MIN_CELL_PX / min(H, W)) (nearest-neighbour)."""
    panels = reconstruction_panels(model, imgs, mask_ratio, norm_pix_loss, **kwargs)
    tiles = torch.stack([panels[name] for name in PANELS], dim=1).flatten(0, 1)  # image-major, panel-minor
    scale = math.ceil(MIN_CELL_PX / min(tiles.shape[-2:]))
    if scale > 1:
        tiles = F.interpolate(tiles, scale_factor=scale, mode="nearest")
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

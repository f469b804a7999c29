"""Pixel space shared by every baseline: un-normalization and input corruption.

Batches arrive normalized with the dataset mean/std (the MAE convention). The classic
autoencoders work on pixels in [0, 1] (sigmoid outputs, BCE, masking noise, the
reference numbers), so each task owns one :class:`Pixels` built from the dataset's
``DatasetInfo.mean/std`` and every model sees ``pixels.to_unit(batch["image"])``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

NoiseKind = Literal["none", "gaussian", "mask"]


class Pixels(nn.Module):
    """Maps dataset-normalized images to [0, 1] pixels and back (per channel)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        # not persistent: they describe the data, not the model, and come from dataset.json
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @property
    def channels(self) -> int:
        return self.mean.shape[1]

    def to_unit(self, images: Tensor) -> Tensor:
        """images: (N, C, H, W) normalized -> (N, C, H, W) in [0, 1]; clamped against resize overshoot.
        Keeps the images' dtype (bf16 batches under DeepSpeed meet bf16 weights)."""
        return (images * self.std + self.mean).clamp_(0.0, 1.0).to(images.dtype)

    def from_unit(self, pixels: Tensor) -> Tensor:
        """pixels: (N, C, H, W) in [0, 1] -> normalized like the batch, in the pixels' dtype."""
        return ((pixels - self.mean) / self.std).to(pixels.dtype)


def corrupt(pixels: Tensor, kind: NoiseKind, level: float) -> Tensor:
    """Denoising-autoencoder input corruption of [0, 1] pixels; the result stays in [0, 1].

    ``gaussian``: add N(0, level^2) noise, then clip to the valid range.
    ``mask``: set each input value to 0 with probability ``level`` (Vincent et al., 2008).
    Works on images ``(N, C, H, W)`` and on codes ``(N, D)`` alike.
    """
    if kind == "none" or level == 0.0:
        return pixels
    if kind == "gaussian":
        return (pixels + level * torch.randn_like(pixels)).clamp(0.0, 1.0)
    if kind == "mask":
        return pixels * (torch.rand_like(pixels) >= level).to(pixels.dtype)
    raise ValueError(f"unknown noise kind {kind!r}; allowed: none, gaussian, mask")

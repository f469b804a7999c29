"""Convolutional denoising autoencoder (Vincent et al., 2008): the conv AE trained to
reconstruct the *clean* image from a corrupted one (Gaussian noise clipped to [0, 1], or
masking noise that zeroes a fraction of the pixels)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from baselines.base import AutoencoderTask
from baselines.cae import conv_parts
from baselines.objectives import LossKind
from baselines.pixels import NoiseKind, Pixels, corrupt
from launch.config import Schema

#: allowed noise levels: Gaussian sigma in (0, 1]; masking fraction in (0, 1)
NOISE_RANGES = {"gaussian": "(0, 1]", "mask": "(0, 1)"}


class DAEConfig(Schema):
    family: Literal["dae"] = "dae"
    widths: list[int] = Field([32, 32], min_length=1, max_length=5, description="channels per Conv+MaxPool stage")
    loss: LossKind = Field("mse", description="reconstruction loss against the clean image: mse or bce")
    noise: Literal["gaussian", "mask"] = Field("gaussian", description="input corruption: gaussian or mask")
    noise_level: float = Field(
        0.5, description="Gaussian sigma in (0, 1] or masked fraction in (0, 1), on [0, 1] pixels"
    )

    @model_validator(mode="after")
    def _level_in_range(self) -> DAEConfig:
        check_noise(self.noise, self.noise_level)
        return self


def check_noise(noise: str, level: float) -> None:
    top_ok = level <= 1.0 if noise == "gaussian" else level < 1.0
    if not (level > 0.0 and top_ok):
        raise ValueError(f"noise_level {level} out of range for noise={noise}; allowed: {NOISE_RANGES[noise]}")


class DenoisingTask(AutoencoderTask):
    """Trains on corrupted inputs against clean targets; evaluation reconstructs clean inputs
    (comparable with the other baselines) and also reports the denoising error ``noisy_mse``."""

    def __init__(self, *args, noise: NoiseKind, noise_level: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.noise, self.noise_level = noise, noise_level

    def inputs(self, pixels: Tensor) -> Tensor:
        return corrupt(pixels, self.noise, self.noise_level)

    @torch.no_grad()
    def eval_step(self, batch: dict) -> dict[str, Tensor]:
        out = super().eval_step(batch)
        target = self.pixels.to_unit(batch["image"])
        denoised = self.reconstruct(self.inputs(target))
        out["noisy_mse"] = (denoised.float() - target).pow(2).flatten(1).mean(1).sum()
        return out

    def picture_rows(self, pixels: Tensor) -> list[Tensor]:
        """Clean input, corrupted input, reconstruction of the corrupted input."""
        noisy = self.inputs(pixels)
        return [pixels, noisy, self.reconstruct(noisy)]


def build(cfg: DAEConfig, pixels: Pixels, img_size: int) -> DenoisingTask:
    encoder, decoder, num_features = conv_parts("dae", cfg.widths, pixels, img_size)
    return DenoisingTask(
        pixels,
        encoder,
        decoder,
        num_features=num_features,
        output="sigmoid",
        loss=cfg.loss,
        noise=cfg.noise,
        noise_level=cfg.noise_level,
    )

"""Stacked denoising autoencoder (Vincent et al., 2010).

Greedy layer-wise pretraining: layer ``l`` is trained as a denoising autoencoder on the
codes of the frozen layers ``0 .. l-1`` (one trainer fit per layer, lower layers with
``requires_grad=False``, so they stay bit-identical). The whole stack then gets a linear
classifier on top and is fine-tuned with labels (:class:`baselines.base.ClassifierTask`).
Codes are sigmoid units, so every level lives in [0, 1] like the pixels and takes the
same masking / clipped Gaussian noise and BCE loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from einops import rearrange
from einops.layers.torch import Rearrange
from pydantic import Field, model_validator
from torch import Tensor, nn

from baselines.base import GRID, Codes, showcase
from baselines.dae import check_noise
from baselines.objectives import LossKind, activate, pixel_metrics, recon_per_image
from baselines.pictures import code_scatter, image_grid
from baselines.pixels import NoiseKind, Pixels, corrupt
from launch.config import Schema
from launch.task import Batch, Task


class SDAEConfig(Schema):
    family: Literal["sdae"] = "sdae"
    layers: list[int] = Field(
        [512, 256, 64], min_length=1, max_length=8, description="code width of each stacked layer"
    )
    noise: Literal["gaussian", "mask"] = Field("mask", description="corruption of each layer's input: gaussian or mask")
    noise_level: float = Field(0.3, description="Gaussian sigma in (0, 1] or masked fraction in (0, 1)")
    loss: LossKind = Field("bce", description="per-layer reconstruction loss: bce or mse")

    @model_validator(mode="after")
    def _level_in_range(self) -> SDAEConfig:
        check_noise(self.noise, self.noise_level)
        return self


class DAELayer(nn.Module):
    """One level: ``encoder`` (N, d_in) -> sigmoid codes (N, d_out); ``decoder`` -> logits (N, d_in)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d_in, d_out), nn.Sigmoid())
        self.decoder = nn.Linear(d_out, d_in)


class Stack(nn.Module):
    """pixels (N, C, H, W) -> top codes (N, widths[-1]) through every layer's encoder."""

    def __init__(self, in_dim: int, widths: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DAELayer(d_in, d_out) for d_in, d_out in zip([in_dim, *widths[:-1]], widths))

    def encode(self, pixels: Tensor, depth: int) -> Tensor:
        """Codes after the first ``depth`` layers: (N, C, H, W) -> (N, d_depth); depth 0 = flat pixels."""
        h = rearrange(pixels, "n c h w -> n (c h w)")
        for layer in self.layers[:depth]:
            h = layer.encoder(h)
        return h

    def decode(self, codes: Tensor, depth: int) -> Tensor:
        """Back down from level ``depth`` to flat pixel logits: (N, d_depth) -> (N, C*H*W)."""
        for i, layer in enumerate(reversed(self.layers[:depth])):
            codes = layer.decoder(codes) if i == depth - 1 else torch.sigmoid(layer.decoder(codes))
        return codes

    def forward(self, pixels: Tensor) -> Tensor:
        return self.encode(pixels, len(self.layers))

    def encoder(self) -> nn.Sequential:
        """The encoders alone (shared parameters, no decoders): pixels -> top codes."""
        return nn.Sequential(Rearrange("n c h w -> n (c h w)"), *(layer.encoder for layer in self.layers))


class GreedyLayerTask(Task):
    """Trains layer ``level`` as a DAE on the codes below it; every other layer is frozen."""

    def __init__(
        self, pixels: Pixels, stack: Stack, level: int, *, noise: NoiseKind, noise_level: float, loss: LossKind
    ) -> None:
        super().__init__()
        self.pixels, self.stack, self.level = pixels, stack, level
        self.noise, self.noise_level, self.loss_kind = noise, noise_level, loss
        self.freeze()

    def layer_loss(self, pixels: Tensor) -> Tensor:
        """Per-sample loss (N,), mean over the level's input units, clean target."""
        with torch.no_grad():
            clean = self.stack.encode(pixels, self.level)
        layer = self.stack.layers[self.level]
        pre = layer.decoder(layer.encoder(corrupt(clean, self.noise, self.noise_level)))
        return recon_per_image(pre, clean, self.loss_kind, "sigmoid") / clean.shape[1]

    def forward(self, batch: Batch, phase: str = "main") -> dict[str, Tensor]:
        return {"loss": self.layer_loss(self.pixels.to_unit(batch["image"])).mean()}

    def phase_module(self, phase: str) -> nn.Module:
        return self.stack.layers[self.level]

    def reconstruct(self, pixels: Tensor) -> Tensor:
        """Clean pixels up through layers 0..level and back down: (N, C, H, W) -> (N, C, H, W)."""
        depth = self.level + 1
        logits = self.stack.decode(self.stack.encode(pixels, depth), depth)
        return activate(logits, "sigmoid").view_as(pixels)

    @torch.no_grad()
    def eval_step(self, batch: Batch) -> dict[str, Tensor]:
        """Sums of this layer's loss and of the per-pixel error of the reconstruction through the stack so far."""
        pixels = self.pixels.to_unit(batch["image"])
        count = torch.tensor(float(pixels.shape[0]), device=pixels.device)
        return {
            "loss": self.layer_loss(pixels).sum(),
            **pixel_metrics(self.reconstruct(pixels), pixels),
            "count": count,
        }

    @torch.no_grad()
    def pictures(self, batch: Batch) -> dict[str, Tensor]:
        pixels = self.pixels.to_unit(batch["image"])
        shown = pixels[showcase(batch["label"], GRID)]
        pictures = {"recon": image_grid([shown, self.reconstruct(shown)])}
        if bool((batch["label"] >= 0).all()) and pixels.shape[0] >= 10:
            codes = self.stack.encode(pixels, self.level + 1)
            pictures["codes"] = code_scatter(codes, batch["label"], f"stacked DAE codes, layer {self.level}")
        return pictures

    def backbone(self) -> Codes:
        """The whole stack (every layer's encoder), as the probe and the classifier see it."""
        return Codes(self.pixels, self.stack.encoder(), self.stack.layers[-1].encoder[0].out_features)

    def freeze(self) -> None:
        """Only this level's layer trains; the layers below stay bit-identical."""
        for i, layer in enumerate(self.stack.layers):
            layer.requires_grad_(i == self.level)

    def stages(self) -> Iterator[tuple[str, Task]]:
        """The greedy fits, bottom layer first, built lazily (each freezes every layer but its own)."""
        kwargs = {"noise": self.noise, "noise_level": self.noise_level, "loss": self.loss_kind}
        for level in range(self.level):
            yield f"layer{level}", GreedyLayerTask(self.pixels, self.stack, level, **kwargs)
        self.freeze()
        yield f"layer{self.level}", self


def build(cfg: SDAEConfig, pixels: Pixels, img_size: int) -> GreedyLayerTask:
    """The top level's task; its ``stages()`` give the greedy fits of every level."""
    stack = Stack(pixels.channels * img_size**2, cfg.layers)
    return GreedyLayerTask(
        pixels, stack, len(cfg.layers) - 1, noise=cfg.noise, noise_level=cfg.noise_level, loss=cfg.loss
    )

"""Losses of the autoencoder family, one function each, all on [0, 1] pixel targets.

Conventions (so numbers compare with the classic references): ``reduction="pixel"`` is
the per-pixel mean (Keras' ``mse`` / ``binary_crossentropy``), ``"image"`` the sum over
the pixels of each image (the VAE ELBO convention, e.g. ~145 nats on MNIST).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

OutputKind = Literal["sigmoid", "relu"]
LossKind = Literal["bce", "mse"]

_EPS = 1e-6


def activate(pre: Tensor, output: OutputKind) -> Tensor:
    """Decoder pre-activation -> image. ``sigmoid`` maps into (0, 1); ``relu`` only clips below 0."""
    return torch.sigmoid(pre) if output == "sigmoid" else F.relu(pre)


def recon_per_image(pre: Tensor, target: Tensor, loss: LossKind, output: OutputKind) -> Tensor:
    """pre, target: (N, C, H, W) -> (N,) loss summed over each image's pixels.

    BCE of a sigmoid output is taken on the logits (stable for saturated pixels); BCE of a
    ReLU output is taken on the output clamped into (0, 1).
    """
    if loss == "mse":
        per_pixel = F.mse_loss(activate(pre, output).float(), target.float(), reduction="none")
    elif output == "sigmoid":
        per_pixel = F.binary_cross_entropy_with_logits(pre.float(), target.float(), reduction="none")
    else:
        per_pixel = F.binary_cross_entropy(F.relu(pre).float().clamp(_EPS, 1 - _EPS), target.float(), reduction="none")
    return per_pixel.flatten(1).sum(1)


def pixel_metrics(recon: Tensor, target: Tensor) -> dict[str, Tensor]:
    """recon, target: (N, C, H, W) in [0, 1] -> per-image sums over the batch of the per-pixel
    mean MSE and BCE (the trainer divides by the image count)."""
    recon, target = recon.float(), target.float()
    mse = F.mse_loss(recon, target, reduction="none").flatten(1).mean(1)
    bce = F.binary_cross_entropy(recon.clamp(_EPS, 1 - _EPS), target, reduction="none").flatten(1).mean(1)
    return {"mse": mse.sum(), "bce": bce.sum()}


def kl_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per sample: mu, logvar (N, D) -> (N,).

    Closed form: 0.5 * sum(mu^2 + sigma^2 - log sigma^2 - 1) (Kingma & Welling, 2014, app. B).
    """
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).sum(1)


def gan_losses(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator loss: real -> 1, fake -> 0 (mean BCE over both)."""
    real = F.binary_cross_entropy_with_logits(real_logits.float(), torch.ones_like(real_logits, dtype=torch.float32))
    fake = F.binary_cross_entropy_with_logits(fake_logits.float(), torch.zeros_like(fake_logits, dtype=torch.float32))
    return 0.5 * (real + fake)


def fooling_loss(fake_logits: Tensor) -> Tensor:
    """Generator (encoder) loss: make the discriminator call its codes real (non-saturating)."""
    return F.binary_cross_entropy_with_logits(fake_logits.float(), torch.ones_like(fake_logits, dtype=torch.float32))

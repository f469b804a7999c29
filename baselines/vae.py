"""Variational autoencoder (Kingma & Welling, 2014), MLP or convolutional.

The encoder outputs the posterior mean and log-variance; a code is drawn with the
reparameterization ``z = mu + sigma * eps``; the loss is the negative ELBO per image:
reconstruction summed over the pixels (BCE = Bernoulli decoder, MSE = fixed-variance
Gaussian up to a constant) + beta * KL(q(z|x) || N(0, I)).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from baselines.base import GRID, AutoencoderTask, Codes, showcase
from baselines.generative import generative_pictures
from baselines.nets import check_conv_size, conv_latent_decoder, conv_latent_encoder, mlp_decoder, mlp_encoder
from baselines.objectives import LossKind, activate, kl_standard_normal, pixel_metrics, recon_per_image
from baselines.pixels import Pixels
from baselines.priors import GaussianPrior
from launch.config import Schema
from launch.task import Batch


class VAEConfig(Schema):
    family: Literal["vae"] = "vae"
    arch: Literal["mlp", "conv"] = Field("mlp", description="encoder / decoder: mlp or conv")
    latent_dim: int = Field(2, ge=1, le=1024, description="latent size (2 gives the manifold picture)")
    hidden: list[int] = Field([512], description="MLP hidden widths (arch=mlp)")
    widths: list[int] = Field([32, 64], min_length=1, max_length=5, description="conv stage widths (arch=conv)")
    loss: LossKind = Field("bce", description="reconstruction term summed per image: bce or mse")
    beta: float = Field(1.0, ge=0, le=1000, description="weight of the KL term (beta-VAE)")


def encoder_decoder(
    family: str, cfg: VAEConfig, pixels: Pixels, img_size: int, out_dim: int
) -> tuple[nn.Module, nn.Module]:
    """Encoder (imgs -> (N, out_dim)) and decoder (z -> pre-activation imgs) for ``cfg.arch``."""
    channels = pixels.channels
    if cfg.arch == "mlp":
        return mlp_encoder(channels, img_size, cfg.hidden, out_dim), mlp_decoder(
            channels, img_size, cfg.hidden, cfg.latent_dim
        )
    check_conv_size(family, img_size, len(cfg.widths))
    return (
        conv_latent_encoder(channels, img_size, cfg.widths, out_dim),
        conv_latent_decoder(channels, img_size, cfg.widths, cfg.latent_dim),
    )


class VAETask(AutoencoderTask):
    """``encoder``: imgs -> (N, 2 * latent_dim) = [mean, log-variance]; ``decoder``: z -> logits."""

    def __init__(
        self, pixels: Pixels, encoder: nn.Module, decoder: nn.Module, *, latent_dim: int, loss: LossKind, beta: float
    ) -> None:
        super().__init__(pixels, encoder, decoder, num_features=latent_dim, output="sigmoid", loss=loss)
        self.latent_dim, self.beta, self.prior = latent_dim, beta, GaussianPrior(latent_dim)

    def posterior(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """pixels: (N, C, H, W) -> mean, log-variance, each (N, latent_dim)."""
        mu, logvar = self.encoder(pixels).chunk(2, dim=1)
        return mu, logvar

    def codes(self, pixels: Tensor) -> Tensor:
        return self.posterior(pixels)[0]

    def decode(self, z: Tensor) -> Tensor:
        """z: (N, latent_dim) -> images (N, C, H, W) in (0, 1)."""
        return activate(self.decoder(z), "sigmoid")

    def reconstruct(self, pixels: Tensor) -> Tensor:
        return self.decode(self.codes(pixels))

    def elbo_terms(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Per-image (reconstruction, KL), each (N,), with one reparameterized draw."""
        mu, logvar = self.posterior(pixels)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return recon_per_image(self.decoder(z), pixels, self.loss_kind, "sigmoid"), kl_standard_normal(mu, logvar)

    def forward(self, batch: Batch, phase: str = "main") -> dict[str, Tensor]:
        recon, kl = self.elbo_terms(self.pixels.to_unit(batch["image"]))
        return {"loss": (recon + self.beta * kl).mean(), "recon": recon.mean(), "kl": kl.mean()}

    @torch.no_grad()
    def eval_step(self, batch: Batch) -> dict[str, Tensor]:
        """Sums of the per-image loss, its two terms, and the per-pixel error of decoding the mean."""
        pixels = self.pixels.to_unit(batch["image"])
        recon, kl = self.elbo_terms(pixels)
        count = torch.tensor(float(pixels.shape[0]), device=pixels.device)
        metrics = pixel_metrics(self.reconstruct(pixels), pixels)
        return {"loss": (recon + self.beta * kl).sum(), "recon": recon.sum(), "kl": kl.sum(), **metrics, "count": count}

    @torch.no_grad()
    def pictures(self, batch: Batch) -> dict[str, Tensor]:
        pictures = super().pictures(batch)
        codes = self.codes(self.pixels.to_unit(batch["image"][showcase(batch["label"], 2 * GRID)]))
        return pictures | generative_pictures(self.decode, codes, self.prior, GRID)

    def backbone(self) -> Codes:
        """The posterior mean is the code (the log-variance half is dropped)."""
        return Codes(self.pixels, self.encoder, self.latent_dim, width=self.latent_dim)


def build(cfg: VAEConfig, pixels: Pixels, img_size: int) -> VAETask:
    encoder, decoder = encoder_decoder("vae", cfg, pixels, img_size, 2 * cfg.latent_dim)
    return VAETask(pixels, encoder, decoder, latent_dim=cfg.latent_dim, loss=cfg.loss, beta=cfg.beta)

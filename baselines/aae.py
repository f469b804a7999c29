"""Adversarial autoencoder (Makhzani et al., 2016).

A deterministic autoencoder whose code distribution is pushed toward a prior by a
discriminator on the latent space. Every training step runs three phases, each stepping
its own optimizer (the ``Task.phases`` mechanism of the shared trainer):

- ``recon``: encoder + decoder minimise the reconstruction loss;
- ``disc``:  the discriminator separates prior draws (real) from codes (fake);
- ``gen``:   the encoder makes its codes look real to the (fixed) discriminator.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.func import functional_call

from baselines.base import GRID, AutoencoderTask, showcase
from baselines.generative import generative_pictures
from baselines.nets import mlp
from baselines.objectives import LossKind, activate, fooling_loss, gan_losses
from baselines.pixels import Pixels
from baselines.priors import GaussianPrior, MixturePrior, Prior
from baselines.vae import encoder_decoder
from launch.config import Schema
from launch.task import Batch


class AAEConfig(Schema):
    family: Literal["aae"] = "aae"
    arch: Literal["mlp", "conv"] = Field("mlp", description="encoder / decoder: mlp or conv")
    latent_dim: int = Field(2, ge=1, le=1024, description="latent size")
    hidden: list[int] = Field([512, 256], description="MLP hidden widths (arch=mlp)")
    widths: list[int] = Field([32, 64], min_length=1, max_length=5, description="conv stage widths (arch=conv)")
    loss: LossKind = Field("bce", description="reconstruction loss, per-pixel mean: bce or mse")
    prior: Literal["gaussian", "mog"] = Field(
        "gaussian", description="target code distribution: gaussian or mog (mixture on a circle)"
    )
    components: int = Field(10, ge=2, le=100, description="mixture components (prior=mog)")
    disc_hidden: list[int] = Field([256, 256], min_length=1, description="discriminator hidden widths")
    disc_lr: float | None = Field(None, gt=0, description="absolute lr of the disc phase (None: the run's lr)")
    gen_lr: float | None = Field(None, gt=0, description="absolute lr of the gen phase (None: the run's lr)")

    @model_validator(mode="after")
    def _mixture_needs_two_dims(self) -> AAEConfig:
        if self.prior == "mog" and self.latent_dim < 2:
            raise ValueError(f"prior=mog needs latent_dim >= 2, got {self.latent_dim}")
        return self


class AAETask(AutoencoderTask):
    """``encoder``: imgs -> codes (N, latent_dim); ``discriminator``: codes -> logits (N, 1)."""

    phases = ("recon", "disc", "gen")

    def __init__(
        self,
        pixels: Pixels,
        encoder: nn.Module,
        decoder: nn.Module,
        discriminator: nn.Module,
        *,
        prior: Prior,
        loss: LossKind,
        phase_lrs: dict[str, float | None],
    ) -> None:
        super().__init__(pixels, encoder, decoder, num_features=prior.dim, output="sigmoid", loss=loss)
        self.discriminator, self.prior, self.phase_lrs = discriminator, prior, phase_lrs

    def forward(self, batch: Batch, phase: str = "recon") -> dict[str, Tensor]:
        pixels = self.pixels.to_unit(batch["image"])
        if phase == "recon":
            return {"loss": self.recon_loss(self.decoder(self.encoder(pixels)), pixels).mean()}
        if phase == "disc":
            fake = self.encoder(pixels).detach()  # this phase steps the discriminator only
            real_logits, fake_logits = (
                self.discriminator(self.prior.sample(fake.shape[0], fake.device)),
                self.discriminator(fake),
            )
            accuracy = 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean())
            return {"loss": gan_losses(real_logits, fake_logits), "disc_acc": accuracy}
        if phase == "gen":
            # the discriminator is a fixed critic here: no gradient reaches its parameters
            frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
            return {"loss": fooling_loss(functional_call(self.discriminator, frozen, (self.encoder(pixels),)))}
        raise ValueError(f"unknown AAE phase {phase!r}; allowed: {', '.join(self.phases)}")

    def phase_module(self, phase: str) -> nn.Module:
        """recon: encoder + decoder; disc: discriminator; gen: encoder."""
        return {"recon": nn.ModuleList([self.encoder, self.decoder]), "disc": self.discriminator, "gen": self.encoder}[
            phase
        ]

    def phase_optim(self, phase: str) -> dict[str, Any]:
        """Adversarial phases use Adam's beta1 = 0.5 (the usual GAN setting) and no weight decay."""
        if phase == "recon":
            return {}
        lr = self.phase_lrs.get(phase)
        return {"betas": (0.5, 0.999), "weight_decay": 0.0} | ({"lr": lr} if lr else {})

    @torch.no_grad()
    def eval_step(self, batch: Batch) -> dict[str, Tensor]:
        """Reconstruction sums plus the discriminator's accuracy on codes vs prior draws."""
        out = super().eval_step(batch)
        codes = self.encoder(self.pixels.to_unit(batch["image"]))
        real, fake = self.discriminator(self.prior.sample(codes.shape[0], codes.device)), self.discriminator(codes)
        out["disc_acc"] = 0.5 * ((real > 0).float().sum() + (fake < 0).float().sum())
        return out

    def decode(self, z: Tensor) -> Tensor:
        """z: (N, latent_dim) -> images (N, C, H, W) in (0, 1)."""
        return activate(self.decoder(z), "sigmoid")

    @torch.no_grad()
    def pictures(self, batch: Batch) -> dict[str, Tensor]:
        pictures = super().pictures(batch)
        codes = self.codes(self.pixels.to_unit(batch["image"][showcase(batch["label"], 2 * GRID)]))
        return pictures | generative_pictures(self.decode, codes, self.prior, GRID)


def build(cfg: AAEConfig, pixels: Pixels, img_size: int) -> AAETask:
    encoder, decoder = encoder_decoder("aae", cfg, pixels, img_size, cfg.latent_dim)
    prior = GaussianPrior(cfg.latent_dim) if cfg.prior == "gaussian" else MixturePrior(cfg.latent_dim, cfg.components)
    discriminator = mlp([cfg.latent_dim, *cfg.disc_hidden, 1])
    return AAETask(
        pixels,
        encoder,
        decoder,
        discriminator,
        prior=prior,
        loss=cfg.loss,
        phase_lrs={"disc": cfg.disc_lr, "gen": cfg.gen_lr},
    )

"""MLP autoencoder (Hinton & Salakhutdinov, 2006; the Keras "simplest autoencoder").

Two output variants ship: ``sigmoid`` (values squashed into (0, 1): faint backgrounds are
lifted slightly) and ``relu`` (exact zeros are reachable, but under-shot stroke pixels stay
dark). The latent size is the knob of the reconstruction-vs-compression sweep.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from baselines.base import AutoencoderTask
from baselines.nets import mlp_decoder, mlp_encoder
from baselines.objectives import LossKind, OutputKind
from baselines.pixels import Pixels
from launch.config import Schema

LATENT_RANGE = (1, 1024)


class AEConfig(Schema):
    family: Literal["ae"] = "ae"
    latent_dim: int = Field(32, ge=LATENT_RANGE[0], le=LATENT_RANGE[1], description="code size")
    hidden: list[int] = Field([256], description="hidden widths of the encoder (decoder mirrors them)")
    output: OutputKind = Field("sigmoid", description="output activation: sigmoid or relu")
    loss: LossKind = Field("mse", description="reconstruction loss on [0, 1] pixels: mse or bce")

    @model_validator(mode="after")
    def _bce_needs_probabilities(self) -> AEConfig:
        if self.loss == "bce" and self.output == "relu":
            raise ValueError(
                "loss=bce needs output=sigmoid (a ReLU output is not a probability); allowed with relu: mse"
            )
        return self


def build(cfg: AEConfig, pixels: Pixels, img_size: int) -> AutoencoderTask:
    channels = pixels.channels
    return AutoencoderTask(
        pixels,
        mlp_encoder(channels, img_size, cfg.hidden, cfg.latent_dim),
        mlp_decoder(channels, img_size, cfg.hidden, cfg.latent_dim),
        num_features=cfg.latent_dim,
        output=cfg.output,
        loss=cfg.loss,
    )

"""Convolutional autoencoder (Masci et al., 2011; the Keras conv AE): Conv + MaxPool encoder,
Upsample + Conv decoder, sigmoid output, BCE or MSE on [0, 1] pixels."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from baselines.base import AutoencoderTask
from baselines.nets import check_conv_size, conv_decoder, conv_encoder
from baselines.objectives import LossKind
from baselines.pixels import Pixels
from launch.config import Schema


class CAEConfig(Schema):
    family: Literal["cae"] = "cae"
    widths: list[int] = Field(
        [32, 16],
        min_length=1,
        max_length=5,
        description="channels per Conv+MaxPool stage; the code is widths[-1] x H/2^d x W/2^d",
    )
    loss: LossKind = Field("bce", description="reconstruction loss on [0, 1] pixels: bce or mse")


def conv_parts(family: str, widths: list[int], pixels: Pixels, img_size: int) -> tuple[nn.Module, nn.Module, int]:
    """(encoder, decoder, code size) of the conv AE shared by the CAE and the denoising AE."""
    check_conv_size(family, img_size, len(widths))
    side = img_size // 2 ** len(widths)
    return conv_encoder(pixels.channels, widths), conv_decoder(pixels.channels, widths), widths[-1] * side**2


def build(cfg: CAEConfig, pixels: Pixels, img_size: int) -> AutoencoderTask:
    encoder, decoder, num_features = conv_parts("cae", cfg.widths, pixels, img_size)
    return AutoencoderTask(pixels, encoder, decoder, num_features=num_features, output="sigmoid", loss=cfg.loss)

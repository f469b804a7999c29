"""Encoder / decoder building blocks shared by the baseline families.

Decoders return *pre-activation* outputs (logits for a sigmoid output), so BCE can use the
numerically stable ``binary_cross_entropy_with_logits``; the output activation is applied
by the task (:mod:`baselines.objectives`).
"""

from __future__ import annotations

from collections.abc import Sequence

from einops.layers.torch import Rearrange
from torch import nn

from launch.errors import ConfigError


def mlp(dims: Sequence[int], act: type[nn.Module] = nn.ReLU, last_act: bool = False) -> nn.Sequential:
    """Linear layers ``dims[0] -> ... -> dims[-1]`` with ``act`` between them (and after the last if asked)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if last_act or i < len(dims) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def mlp_encoder(channels: int, img_size: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    """imgs: (N, C, H, W) -> (N, out_dim)."""
    return nn.Sequential(Rearrange("n c h w -> n (c h w)"), mlp([channels * img_size**2, *hidden, out_dim]))


def mlp_decoder(channels: int, img_size: int, hidden: Sequence[int], latent_dim: int) -> nn.Sequential:
    """z: (N, latent_dim) -> pre-activation images (N, C, H, W); ``hidden`` is given encoder-side first."""
    return nn.Sequential(
        mlp([latent_dim, *reversed(hidden), channels * img_size**2]),
        Rearrange("n (c h w) -> n c h w", c=channels, h=img_size, w=img_size),
    )


def check_conv_size(family: str, img_size: int, depth: int) -> None:
    """Each of the ``depth`` MaxPool / Upsample pairs must halve / double the side exactly."""
    step = 2**depth
    if img_size % step or img_size < step:
        examples = sorted({step * max(1, round(28 / step)), step * (64 // step), 2 * step * (64 // step)})
        raise ConfigError(
            f"{family}: image size {img_size} does not survive {depth} 2x poolings; "
            f"allowed: multiples of {step} (e.g. {', '.join(map(str, examples))})"
        )


def conv_encoder(channels: int, widths: Sequence[int]) -> nn.Sequential:
    """imgs: (N, C, H, W) -> (N, widths[-1], H / 2^d, W / 2^d), d = len(widths); Conv + ReLU + MaxPool stages."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip([channels, *widths[:-1]], widths):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers)


def conv_decoder(channels: int, widths: Sequence[int]) -> nn.Sequential:
    """(N, widths[-1], H / 2^d, W / 2^d) -> pre-activation (N, C, H, W); Conv + ReLU + Upsample stages."""
    layers: list[nn.Module] = []
    rev = list(reversed(widths))
    for c_in, c_out in zip(rev, [*rev[1:], rev[-1]]):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.Upsample(scale_factor=2, mode="nearest")]
    layers.append(nn.Conv2d(rev[-1], channels, 3, padding=1))
    return nn.Sequential(*layers)


def conv_latent_encoder(channels: int, img_size: int, widths: Sequence[int], out_dim: int) -> nn.Sequential:
    """imgs: (N, C, H, W) -> (N, out_dim): the conv stages, then one linear layer."""
    side = img_size // 2 ** len(widths)
    return nn.Sequential(
        conv_encoder(channels, widths), Rearrange("n c h w -> n (c h w)"), nn.Linear(widths[-1] * side**2, out_dim)
    )


def conv_latent_decoder(channels: int, img_size: int, widths: Sequence[int], latent_dim: int) -> nn.Sequential:
    """z: (N, latent_dim) -> pre-activation (N, C, H, W): one linear layer, then the conv stages."""
    side = img_size // 2 ** len(widths)
    return nn.Sequential(
        nn.Linear(latent_dim, widths[-1] * side**2),
        nn.ReLU(),
        Rearrange("n (c h w) -> n c h w", c=widths[-1], h=side, w=side),
        conv_decoder(channels, widths),
    )

"""Pictures of a model with a decoder from a prior: samples, interpolations, the 2-D manifold."""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange
from torch import Tensor

from baselines.pictures import image_grid
from baselines.priors import Prior

Decode = Callable[[Tensor], Tensor]  # z: (N, D) -> images (N, C, H, W) in [0, 1]


def interpolations(decode: Decode, start: Tensor, end: Tensor, steps: int) -> list[Tensor]:
    """start, end: (K, D) codes -> K rows of ``steps`` images decoded along the straight line."""
    alpha = torch.linspace(0.0, 1.0, steps, device=start.device, dtype=start.dtype).view(1, steps, 1)
    path = torch.lerp(start.unsqueeze(1), end.unsqueeze(1), alpha)  # (K, steps, D)
    images = decode(rearrange(path, "k s d -> (k s) d"))
    return list(rearrange(images, "(k s) c h w -> k s c h w", s=steps))


def manifold(decode: Decode, prior: Prior, side: int, like: Tensor) -> Tensor:
    """Decoded ``side x side`` grid over a 2-D latent, on ``like``'s device and in its dtype
    -> (side * side, C, H, W), row-major."""
    return decode(prior.grid(side).to(like))


def generative_pictures(decode: Decode, codes: Tensor, prior: Prior, grid: int) -> dict[str, Tensor]:
    """codes: (N, D) codes of real images (N >= 2). Samples from the prior, interpolations
    between pairs of real images, and the manifold when the latent is 2-D. Prior draws take
    the codes' dtype: the decoder's (bf16 under DeepSpeed)."""
    samples = decode(prior.sample(grid * grid, codes.device).to(codes.dtype))
    pictures = {"samples": image_grid(list(samples.split(grid)))}
    pairs = min(4, codes.shape[0] // 2)
    pictures["interpolation"] = image_grid(interpolations(decode, codes[:pairs], codes[pairs : 2 * pairs], grid))
    if prior.dim == 2:
        pictures["manifold"] = image_grid(list(manifold(decode, prior, 15, codes).split(15)), pad=0)
    return pictures

"""Latent priors of the generative baselines: a standard Gaussian (VAE, AAE) and a mixture
of Gaussians placed on a circle (the AAE paper's 2-D mixture, Makhzani et al., 2016, fig. 2).

``sample`` draws prior codes; ``grid`` gives the points whose decodings form the latent
manifold picture of a 2-D latent.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class GaussianPrior:
    """N(0, I) in ``dim`` dimensions."""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def sample(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        """-> (n, dim)."""
        return torch.randn(n, self.dim, device=device)

    def grid(self, side: int) -> Tensor:
        """(side * side, 2) points at evenly spaced Gaussian quantiles, so each covers equal
        prior mass (Kingma & Welling, 2014, fig. 4); row-major, z2 decreasing down the rows."""
        quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, side))
        z2, z1 = torch.meshgrid(quantiles.flip(0), quantiles, indexing="ij")
        return torch.stack([z1.flatten(), z2.flatten()], 1)


class MixturePrior:
    """Equal-weight mixture of ``components`` Gaussians (std ``std``) whose means sit on a circle
    of radius ``radius`` in the first two latent dimensions (zero in the others)."""

    def __init__(self, dim: int, components: int = 10, radius: float = 4.0, std: float = 0.5) -> None:
        if dim < 2:
            raise ValueError(f"a mixture prior needs latent_dim >= 2, got {dim}")
        angles = torch.arange(components) * (2 * math.pi / components)
        self.means = torch.zeros(components, dim)
        self.means[:, 0], self.means[:, 1] = radius * angles.cos(), radius * angles.sin()
        self.dim, self.std, self.radius = dim, std, radius

    def sample(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        """-> (n, dim): a uniformly chosen component per draw, plus its Gaussian noise."""
        component = torch.randint(len(self.means), (n,), device=device)
        return self.means.to(device)[component] + self.std * torch.randn(n, self.dim, device=device)

    def grid(self, side: int) -> Tensor:
        """(side * side, 2) points spanning the circle of means and its spread."""
        extent = self.radius + 2 * self.std
        axis = torch.linspace(-extent, extent, side)
        z2, z1 = torch.meshgrid(axis.flip(0), axis, indexing="ij")
        return torch.stack([z1.flatten(), z2.flatten()], 1)


Prior = GaussianPrior | MixturePrior

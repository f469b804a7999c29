"""Fixed 2-D sin-cos position embeddings, laid out exactly as the official MAE code.

timm's ``build_sincos2d_pos_embed`` orders the channels ``[sin h, sin w, cos h, cos w]``;
the released MAE checkpoints store ``[sin w, cos w, sin h, cos h]`` with a zero row for
the class token, so we build that layout here to load (and export) them unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from launch.errors import ConfigError


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """pos: (M,) float64 -> (M, dim) as ``[sin(pos * w_k) | cos(pos * w_k)]``, w_k = 1 / 10000^(2k/dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = True) -> Tensor:
    """Table of shape (1 + grid_size**2, embed_dim), or (grid_size**2, embed_dim) without cls.

    Token ``i * grid_size + j`` is the patch in row ``i``, column ``j``; the first half of
    the channels encodes the column, the second half the row (official MAE layout).
    Computed in float64 like the official numpy code, returned as float32.
    """
    if embed_dim % 4:
        raise ConfigError(f"embed dim {embed_dim} must be a multiple of 4 for 2-D sin-cos position embeddings")
    rows, cols = torch.meshgrid(
        torch.arange(grid_size, dtype=torch.float64), torch.arange(grid_size, dtype=torch.float64), indexing="ij"
    )
    table = torch.cat([_sincos_1d(embed_dim // 2, cols.flatten()), _sincos_1d(embed_dim // 2, rows.flatten())], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), table], dim=0)
    return table.float()

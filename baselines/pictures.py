"""Pictures of the baselines as ``(3, H, W)`` tensors in [0, 1] (the ``Task.pictures`` contract),
plus PNG writing. Plots are drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

from launch.fileio import replacing

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from einops import rearrange  # noqa: E402
from torch import Tensor  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402


def image_grid(rows: Sequence[Tensor], pad: int = 2) -> Tensor:
    """rows: each (K, C, H, W) in [0, 1], same K -> one (3, H', W') grid, one input row per grid row."""
    stacked = torch.cat([r.detach().float().cpu().clamp(0, 1) for r in rows])
    if stacked.shape[1] == 1:
        stacked = stacked.expand(-1, 3, -1, -1)
    return make_grid(stacked, nrow=rows[0].shape[0], padding=pad, pad_value=1.0)


def _figure_to_tensor(fig: plt.Figure) -> Tensor:
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    plt.close(fig)
    return rearrange(torch.from_numpy(rgba[..., :3].copy()).float() / 255.0, "h w c -> c h w")


def code_scatter(codes: Tensor, labels: Tensor, title: str) -> Tensor:
    """codes: (N, D), labels: (N,) -> scatter of the codes coloured by label.

    A 2-D code is drawn as is; a wider one by its first two principal components.
    """
    codes = codes.detach().float().cpu().flatten(1)
    axis = ("z1", "z2")
    if codes.shape[1] > 2:
        centred = codes - codes.mean(0)
        _, _, v = torch.pca_lowrank(centred, q=2, center=False)
        codes, axis = centred @ v, ("PC1", "PC2")
    elif codes.shape[1] == 1:
        codes = torch.cat([codes, torch.zeros_like(codes)], 1)
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=80)
    points = ax.scatter(codes[:, 0], codes[:, 1], c=labels.cpu().numpy(), cmap="tab10", s=6, vmin=-0.5, vmax=9.5)
    fig.colorbar(points, ax=ax, ticks=range(10), label="label")
    ax.set(xlabel=axis[0], ylabel=axis[1], title=title)
    fig.tight_layout()
    return _figure_to_tensor(fig)


def line_plot(x: Sequence[float], series: dict[str, Sequence[float]], xlabel: str, ylabel: str, title: str) -> Tensor:
    """One line per ``series`` entry over ``x`` (e.g. reconstruction error vs latent size)."""
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=80)
    for name, y in series.items():
        ax.plot(list(x), list(y), marker="o", label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xticks=list(x))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _figure_to_tensor(fig)


def save_pictures(pictures: dict[str, Tensor], directory: Path) -> list[Path]:
    """Write each ``name -> (3, H, W)`` picture as ``directory/name.png``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, picture in pictures.items():
        path = directory / f"{name.replace('/', '_')}.png"
        with replacing(path) as tmp:  # a reader never sees half a picture
            save_image(picture, tmp, format="png")
        paths.append(path)
    return paths

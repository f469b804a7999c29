"""``mae-visualize``: reconstruction pictures (``pretrain/pictures.py``) of a trained MAE.

``mae-visualize SOURCE --data data.yaml --out grid.png`` draws them for a trained model.
SOURCE is a full-model export folder (``config.json`` + ``model.safetensors``, or an
``mae-export`` folder holding ``full/``), a run directory (its ``export/full``, else its
latest checkpoint; its data section is the default data), or a ``.pth`` /
``.safetensors`` state_dict in the official MAE naming (e.g. ``mae_visualize_vit_large.pth``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torchvision.utils import save_image

from launch.checkpoint import load_weights
from launch.cli import entry_point
from launch.config import describe_error, load_config, merge, parse_overrides, read_yaml
from launch.data import DataConfig, build_loader, dataset_info
from launch.errors import CheckpointError, ConfigError
from launch.fileio import replacing
from pretrain.config import PretrainConfig
from pretrain.export import load_full
from pretrain.masking import num_visible
from pretrain.model import MaskedAutoencoderViT
from pretrain.official import load_official
from pretrain.pictures import reconstruction_grid
from pretrain.task import build_task


@dataclass
class Source:
    """A trained model and what its folder says about how it was trained (None = unknown)."""

    model: MaskedAutoencoderViT
    data: DataConfig | None = None
    mask_ratio: float | None = None
    norm_pix_loss: bool | None = None


def load_source(path: Path, arch: dict[str, Any] | None = None) -> Source:
    """An export folder, a run directory or an official-named ``.pth`` / ``.safetensors`` file
    (``arch``: constructor arguments its shapes cannot tell, e.g. ``num_heads``)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.is_file():
        return Source(load_official(path, **(arch or {})))
    for folder in (path, path / "full", path / "export" / "full"):
        if (folder / "config.json").is_file():
            model, config = load_full(folder)
            return Source(model, _run_data(folder), config.get("mask_ratio"), config.get("norm_pix_loss"))
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        cfg = _run_config(path)
        task = build_task(cfg.model)
        load_weights(task, path)
        return Source(task.model, cfg.data, cfg.model.mask_ratio, cfg.model.norm_pix_loss)
    raise CheckpointError(
        f"{path} is neither a checkpoint file, an export folder (config.json) "
        "nor a run directory (config.yaml + checkpoints/)"
    )


def _run_config(run_dir: Path) -> PretrainConfig:
    return load_config(PretrainConfig, run_dir / "config.yaml")


def _run_data(export_dir: Path) -> DataConfig | None:
    """The data section of the run an export lives in (``run/export/full``), if any."""
    for run_dir in (export_dir.parent, export_dir.parent.parent):
        if (run_dir / "config.yaml").is_file():
            return _run_config(run_dir).data
    return None


def _data_config(path: Path | None, overrides: list[str], fallback: DataConfig | None) -> DataConfig:
    """``--data`` (a data config or a whole run config with a ``data:`` section) <- overrides."""
    if path is None and fallback is None:
        raise ConfigError(
            "no data to draw from: pass --data FILE (a data config, or a run config with a data: section)"
        )
    base = fallback.model_dump(mode="json") if fallback is not None else {}
    if path is not None:
        raw = read_yaml(path)
        base = raw["data"] if isinstance(raw.get("data"), dict) else raw
    try:
        return DataConfig.model_validate(merge(base, parse_overrides(overrides)))
    except ValidationError as err:
        raise ConfigError(describe_error(DataConfig, err)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mae-visualize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="export folder, run directory, or official-named .pth / .safetensors")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="data config overrides, e.g. root=data")
    parser.add_argument("--data", type=Path, default=None, help="data config YAML (default: the run's data section)")
    parser.add_argument(
        "--arch",
        action="append",
        default=[],
        metavar="key=value",
        help="model argument for a plain state_dict, e.g. num_heads=12 (repeatable)",
    )
    parser.add_argument("--split", default="val", help="split to draw images from (default: val)")
    parser.add_argument("--num-images", type=int, default=8, help="rows of the grid (default: 8)")
    parser.add_argument("--mask-ratio", type=float, default=None, help="default: the run's, else 0.75")
    parser.add_argument(
        "--norm-pix-loss",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the model predicts per-patch normalized pixels (default: the run's, else true)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--out", type=Path, default=Path("reconstruction.png"), help="PNG to write")
    return parser


def run(argv: list[str]) -> int:
    args = _parser().parse_intermixed_args(argv)
    if args.num_images < 1:
        raise ConfigError(f"--num-images {args.num_images} must be at least 1")
    src = load_source(args.source, parse_overrides(args.arch))
    model = src.model.to(args.device).eval()
    mask_ratio = next(v for v in (args.mask_ratio, src.mask_ratio, 0.75) if v is not None)  # flag, run, paper
    norm_pix = next(v for v in (args.norm_pix_loss, src.norm_pix_loss, True) if v is not None)
    try:
        num_visible(model.num_patches, mask_ratio)  # refuse a bad ratio before reading any data
    except ValueError as err:
        raise ConfigError(f"--mask-ratio: {err}") from None
    if model.in_chans not in (1, 3):
        raise ConfigError(f"the model takes {model.in_chans} channels; mae-visualize decodes images to 1 or 3")
    data = _data_config(args.data, args.overrides, src.data).model_copy(
        update={"channels": model.in_chans, "workers": 0}
    )
    info = dataset_info(data)
    if args.split not in info.splits:
        raise ConfigError(f"split '{args.split}' is not in the data (available: {', '.join(info.splits) or 'none'})")
    loader = build_loader(
        data, args.split, preset="eval", batch_size=args.num_images, img_size=model.img_size, seed=args.seed
    )
    imgs = next(iter(loader))["image"].to(args.device)
    noise = torch.rand(imgs.shape[0], model.num_patches, generator=torch.Generator().manual_seed(args.seed)).to(
        args.device
    )
    grid = reconstruction_grid(
        model, imgs, mask_ratio, norm_pix, mean=data.mean or info.mean, std=data.std or info.std, noise=noise
    )
    with replacing(args.out) as tmp:  # an interrupted run never leaves a half-written picture
        save_image(grid, tmp, format="png")
    print(f"wrote {args.out} ({imgs.shape[0]} images, mask ratio {mask_ratio}, norm_pix_loss {norm_pix})")
    return 0


main = entry_point("mae-visualize", run)

"""Generic timm hub export: a ViT encoder (an MAE's, or a timm ViT such as a fine-tuned
classifier) as a folder ``timm.create_model("local-dir:DIR", pretrained=True)`` loads with no
project code::

    DIR/config.json         timm hub config: architecture, model_args, num_classes, pretrained_cfg
    DIR/model.safetensors   the encoder under timm ``VisionTransformer`` keys

MAE-specific export (the full model, ``mae-export``) is ``pretrain/export.py``; the model card
is ``launch/card.py``. Every folder is written next to its final place and renamed at the end,
so an interrupted export never looks complete.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import timm
from timm.models import save_for_hf
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from launch.checkpoint import load_checked
from launch.errors import CheckpointError
from launch.fileio import replacing

log = logging.getLogger(__name__)

#: registered timm names whose defaults match our widths; ``model_args`` override the rest
_TIMM_NAMES = {
    192: "vit_tiny_patch16_224",
    384: "vit_small_patch16_224",
    768: "vit_base_patch16_224",
    1024: "vit_large_patch16_224",
    1280: "vit_huge_patch14_224",
}


def timm_architecture(embed_dim: int) -> str:
    """The registered timm ViT closest to ``embed_dim`` (its other defaults are overridden)."""
    return _TIMM_NAMES.get(embed_dim, "vit_base_patch16_224")


def timm_encoder(model: nn.Module, *, num_classes: int = 0) -> VisionTransformer:
    """A timm ``VisionTransformer`` holding ``model``'s encoder (strict load: a wrong or
    missing key raises :class:`CheckpointError`). ``model`` is an MAE (``encoder_state_dict``
    + ``timm_model_args``) or already a timm ViT (returned as is)."""
    if isinstance(model, VisionTransformer):
        return model
    if not hasattr(model, "encoder_state_dict"):
        raise CheckpointError(f"{type(model).__name__} has no encoder to export (expected an MAE or a timm ViT)")
    args = {**model.timm_model_args(), "num_classes": num_classes}
    vit = timm.create_model(timm_architecture(args["embed_dim"]), pretrained=False, **args)
    load_checked(vit, model.encoder_state_dict(), what="encoder")
    return vit.eval()


def export_timm(
    model: nn.Module,
    out_dir: str | Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    label_names: Sequence[str] | None = None,
    tag: str = "mae",
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a timm hub folder (``config.json`` + ``model.safetensors``).

    ``model`` is an MAE (its encoder is exported, ``num_classes=0``) or a timm ViT such as a
    fine-tuned classifier (exported with its head). ``mean`` / ``std`` are the per-channel
    normalization the weights expect; they land in ``pretrained_cfg`` so timm's
    ``resolve_data_config`` reproduces our eval transform.
    """
    vit = timm_encoder(model)
    chans = vit.patch_embed.proj.in_channels
    if len(mean) != chans or len(std) != chans:
        raise CheckpointError(f"mean/std have {len(mean)}/{len(std)} values but the model takes {chans} channels")
    model_config: dict[str, Any] = {"pretrained_cfg": {"tag": tag, "interpolation": "bicubic", "crop_pct": 1.0}}
    if label_names is not None:
        model_config["label_names"] = list(label_names)
    data_config = {"mean": tuple(map(float, mean)), "std": tuple(map(float, std))}

    def write(tmp: Path) -> None:
        save_for_hf(vit, str(tmp), model_config=model_config, safe_serialization=True, data_config=data_config)

    return write_atomically(Path(out_dir), write, overwrite)


def read_export_config(path: Path) -> dict[str, Any]:
    """The ``config.json`` of an export folder (timm or full); one clear error if it is not one."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file() or not (Path(path) / "model.safetensors").is_file():
        raise CheckpointError(f"{path} is not an export folder (needs config.json and model.safetensors)")
    return json.loads(cfg_file.read_text())


def write_atomically(out: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    """``write(tmp)`` fills a sibling temporary folder, which then replaces ``out``."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(
            f"export folder {out} already exists and is not empty; pass --overwrite or choose another --out"
        )
    with replacing(out) as tmp:
        write(tmp)
    log.info("exported %s", out)
    return out

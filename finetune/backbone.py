"""Any backbone -> a timm ``VisionTransformer``, plus the checks that it fits the data.

A backbone is one of:

- a folder written by ``mae-export`` (its ``timm/`` or ``full/`` part, or the parent holding both),
- a pretraining run directory or one of its ``checkpoints/step-*`` (the newest complete one is used),
- an official MAE checkpoint file (``mae_pretrain_vit_base.pth``, ``mae_visualize_vit_large.pth``, ...),
- a timm model name such as ``vit_tiny_patch16_224`` (random init, for from-scratch comparisons),
- an ``nn.Module``: a ``MaskedAutoencoderViT`` or a timm ``VisionTransformer``.

Whatever the source, the weights go through one strict load into a freshly built timm ViT
with the requested head, so a missing or misnamed key is an error, never a silent re-init.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
from timm.models import get_model_args
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from launch.checkpoint import load_checked
from launch.errors import ConfigError, DataError
from launch.export import read_export_config, timm_architecture
from pretrain.export import load_full, load_pretraining_mae
from pretrain.official import load_official

log = logging.getLogger(__name__)

BackboneSpec = str | Path | nn.Module
_HEAD_PREFIXES = ("head.", "fc_norm.", "head_drop.")


@dataclass
class BackboneSource:
    """What a backbone resolves to before a model is built: a timm architecture, its
    arguments, encoder weights (None = random init) and the normalization they expect."""

    architecture: str
    model_args: dict[str, Any]
    state: dict[str, Tensor] | None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    name: str = ""


def resolve_backbone(spec: BackboneSpec, model_args: dict[str, Any] | None = None) -> BackboneSource:
    """Identify ``spec`` (see the module docstring); ``model_args`` override the architecture
    of a timm-name backbone (e.g. ``img_size=28, in_chans=1, patch_size=4``)."""
    if isinstance(spec, nn.Module):
        return _from_module(spec)
    path = Path(spec)
    if path.is_dir():
        return _from_folder(path)
    if path.is_file():
        return _from_official_file(path)
    if timm.is_model(str(spec)):
        return BackboneSource(str(spec), dict(model_args or {}), None, name=f"{spec} (random init)")
    raise ConfigError(
        f"backbone '{spec}' is neither an existing export / run / checkpoint path nor a timm model name "
        f"(e.g. vit_tiny_patch16_224)"
    )


def build_vit(
    source: BackboneSource, *, num_classes: int, global_pool: str = "token", drop_path_rate: float = 0.0
) -> VisionTransformer:
    """A timm ViT of ``source``'s architecture with a fresh ``num_classes`` head (0 = none).

    With ``global_pool="avg"`` timm replaces the final ``norm`` by ``fc_norm`` after pooling;
    as in the official MAE fine-tuning, the pretrained ``norm`` is then dropped and ``fc_norm``
    starts fresh. Every other key must match exactly.
    """
    args = {
        **source.model_args,
        "num_classes": num_classes,
        "global_pool": global_pool,
        "drop_path_rate": drop_path_rate,
    }
    vit = timm.create_model(source.architecture, pretrained=False, **args)
    if source.state is not None:
        state = {k: v for k, v in source.state.items() if not k.startswith(_HEAD_PREFIXES)}
        if isinstance(vit.norm, nn.Identity):
            state = {k: v for k, v in state.items() if not k.startswith("norm.")}
        fresh = {k: v for k, v in vit.state_dict().items() if k.startswith(_HEAD_PREFIXES)}
        load_checked(vit, {**state, **fresh}, what=f"backbone {source.name}")
    return vit


def check_fits(
    vit: VisionTransformer,
    *,
    channels: int,
    img_size: int | None,
    key: str,
    data_size: tuple[int, int],
    source: BackboneSource,
    data_mean: tuple[float, ...] | None = None,
) -> int:
    """The image size to train at: ``img_size`` (the config value ``key``), else the backbone's own.

    Images of any size are resized to it by the data presets (eval: short side + center crop), so
    a dataset whose (median) ``data_size`` differs only gets a log line. Raises a one-line
    :class:`ConfigError` / :class:`DataError` for what cannot work: a size that is not a multiple of
    the patch size, or a channel count the backbone does not take.
    """
    vit_chans = vit.patch_embed.proj.in_channels
    vit_size, patch = int(vit.patch_embed.img_size[0]), int(vit.patch_embed.patch_size[0])
    if vit_chans != channels:
        raise DataError(
            f"backbone {source.name} takes {vit_chans}-channel images but the data has {channels}: "
            f"set data.channels={vit_chans} or use a {channels}-channel backbone"
        )
    check_patch_multiple(img_size, patch, key)
    size = img_size or vit_size
    if tuple(data_size) != (size, size):
        upscale = max(data_size) < size  # typical images get bigger: more compute, no more detail
        log.log(
            logging.WARNING if upscale else logging.INFO,
            "images (median %dx%d) are resized to %d px for backbone %s%s",
            *data_size,
            size,
            source.name,
            f"; set {key} to train nearer the data's size" if upscale else "",
        )
    if source.mean is not None and data_mean is not None and not _close(source.mean, data_mean):
        log.warning(
            "backbone %s was trained with mean %s, the data is normalized with %s",
            source.name,
            list(source.mean),
            list(data_mean),
        )
    return size


def check_patch_multiple(img_size: int | None, patch: int, key: str) -> None:
    """A :class:`ConfigError` naming ``key`` unless ``img_size`` (None = unset) is a multiple of ``patch``."""
    if img_size is not None and img_size % patch:
        lower = max(patch, img_size // patch * patch)
        raise ConfigError(
            f"{key}={img_size} is not a multiple of the patch size {patch}: "
            f"set {key}={lower} or {lower + patch}, or leave it unset for the backbone's own size"
        )


def set_input_size(vit: VisionTransformer, img_size: int) -> VisionTransformer:
    """Rebuild ``vit`` for ``img_size`` px inputs: its position embeddings are resampled bicubically
    to the new patch grid (timm ``resample_abs_pos_embed``; the class token's is kept), and its
    model args record the new size, so an export of it is rebuilt at that size. No-op at its own size."""
    old = tuple(vit.patch_embed.grid_size)
    if int(vit.patch_embed.img_size[0]) != img_size:
        timm_log = logging.getLogger("timm.layers.pos_embed")  # timm logs the resize too (verbose=True is fixed):
        level = timm_log.level
        timm_log.setLevel(logging.WARNING)  # one line, ours, says how
        try:
            vit.set_input_size(img_size=(img_size, img_size))
        finally:
            timm_log.setLevel(level)
        log.info(
            "position embeddings resampled (bicubic) from a %dx%d to a %dx%d patch grid for %d px images",
            *old,
            *vit.patch_embed.grid_size,
            img_size,
        )
    return vit


def _close(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, abs_tol=1e-3) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- sources


def _from_module(module: nn.Module) -> BackboneSource:
    if hasattr(module, "encoder_state_dict"):
        args = module.timm_model_args()
        return BackboneSource(
            timm_architecture(args["embed_dim"]), args, module.encoder_state_dict(), name=type(module).__name__
        )
    if isinstance(module, VisionTransformer):
        args = get_model_args(module)
        return BackboneSource(
            timm_architecture(module.embed_dim), args, module.state_dict(), name=type(module).__name__
        )
    raise ConfigError(
        f"backbone module {type(module).__name__} is neither a MaskedAutoencoderViT nor a timm VisionTransformer"
    )


def _from_folder(path: Path) -> BackboneSource:
    """An export folder (``timm/`` preferred over ``mae/``), or a pretraining run / checkpoint."""
    for candidate in (path, path / "timm", path / "full", path / "export" / "timm"):
        if (candidate / "config.json").is_file():
            return _from_export(candidate)
    model, meta = load_pretraining_mae(path)
    source = _from_module(model)
    source.mean, source.std, source.name = meta.get("mean"), meta.get("std"), str(path)
    return source


def _from_export(path: Path) -> BackboneSource:
    config = read_export_config(path)
    if config.get("architecture") == "mae":
        model, _ = load_full(path)
        source = _from_module(model)
    else:
        state = safetensors.torch.load_file(str(path / "model.safetensors"))
        source = BackboneSource(config["architecture"], dict(config.get("model_args", {})), state)
    pcfg = config.get("pretrained_cfg", {})
    source.mean = tuple(pcfg["mean"]) if "mean" in pcfg else None
    source.std = tuple(pcfg["std"]) if "std" in pcfg else None
    source.name = str(path)
    return source


def _from_official_file(path: Path) -> BackboneSource:
    """An official MAE checkpoint (encoder-only or with decoder) or a full export file."""
    source = _from_module(load_official(path))
    source.name = str(path)
    return source

"""One-call loader for state_dicts in the official MAE naming.

Works for the released official checkpoints (``mae_pretrain_vit_*.pth``: encoder only;
``mae_visualize_vit_*.pth``: encoder + decoder), for the official code's own training
checkpoints (``{"model": ..., "optimizer": ..., "args": ...}``) and for this project's
full exports (``.pth`` or ``.safetensors``)::

    model = load_official("mae_visualize_vit_large.pth")       # architecture read from the shapes
    model = load_official("mae_pretrain_vit_base.pth", img_size=112)   # sin-cos tables rebuilt
    model = load_official("vit-mae-base/model.safetensors")   # Hugging Face ViTMAE names converted

The architecture is read from the tensor shapes; the head counts, which shapes cannot
tell, come from the matching preset (else 64-dim encoder and 32-dim decoder heads, as
ViT-B and the paper's decoder; pass ``num_heads=`` / ``decoder_num_heads=`` otherwise).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from launch.errors import CheckpointError
from pretrain.model import DECODER_PREFIXES, MaskedAutoencoderViT
from pretrain.presets import PRESETS, check_model_kwargs

log = logging.getLogger(__name__)
_POS_TABLES = ("pos_embed", "decoder_pos_embed")  # fixed functions of the shape, rebuilt on resize


# Hugging Face ViTMAE names (hub files: transformers 4 layout; in memory: transformers 5) -> official
_HF_PREFIXES = (
    (re.compile(r"^vit\.(?:encoder\.layer|layers)\.(\d+)\."), r"blocks.\1."),
    (re.compile(r"^decoder\.decoder_layers\.(\d+)\."), r"decoder_blocks.\1."),
    (re.compile(r"^vit\.embeddings\.patch_embeddings\.projection\."), "patch_embed.proj."),
    (re.compile(r"^vit\.embeddings\.cls_token$"), "cls_token"),
    (re.compile(r"^vit\.embeddings\.position_embeddings$"), "pos_embed"),
    (re.compile(r"^vit\.layernorm\."), "norm."),
    (re.compile(r"^decoder\.(?!decoder_layers)"), ""),
)
_HF_BLOCK = {
    "attention.attention.query.": "q.",
    "attention.q_proj.": "q.",
    "attention.attention.key.": "k.",
    "attention.k_proj.": "k.",
    "attention.attention.value.": "v.",
    "attention.v_proj.": "v.",
    "attention.output.dense.": "attn.proj.",
    "attention.o_proj.": "attn.proj.",
    "layernorm_before.": "norm1.",
    "layernorm_after.": "norm2.",
    "intermediate.dense.": "mlp.fc1.",
    "output.dense.": "mlp.fc2.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
}


def from_hf_vitmae(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A Hugging Face ``ViTMAEForPreTraining`` / ``ViTMAEModel`` state_dict in the official naming
    (separate query / key / value projections fused into timm's ``qkv``)."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        for pattern, repl in _HF_PREFIXES:
            key = pattern.sub(repl, key)
        block = re.match(r"^((?:decoder_)?blocks\.\d+\.)(.*)$", key)
        if block:
            rest = next(
                (new + block[2][len(old) :] for old, new in _HF_BLOCK.items() if block[2].startswith(old)), None
            )
            if rest is None:
                raise CheckpointError(f"unknown Hugging Face ViTMAE tensor '{key}'")
            key = block[1] + rest
        out[key] = value
    for key in [k for k in out if re.search(r"\.q\.(weight|bias)$", k)]:
        prefix, kind = key.rsplit(".q.", 1)
        out[f"{prefix}.attn.qkv.{kind}"] = torch.cat([out.pop(f"{prefix}.{n}.{kind}") for n in "qkv"])
    return out


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` or torch (``.pth``/``.pt``/``.bin``) file, unwrapped from
    ``{"model": ...}`` / ``{"state_dict": ...}`` and DDP's ``module.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            obj: Any = load_file(path)
        else:
            # the official training checkpoints pickle their argparse args next to the weights
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad file for the user
        raise CheckpointError(
            f"cannot read {path} as a safetensors/torch checkpoint: {str(err).splitlines()[0]}"
        ) from None
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state_dict (expected a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def infer_arch(state_dict: dict[str, Tensor]) -> dict[str, Any]:
    """Constructor arguments of ``MaskedAutoencoderViT`` that fit ``state_dict``'s shapes."""
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"):
        if key not in state_dict:
            raise CheckpointError(f"state_dict lacks '{key}': not an MAE/timm ViT state_dict")
    dim, chans, patch, _ = state_dict["patch_embed.proj.weight"].shape
    grid = math.isqrt(state_dict["pos_embed"].shape[1] - 1)
    arch = dict(
        img_size=grid * patch,
        patch_size=patch,
        in_chans=chans,
        embed_dim=dim,
        depth=_count_blocks(state_dict, "blocks"),
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / dim,
    )
    if "decoder_embed.weight" in state_dict:
        arch.update(
            decoder_embed_dim=state_dict["decoder_embed.weight"].shape[0],
            decoder_depth=_count_blocks(state_dict, "decoder_blocks"),
        )
    preset = _matching_preset(arch)
    if preset:
        log.info("checkpoint matches preset %s", preset)
        return {**PRESETS[preset], **arch}
    # ViT convention: 64-dim encoder heads; the paper's decoder has 32-dim heads (512 / 16)
    arch["num_heads"] = _heads(dim, 64)
    arch["decoder_num_heads"] = _heads(arch.get("decoder_embed_dim", 512), 32)
    log.warning(
        "no preset matches the checkpoint; assuming %d encoder / %d decoder heads "
        "(pass num_heads= / decoder_num_heads= if they differ)",
        arch["num_heads"],
        arch["decoder_num_heads"],
    )
    return arch


def load_official(source: str | Path | dict[str, Tensor], **overrides: Any) -> MaskedAutoencoderViT:
    """A model holding the weights of ``source`` (a path or a state_dict in official naming).

    ``overrides`` change constructor arguments (e.g. ``img_size``, ``fused_attn``). An
    encoder-only checkpoint leaves the decoder at its fresh (official) initialisation.
    """
    state = dict(read_state_dict(source) if isinstance(source, (str, Path)) else source)
    if any(k.startswith("vit.") for k in state):
        state = from_hf_vitmae(state)
    check_model_kwargs(overrides)
    model = MaskedAutoencoderViT(**{**infer_arch(state), **overrides})
    own = model.state_dict()
    for name in _POS_TABLES:
        if name in state and state[name].shape != own[name].shape:
            log.info("%s %s rebuilt for %s", name, tuple(state[name].shape), tuple(own[name].shape))
            state[name] = own[name]
    _check_keys(state, own)
    model.load_state_dict(state, strict=False)
    if not any(k.startswith(DECODER_PREFIXES) for k in state):
        log.info("encoder-only checkpoint: decoder initialised fresh")
    return model


def _check_keys(state: dict[str, Tensor], own: dict[str, Tensor]) -> None:
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise CheckpointError(f"unexpected keys in checkpoint: {_few(unexpected)} (a fine-tuned or non-MAE model?)")
    # only a checkpoint without any decoder (the released encoder-only ones) may lack decoder keys
    has_decoder = any(k.startswith("decoder_") for k in state)
    missing = sorted(k for k in set(own) - set(state) if has_decoder or not k.startswith(DECODER_PREFIXES))
    if missing:
        raise CheckpointError(f"checkpoint misses keys: {_few(missing)}")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise CheckpointError(
                f"'{key}' has shape {tuple(value.shape)} in the checkpoint, the model needs {tuple(own[key].shape)}"
            )


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:4]) + (f" ... ({len(keys)} in all)" if len(keys) > 4 else "")


def _heads(width: int, head_dim: int) -> int:
    """The largest head count up to ``width // head_dim`` that divides ``width``."""
    heads = max(1, width // head_dim)
    while width % heads:
        heads -= 1
    return heads


def _count_blocks(state_dict: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{prefix}\.(\d+)\.")
    indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def _matching_preset(arch: dict[str, Any]) -> str | None:
    for name, preset in PRESETS.items():
        if all(preset.get(k) == v for k, v in arch.items() if k in preset and k not in ("img_size", "in_chans")):
            return name
    return None

"""Named MAE architectures, ``create_mae(preset, **overrides)`` and the typed ``model:`` config.

Paper presets use the paper's decoder (512 wide, 8 blocks, 16 heads) for base / large /
huge. Tiny and small are not in the paper: their decoders keep the paper's 32-dim heads
and its ratio of decoder to encoder compute (~1:1 at mask 0.75), i.e. 128 x 4 for tiny
(also the speed-reference setting in the project notes) and 256 x 8 for small.

The MNIST presets (28 x 28, one channel) are sized to learn visibly in a few minutes on
two CPU cores: patch 4 gives 49 patches of 16 pixels, patch 7 gives 16 patches of 49.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from pydantic import Field, field_validator

from launch.config import Schema
from launch.errors import ConfigError
from pretrain.model import MaskedAutoencoderViT

_PAPER_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
_MNIST = dict(
    img_size=28,
    in_chans=1,
    embed_dim=128,
    depth=6,
    num_heads=4,
    decoder_embed_dim=64,
    decoder_depth=2,
    decoder_num_heads=2,
)

PRESETS: dict[str, dict[str, Any]] = {
    "mae_vit_tiny": dict(
        patch_size=16, embed_dim=192, depth=12, num_heads=3, decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4
    ),
    "mae_vit_small": dict(
        patch_size=16, embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=256, decoder_depth=8, decoder_num_heads=8
    ),
    "mae_vit_base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, **_PAPER_DECODER),
    "mae_vit_large": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_PAPER_DECODER),
    "mae_vit_huge": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_PAPER_DECODER),
    "mae_vit_mnist_p4": dict(patch_size=4, **_MNIST),
    "mae_vit_mnist_p7": dict(patch_size=7, **_MNIST),
}
# the official repository's function names
ALIASES = {
    "mae_vit_base_patch16": "mae_vit_base",
    "mae_vit_large_patch16": "mae_vit_large",
    "mae_vit_huge_patch14": "mae_vit_huge",
}

ARCH_FIELDS = (
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "decoder_embed_dim",
    "decoder_depth",
    "decoder_num_heads",
    "mlp_ratio",
)
_DEFAULTS = {
    k: p.default for k, p in inspect.signature(MaskedAutoencoderViT.__init__).parameters.items() if k != "self"
}
_MODEL_KWARGS = tuple(_DEFAULTS)


def register_preset(name: str, **arch: Any) -> None:
    """Add a named architecture (keyword arguments of ``MaskedAutoencoderViT``)."""
    check_model_kwargs(arch)
    PRESETS[name] = arch


def preset_args(preset: str) -> dict[str, Any]:
    """All constructor arguments of ``preset`` (defaults filled in)."""
    name = ALIASES.get(preset, preset)
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{preset}'{_suggest(preset)} (available: {', '.join(PRESETS)})")
    return {**_DEFAULTS, **PRESETS[name]}


def create_mae(preset: str, **overrides: Any) -> MaskedAutoencoderViT:
    """``create_mae("mae_vit_base", img_size=112)``: the preset with any constructor argument changed."""
    check_model_kwargs(overrides)
    return MaskedAutoencoderViT(**{**preset_args(preset), **overrides})


def check_model_kwargs(kwargs: dict[str, Any]) -> None:
    unknown = sorted(set(kwargs) - set(_MODEL_KWARGS))
    if unknown:
        raise ConfigError(
            f"unknown model argument '{unknown[0]}'{_suggest(unknown[0], _MODEL_KWARGS)} "
            f"(allowed: {', '.join(_MODEL_KWARGS)})"
        )


def _suggest(name: str, choices: Any = None) -> str:
    close = difflib.get_close_matches(name, list(choices if choices is not None else [*PRESETS, *ALIASES]), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _int(description: str) -> Any:
    return Field(None, ge=1, description=f"{description}; None = the preset's")


class MAEConfig(Schema):
    """The ``model:`` section of a pretraining config: a preset plus optional overrides."""

    preset: str = Field("mae_vit_base", description=f"architecture name: {', '.join(PRESETS)}")
    img_size: int | None = _int("input side in pixels (multiple of patch_size)")
    patch_size: int | None = _int("patch side in pixels")
    in_chans: int | None = _int("image channels (1 grayscale, 3 RGB)")
    embed_dim: int | None = _int("encoder width")
    depth: int | None = _int("encoder blocks")
    num_heads: int | None = _int("encoder attention heads")
    decoder_embed_dim: int | None = _int("decoder width")
    decoder_depth: int | None = _int("decoder blocks")
    decoder_num_heads: int | None = _int("decoder attention heads")
    mlp_ratio: float | None = Field(None, gt=0, description="MLP hidden / width; None = the preset's")
    mask_ratio: float = Field(0.75, ge=0, lt=1, description="fraction of patches removed per image")
    norm_pix_loss: bool = Field(True, description="target = each patch normalized by its own mean and variance")
    drop_path: float = Field(0.0, ge=0, lt=1, description="stochastic depth of the last encoder block (linear ramp)")
    fused_attn: bool = Field(True, description="fused scaled_dot_product_attention (False: explicit softmax)")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if ALIASES.get(value, value) not in PRESETS:
            raise ValueError(f"unknown preset{_suggest(value)}; available: {', '.join(PRESETS)}")
        return value

    def model_args(self) -> dict[str, Any]:
        """Constructor arguments of ``MaskedAutoencoderViT``: the preset with this config's overrides."""
        overrides = {k: getattr(self, k) for k in ARCH_FIELDS if getattr(self, k) is not None}
        return {
            **preset_args(self.preset),
            **overrides,
            "drop_path_rate": self.drop_path,
            "fused_attn": self.fused_attn,
        }


def build_model(cfg: MAEConfig) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(**cfg.model_args())

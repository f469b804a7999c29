"""FLOPs per image counted from the architecture, GPU peak FLOP/s, and MFU.

Conventions (the ones PaLM / the MAE paper use, so numbers compare):

* 1 multiply-add = 2 FLOPs; only matmuls, the patch-embedding conv and attention's
  two matmuls (``Q K^T`` and ``A V``) are counted. Norms, softmax, GELU, biases and
  the loss are left out: they are well under 1 % of a ViT's work.
* training = 3 x forward (the backward costs two matmuls per forward matmul).
* MAE: the patch embedding runs on all ``L`` patches (before masking), the encoder
  on ``1 + L_keep`` tokens (cls + visible, ``L_keep = int(L * (1 - mask_ratio))`` as in
  the official code), the decoder on ``1 + L`` tokens (cls + visible + mask tokens).

Check: ViT-B/16 MAE at 224 px with the paper decoder (512 wide, 8 deep) and mask 0.75
is 58.7 GFLOP per training image; ViT-L/16 is 124.5 GFLOP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from launch.errors import ConfigError


@dataclass(frozen=True)
class FlopCount:
    """FLOPs for one image: ``forward`` pass and one ``train`` step (3 x forward)."""

    forward: float
    train: float

    @classmethod
    def from_macs(cls, macs: float) -> FlopCount:
        return cls(forward=2.0 * macs, train=6.0 * macs)


def block_macs(tokens: int, dim: int, mlp_ratio: float) -> float:
    """Multiply-adds of one pre-norm transformer block on ``tokens`` tokens of width ``dim``.

    qkv (3 D^2) + output projection (D^2) + MLP (2 D H) per token, plus ``Q K^T`` and
    ``A V`` (T D each per token). The head count does not change the total.
    """
    hidden = int(dim * mlp_ratio)
    per_token = 4 * dim * dim + 2 * dim * hidden
    return float(tokens * per_token + 2 * tokens * tokens * dim)


def _num_patches(img_size: int, patch_size: int) -> int:
    if img_size % patch_size:
        raise ConfigError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    return (img_size // patch_size) ** 2


def _check_heads(dim: int, num_heads: int, what: str) -> None:
    if num_heads < 1 or dim % num_heads:
        raise ConfigError(f"{what} width {dim} is not divisible by num_heads {num_heads}")


def vit_flops(
    *,
    img_size: int,
    patch_size: int,
    in_chans: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float = 4.0,
    num_classes: int = 0,
    class_token: bool = True,
) -> FlopCount:
    """A plain ViT (no masking) on one image: patch embed + blocks + optional linear head.

    This is the encoder of a linear probe or a fine-tune; ``train`` assumes the whole
    network is trained (for a frozen-backbone probe use ``forward`` of the backbone).
    """
    _check_heads(embed_dim, num_heads, "encoder")
    num_patches = _num_patches(img_size, patch_size)
    tokens = num_patches + int(class_token)
    macs = num_patches * in_chans * patch_size**2 * embed_dim
    macs += depth * block_macs(tokens, embed_dim, mlp_ratio)
    macs += embed_dim * num_classes
    return FlopCount.from_macs(macs)


def mae_flops(
    *,
    img_size: int,
    patch_size: int,
    in_chans: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float = 4.0,
    decoder_embed_dim: int = 512,
    decoder_depth: int = 8,
    decoder_num_heads: int = 16,
    mask_ratio: float = 0.75,
    visible_only: bool = True,
) -> FlopCount:
    """MAE encoder + decoder on one image.

    ``visible_only=False`` counts the wasteful variant that pushes mask tokens through
    the encoder too (the MAE paper's ablation: 3.3x the FLOPs for ViT-L).
    """
    _check_heads(embed_dim, num_heads, "encoder")
    _check_heads(decoder_embed_dim, decoder_num_heads, "decoder")
    if not 0.0 <= mask_ratio < 1.0:
        raise ConfigError(f"mask_ratio {mask_ratio} must be in [0, 1)")
    num_patches = _num_patches(img_size, patch_size)
    patch_dim = in_chans * patch_size**2
    enc_tokens = 1 + (int(num_patches * (1 - mask_ratio)) if visible_only else num_patches)
    macs = num_patches * patch_dim * embed_dim  # patch embedding (all patches)
    macs += depth * block_macs(enc_tokens, embed_dim, mlp_ratio)
    macs += enc_tokens * embed_dim * decoder_embed_dim  # decoder_embed on the encoder output
    macs += decoder_depth * block_macs(num_patches + 1, decoder_embed_dim, mlp_ratio)
    macs += num_patches * decoder_embed_dim * patch_dim  # pixel prediction (the cls row is dropped first)
    return FlopCount.from_macs(macs)


# Dense (no sparsity) tensor-core peaks in FLOP/s from NVIDIA's data sheets:
# (bf16/fp16, tf32, fp32). Matched by substring of the device name, most specific first.
_GPU_PEAKS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("H100 PCIe", (756e12, 378e12, 51.2e12)),
    ("H100 NVL", (835e12, 418e12, 60e12)),
    ("H100", (989.4e12, 494.7e12, 66.9e12)),
    ("H200", (989.4e12, 494.7e12, 66.9e12)),
    ("A100", (312e12, 156e12, 19.5e12)),
    ("A10", (125e12, 62.5e12, 31.2e12)),
    ("L40S", (362e12, 183e12, 91.6e12)),
    ("L4", (121e12, 60e12, 30.3e12)),
)


def gpu_peak_flops(name: str, precision: str = "bf16", *, tf32: bool = False) -> float | None:
    """Peak FLOP/s of the GPU called ``name`` (e.g. "NVIDIA A100-SXM4-80GB") or None if unknown."""
    for key, (half, tf32_peak, fp32) in _GPU_PEAKS:
        if key in name:
            if precision in ("bf16", "fp16"):
                return half
            return tf32_peak if tf32 else fp32
    return None


def peak_flops(device: str | torch.device, precision: str = "bf16", *, override: float | None = None) -> float | None:
    """Peak FLOP/s for MFU on ``device`` at ``precision`` ("bf16", "fp16", "fp32").

    ``override`` (FLOP/s) wins, e.g. for a CPU or a GPU missing from the table; otherwise
    CPU gives None (no meaningful data-sheet peak). fp32 on CUDA counts TF32 tensor cores
    when PyTorch is allowed to use them for matmuls.
    """
    if precision not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"precision '{precision}' is not one of bf16, fp16, fp32")
    if override is not None:
        return float(override)
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return gpu_peak_flops(torch.cuda.get_device_name(device), precision, tf32=tf32)


def mfu(images_per_s: float, flops_per_image: float | None, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over peak FLOP/s (None when either is unknown)."""
    if not flops_per_image or not peak:
        return None
    return images_per_s * flops_per_image / peak

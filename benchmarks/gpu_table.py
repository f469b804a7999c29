"""Expected GPU throughput, *computed* (not measured): images/s = MFU x peak / FLOPs per image.

The MFU assumption is stated with every row. Activation checkpointing recomputes each
block's forward in backward (4 forward-equivalents per step instead of 3), so at the same
hardware utilisation it shows up as 3/4 of the MFU (MFU counts model FLOPs only).
"""

from __future__ import annotations

import math
from typing import Any

from launch.flops import gpu_peak_flops, mae_flops
from pretrain.presets import ARCH_FIELDS, preset_args

PRESETS = ("mae_vit_base", "mae_vit_large", "mae_vit_huge")
# assumed MFU with bf16 + flash SDPA + compile + fused AdamW on a dense ViT at 224 px; lower on
# H100 because the same short sequences (50 encoder / 197 decoder tokens) leave more of it idle
ASSUMED_MFU = {"NVIDIA A100-SXM4-80GB": 0.40, "NVIDIA H100 80GB HBM3": 0.35}
CHECKPOINTED = {"mae_vit_huge"}  # presets that need activation checkpointing at a useful per-GPU batch
LOADER_MARGIN = 1.3  # the loader should deliver 30 % more than the model consumes


def expected_row(
    preset: str, gpu: str, *, assumed_mfu: float, loader_images_per_s_per_worker: float | None = None
) -> dict[str, Any]:
    """One computed row: FLOPs per image, images/s, and loader workers needed per GPU."""
    arch = {k: v for k, v in preset_args(preset).items() if k in ARCH_FIELDS}
    flops = mae_flops(**arch, mask_ratio=0.75).train
    peak = gpu_peak_flops(gpu, "bf16") or 0.0
    effective_mfu = round(assumed_mfu * (0.75 if preset in CHECKPOINTED else 1.0), 4)
    images_per_s = effective_mfu * peak / flops
    workers = (
        math.ceil(LOADER_MARGIN * images_per_s / loader_images_per_s_per_worker)
        if loader_images_per_s_per_worker
        else None
    )
    return {
        "preset": preset,
        "gpu": gpu,
        "train_gflop_per_image": flops / 1e9,
        "peak_tflops_bf16": peak / 1e12,
        "assumed_mfu": effective_mfu,
        "activation_checkpointing": preset in CHECKPOINTED,
        "expected_images_per_s": images_per_s,
        "loader_workers_per_gpu": workers,
        "computed_not_measured": True,
    }


def expected_table(loader_images_per_s_per_worker: float | None = None) -> list[dict[str, Any]]:
    return [
        expected_row(p, gpu, assumed_mfu=mfu, loader_images_per_s_per_worker=loader_images_per_s_per_worker)
        for p in PRESETS
        for gpu, mfu in ASSUMED_MFU.items()
    ]

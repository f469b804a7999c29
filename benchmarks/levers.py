"""Speed levers, each measured against a plain eager fp32 step of the same model.

A lever *pays* when it is at least ``PAYS`` x the baseline on this device: in wall-clock
time on a GPU, in process CPU time on a CPU (wall-clock on a shared CPU machine mostly
measures the neighbours). ``benchmarks.model_step.default_settings`` turns on what pays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.model_step import Settings, default_settings, race
from benchmarks.project import Workload, project_contender

PAYS = 1.03  # below 3 % is within the noise of a shared machine


@dataclass(frozen=True)
class Lever:
    name: str
    settings: Settings
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def levers(device: torch.device) -> list[Lever]:
    base = Settings()
    return [
        Lever("baseline: eager fp32, fused SDPA attention", base),
        Lever("explicit attention (no SDPA)", base.with_(fused_attn=False), note="timm's softmax(QK^T)V path"),
        Lever("bf16 autocast", base.with_(precision="bf16")),
        Lever(
            "bf16 + explicit attention",
            base.with_(precision="bf16", fused_attn=False),
            note="CPU flash-attention kernel is slow in bf16 at these lengths",
        ),
        Lever("torch.compile (model + loss)", base.with_(compile=True)),
        Lever("fused AdamW", base.with_(fused_optimizer=True)),
        Lever("loss.item() every step", base.with_(sync_every_step=True), note="a host sync; costs most on GPU"),
        Lever(
            "predict all patches, where-masked loss",
            base.with_(full_prediction_loss=True),
            note="the official step; MAETask predicts and scores only the removed patches",
        ),
        Lever("boolean-mask loss", base.with_(boolean_mask_loss=True), note="dynamic shape; syncs on GPU"),
        Lever(
            "masks from torch.rand",
            base.with_(rng_masks=True),
            note="the baseline hashes per-sample seeds (world-size-independent masks)",
        ),
        Lever(
            "paper decoder 512 x 8",
            base,
            {"decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16},
            note="architecture, not a setting: cost of a wider/deeper decoder",
        ),
        Lever("project defaults", default_settings(device)),
        Lever("project defaults + torch.compile", default_settings(device).with_(compile=True)),
    ]


def measure_levers(
    work: Workload, device: torch.device, *, warmup: int, steps: int, repeats: int, only: list[str] | None = None
) -> dict[str, Any]:
    """Race the baseline and every lever (or those whose name contains one of ``only``)."""
    chosen = [
        lv for lv in levers(device) if lv.name.startswith("baseline") or not only or any(o in lv.name for o in only)
    ]
    contenders = [project_contender(work, lv.settings, device, name=lv.name, **lv.model_kwargs) for lv in chosen]
    measured = race(contenders, warmup=warmup, steps=steps, repeats=repeats, device=device)
    base = measured[0]
    rows = []
    for lv, m in zip(chosen, measured, strict=True):
        wall, cpu = m.images_per_s / base.images_per_s, m.images_per_cpu_s / base.images_per_cpu_s
        rows.append(
            {
                "lever": lv.name,
                "settings": lv.settings.label(),
                "note": lv.note,
                "images_per_s": m.images_per_s,
                "images_per_cpu_s": m.images_per_cpu_s,
                "speedup": wall,
                "speedup_cpu_time": cpu,
                "pays": (wall if device.type == "cuda" else cpu) >= PAYS,
                "warmup_s": m.warmup_s,
                "peak_memory_mb": m.peak_memory_mb,
                "runs_images_per_s": m.runs_images_per_s,
            }
        )
    return {"preset": work.preset, "batch_size": work.batch_size, "img_size": work.img_size, "rows": rows}

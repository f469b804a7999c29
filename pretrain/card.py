"""The model card of a pretrained MAE encoder's timm export (``run_dir/export/timm/README.md``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launch.card import CardFacts, dataset_id, trainer_recipe
from launch.checkpoint import read_meta
from pretrain.config import PretrainConfig


def pretrain_card(cfg: PretrainConfig, dataset: str, figures: dict[str, Any], world_size: int) -> CardFacts:
    """Card facts of an encoder pretrained with ``cfg`` (resolved) on ``dataset``; ``figures`` are
    ``summary.json``'s (steps, images seen, losses, probe top-1, speed)."""
    m, d, arch = cfg.model, cfg.data, cfg.model.model_args()
    loss = "per-patch normalized pixels" if m.norm_pix_loss else "pixels"
    recipe = [
        f"objective: MAE (He et al., 2022), mask ratio {m.mask_ratio}, MSE on the removed patches' {loss}",
        f"decoder (discarded in this export): {arch['decoder_embed_dim']} wide x {arch['decoder_depth']} blocks",
        f"augmentation: RandomResizedCrop to {arch['img_size']} px, scale {tuple(d.crop_scale)}, "
        f"horizontal flip p={d.hflip}",
        *trainer_recipe(cfg.trainer, world_size),
    ]
    probe = f" Its linear probe classifies {cfg.probe.pool}-pooled frozen features." if cfg.linear_probe else ""
    description = (
        f"A Vision Transformer encoder pretrained as a masked autoencoder (preset `{m.preset}`) "
        f"on {dataset_id(dataset)} with mae-pipeline; the class token and patch tokens come out of its final norm."
        f"{probe}"
    )
    return CardFacts(f"MAE ViT encoder ({m.preset}, {dataset_id(dataset)})", description, dataset, recipe, figures)


def checkpoint_card(cfg: PretrainConfig, ckpt: Path) -> CardFacts:
    """Card facts of checkpoint ``ckpt`` of a run: the run's ``summary.json`` if it describes this
    checkpoint, else the step and the last losses at or before it from ``metrics.jsonl``."""
    run_dir = ckpt.parent.parent
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    meta = read_meta(ckpt)
    world = int(meta.get("world_size", 1))
    if summary.get("checkpoint") and Path(summary["checkpoint"]).name == ckpt.name:
        return pretrain_card(cfg, summary.get("dataset") or _source(cfg), summary, world)
    step = int(meta["step"])
    figures: dict[str, Any] = {
        "steps": step,
        "images_seen": step * cfg.trainer.batch_size * cfg.trainer.accum_steps * world,
    }
    metrics = run_dir / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        record = json.loads(line)
        if record.get("step", step + 1) <= step and "loss" in record:
            figures["final_loss" if record.get("split") == "train" else "eval_loss"] = record["loss"]
    return pretrain_card(cfg, _source(cfg), figures, world)


def _source(cfg: PretrainConfig) -> str:
    source = cfg.data.source
    return source if isinstance(source, str) else ", ".join(source)

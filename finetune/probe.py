"""Linear probe (MAE paper, App. A.2): a frozen encoder, BatchNorm without affine + a linear head.

The encoder runs in eval mode and never masks; only the head trains (SGD with momentum by
default, the paper's LARS for ImageNet-scale step counts; a cosine schedule). Features are the class
token or the average of the patch tokens, both after the encoder's final norm. ``mae-probe`` / ``python -m finetune``::

    mae-probe backbone=runs/pretrain/export/timm probe.pool=avg probe.trainer.epochs=20
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from finetune.backbone import BackboneSpec, build_vit, check_fits, resolve_backbone, set_input_size
from finetune.cli import StageRun, percent, run_stage
from finetune.config import Pool, ProbeConfig
from finetune.heads import num_classes_of, topk_sums
from launch.cli import entry_point
from launch.data import DataConfig, dataset_info
from launch.task import Batch, Task

log = logging.getLogger(__name__)


class ProbeTask(Task):
    """Frozen ViT encoder -> pooled features (N, D) -> BatchNorm1d(affine=False) -> Linear -> (N, K)."""

    def __init__(self, encoder: VisionTransformer, num_classes: int, pool: Pool = "avg") -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.pool = pool
        dim = encoder.embed_dim
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        trunc_normal_(self.head[1].weight, std=0.01)  # as the official linear probe
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True) -> ProbeTask:
        """The trainer toggles modes; the encoder stays in eval (no dropout / drop path, ever)."""
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def features(self, imgs: Tensor) -> Tensor:
        """imgs: (N, C, H, W) -> (N, D) pooled encoder features; no masking, no autograd graph."""
        tokens = self.encoder.forward_features(imgs)  # (N, prefix + L, D), final norm applied
        if self.pool == "cls":
            return tokens[:, 0]
        return tokens[:, self.encoder.num_prefix_tokens :].mean(dim=1)

    def logits(self, imgs: Tensor) -> Tensor:
        """(N, K) fp32 logits; the head sees features in its own dtype (fp32, or bf16 / fp16 when
        DeepSpeed casts the module)."""
        norm, linear = self.head
        feats = self.features(imgs).to(linear.weight.dtype)
        if self.training and feats.shape[0] == 1:
            # a batch that skipped corrupt samples down to one has no batch statistics: BatchNorm
            # would raise, so this one batch is normalized with the running ones. The same modules
            # are still called in the same order on every rank (ZeRO-3 prefetches by that order)
            norm.eval()
            try:
                return linear(norm(feats)).float()
            finally:
                norm.train()
        return linear(norm(feats)).float()

    def forward(self, batch: Batch, phase: str = "main") -> dict[str, Tensor]:
        logits = self.logits(batch["image"])
        labels = batch["label"]
        return {"loss": F.cross_entropy(logits, labels), "acc": (logits.argmax(1) == labels).float().mean() * 100}

    def phase_module(self, phase: str) -> nn.Module:
        return self.head

    @torch.no_grad()
    def eval_step(self, batch: Batch) -> dict[str, Tensor]:
        return topk_sums(self.logits(batch["image"]), batch["label"])


def run_probe(
    cfg: ProbeConfig,
    *,
    backbone: BackboneSpec,
    data: DataConfig,
    run_dir: Path,
    seed: int,
    config: dict[str, Any] | None = None,
) -> Any:
    """Probe ``backbone`` on ``data`` into ``run_dir``; returns the trainer's ``FitResult``
    (``eval`` holds ``top1`` / ``top5`` in percent and ``loss`` on the val split)."""
    from launch.trainer import fit

    info = dataset_info(data)
    num_classes = num_classes_of(info, cfg.num_classes, "probe.num_classes")
    source = resolve_backbone(backbone, cfg.model_args)
    encoder = build_vit(source, num_classes=0)
    img_size = check_fits(
        encoder,
        channels=data.channels or info.channels,
        img_size=cfg.img_size,
        key="probe.img_size",
        data_size=info.img_size,
        source=source,
        data_mean=data.mean or info.mean,
    )
    task = ProbeTask(set_input_size(encoder, img_size), num_classes, cfg.pool)
    log.info("linear probe of %s (%s pooling) on %d classes", source.name, cfg.pool, num_classes)
    return fit(
        task,
        cfg.trainer,
        data,
        Path(run_dir),
        seed=seed,
        img_size=img_size,
        train_preset=cfg.train_preset,
        eval_preset="eval",
        config=config,
    )


class ProbeRun(StageRun):
    """``mae-probe`` settings: what to probe, on which data, where."""

    run_dir: str = Field("runs/probe", description="output folder (metrics, checkpoints, resolved config)")
    probe: ProbeConfig = Field(default_factory=ProbeConfig)


def run(argv: list[str]) -> int:
    cfg, result = run_stage(
        "mae-probe", ProbeRun, "Linear probe of a frozen ViT backbone (MAE paper protocol).", argv, "probe", run_probe
    )
    print(
        f"linear probe ({cfg.probe.pool}): top-1 {percent(result.eval, 'top1')}  "
        f"top-5 {percent(result.eval, 'top5')}  ({result.steps} steps, {cfg.run_dir})"
    )
    return 0


main = entry_point("mae-probe", run)

if __name__ == "__main__":
    main()

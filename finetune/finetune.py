"""Full fine-tuning (MAE paper, App. A.1), run by the shared trainer.

Layer-wise lr decay (``trainer.optim.layer_decay``: block ``i`` of ``depth`` trains at
``lr * layer_decay ** (depth - i)``, the patch/position embeddings at ``layer_decay ** (depth + 1)``,
the head and final norm at ``lr``; timm's ``param_groups_layer_decay`` over the ViT's
``group_matcher``), drop path, timm ``Mixup`` / CutMix with label smoothing and
``SoftTargetCrossEntropy``, RandAugment + RandomErasing (data preset ``finetune``), an optional
EMA of the weights (timm ``ModelEmaV3``), a global-pool or class-token head, top-1 / top-5
every epoch, the best weights exported to ``run_dir/best`` and the final classifier to
``run_dir/export`` (timm folders with a ``README.md`` model card, rebuilt at the trained
``finetune.img_size`` by ``timm.create_model("local-dir:...", pretrained=True)``)::

    mae-finetune --config configs/finetune/mnist.yaml backbone=runs/pretrain/export/timm
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.data import Mixup
from timm.layers import trunc_normal_
from timm.loss import SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.utils import ModelEmaV3
from torch import Tensor, nn

from finetune.backbone import BackboneSource, BackboneSpec, build_vit, check_fits, resolve_backbone, set_input_size
from finetune.cli import StageRun, percent, run_stage
from finetune.config import ImgSize, NumClasses, Pool
from finetune.heads import num_classes_of, topk_sums
from launch import dist
from launch.card import CardFacts, dataset_id, trainer_recipe, write_card
from launch.cli import entry_point
from launch.config import LogConfig, OptimConfig, Schema, TrainerConfig, over_defaults
from launch.data import DataConfig, dataset_info
from launch.errors import ConfigError
from launch.export import export_timm
from launch.fileio import write_atomic
from launch.task import Batch, Task

log = logging.getLogger(__name__)

BEST_DIR, EXPORT_DIR, BEST_FILE = "best", "export", "best.json"


def _finetune_trainer() -> TrainerConfig:
    # paper (ViT-B): AdamW (0.9, 0.999), base lr 5e-4, wd 0.05, layer decay 0.65, warmup 5 of 100 epochs
    optim = OptimConfig(
        name="adamw",
        base_lr=5e-4,
        betas=(0.9, 0.999),
        weight_decay=0.05,
        layer_decay=0.65,
        warmup_epochs=1.0,
        min_lr=1e-6,
    )
    return TrainerConfig(epochs=10, batch_size=64, optim=optim, log=LogConfig(images_every_epochs=0))


class FinetuneConfig(Schema):
    pool: Pool = Field("avg", description="head input: 'avg' (global pool + fc_norm, paper default) or 'cls'")
    num_classes: NumClasses = None
    img_size: ImgSize = None
    model_args: dict[str, Any] = Field(
        default_factory=dict, description="architecture overrides for a timm-name backbone"
    )
    drop_path: float = Field(0.1, ge=0, lt=1, description="stochastic depth rate of the last block (linear ramp)")
    mixup: float = Field(0.8, ge=0, description="mixup alpha, 0 = off")
    cutmix: float = Field(1.0, ge=0, description="cutmix alpha, 0 = off")
    mixup_prob: float = Field(1.0, ge=0, le=1, description="probability of mixing a batch")
    mixup_switch_prob: float = Field(
        0.5, ge=0, le=1, description="probability of cutmix instead of mixup when both are on"
    )
    smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing")
    ema: bool = Field(False, description="keep an exponential moving average of the weights (evaluated as ema_top1)")
    ema_decay: float = Field(0.9999, gt=0, lt=1, description="EMA decay per optimizer step")
    train_preset: Literal["finetune", "pretrain", "eval"] = Field(
        "finetune", description="training augmentation preset"
    )
    trainer: Annotated[TrainerConfig, over_defaults(_finetune_trainer)] = Field(
        default_factory=_finetune_trainer, description="fine-tune training (defaults: AdamW, layer decay 0.65)"
    )

    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


class FinetuneTask(Task):
    """A timm ViT classifier: images (N, C, H, W) -> logits (N, K), trained end to end."""

    def __init__(
        self,
        model: VisionTransformer,
        *,
        mixup: Mixup | None = None,
        smoothing: float = 0.0,
        ema_decay: float | None = None,
        best: BestKeeper | None = None,
    ) -> None:
        super().__init__()
        self.model, self.mixup, self.smoothing, self.best = model, mixup, smoothing, best
        # the EMA is a submodule, so checkpoints carry it; its parameters never require grad
        self.ema = ModelEmaV3(model, decay=ema_decay).requires_grad_(False) if ema_decay is not None else None

    def forward(self, batch: Batch, phase: str = "main") -> dict[str, Tensor]:
        imgs, labels = batch["image"], batch["label"]
        if self.training and self.mixup is not None:
            imgs, soft = self.mixup(*_even(imgs, labels))  # soft: (N', K), rows sum to 1, smoothing included
            loss = SoftTargetCrossEntropy()(self.model(imgs).float(), soft)
            return {"loss": loss}
        logits = self.model(imgs).float()
        return {
            "loss": F.cross_entropy(logits, labels, label_smoothing=self.smoothing),
            "acc": (logits.argmax(1) == labels).float().mean() * 100,
        }

    def phase_module(self, phase: str) -> nn.Module:
        return self.model  # its group_matcher() drives layer-wise lr decay

    @torch.no_grad()
    def eval_step(self, batch: Batch) -> dict[str, Tensor]:
        out = topk_sums(self.model(batch["image"]), batch["label"])
        if self.ema is not None:
            ema = topk_sums(self.ema.module(batch["image"]), batch["label"])
            out.update(ema_top1=ema["top1"], ema_top5=ema["top5"])
        return out

    def on_step_end(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=step)

    def on_eval_end(self, metrics: dict[str, float], step: int) -> None:
        if self.best is None:
            return
        use_ema = self.ema is not None and metrics.get("ema_top1", -1.0) > metrics["top1"]
        top1 = metrics["ema_top1"] if use_ema else metrics["top1"]
        self.best.offer(self.ema.module if use_ema else self.model, top1, step, "ema" if use_ema else "model", metrics)


def _even(imgs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(N, C, H, W), (N,) -> an even number of samples for timm's ``Mixup``, which pairs sample ``i``
    with ``N - 1 - i``. Training batches are full (``drop_last``) and even (checked), but a corrupt
    sample skipped by the loader leaves one odd: mix its first N - 1, or a lone sample with itself."""
    n = labels.shape[0]
    if n % 2 == 0:
        return imgs, labels
    if n == 1:
        return torch.cat([imgs, imgs]), torch.cat([labels, labels])
    return imgs[:-1], labels[:-1]


class BestKeeper:
    """Exports the weights with the best val top-1 so far to ``run_dir/best`` (rank 0, atomic);
    ``best.json`` records which, so a resumed run keeps competing against it."""

    def __init__(
        self,
        run_dir: Path,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        labels: list[str],
        card: Callable[[dict[str, Any]], CardFacts],
    ) -> None:
        self.dir, self.mean, self.std, self.labels, self.card = Path(run_dir) / BEST_DIR, mean, std, labels, card
        record = self.dir / BEST_FILE
        self.top1 = json.loads(record.read_text())["top1"] if record.is_file() else float("-inf")

    def offer(self, model: nn.Module, top1: float, step: int, which: str, metrics: dict[str, float]) -> None:
        if top1 <= self.top1:
            return
        self.top1 = top1
        if dist.is_main():
            export_timm(
                model, self.dir, mean=self.mean, std=self.std, label_names=self.labels, tag="mae-ft", overwrite=True
            )
            # atomic: a resumed run reads it back (a half-written record would not parse)
            write_atomic(
                self.dir / BEST_FILE, json.dumps({"top1": top1, "step": step, "weights": which, "eval": metrics})
            )
            prefix = "ema_" if which == "ema" else ""
            write_card(self.dir, self.card({"steps": step, "top1": top1, "top5": metrics.get(f"{prefix}top5")}))
        log.info("new best top-1 %.2f%% at step %d (%s weights) -> %s", top1, step, which, self.dir)


def build_mixup(cfg: FinetuneConfig, num_classes: int) -> Mixup | None:
    if not cfg.mixes():
        return None
    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        label_smoothing=cfg.smoothing,
        num_classes=num_classes,
    )


def build_classifier(cfg: FinetuneConfig, source: BackboneSource, num_classes: int) -> VisionTransformer:
    """The backbone with a fresh ``num_classes`` head drawn with the official fine-tune's std 2e-5
    (timm's is 0.02): the pretrained features, not a random head, dominate the first steps."""
    model = build_vit(
        source,
        num_classes=num_classes,
        global_pool="avg" if cfg.pool == "avg" else "token",
        drop_path_rate=cfg.drop_path,
    )
    trunc_normal_(model.head.weight, std=2e-5)
    return model


def _check_settings(cfg: FinetuneConfig) -> bool:
    """Settings that cannot work together; returns whether whole weights are available for EMA / best."""
    t = cfg.trainer
    if cfg.mixes() and t.batch_size % 2:
        raise ConfigError(
            f"mixup/cutmix pair each batch with its reverse: finetune.trainer.batch_size={t.batch_size} must be even"
        )
    zero3 = t.backend == "deepspeed" and t.zero_stage == 3
    if cfg.ema and zero3:  # FSDP shards the EMA like the weights: its update is a local lerp
        raise ConfigError(
            "finetune.ema needs whole parameters on every rank: use trainer.zero_stage<=2 or finetune.ema=false"
        )
    return not zero3 and t.backend != "fsdp"  # best/ is exported by rank 0 alone, from whole weights


def run_finetune(
    cfg: FinetuneConfig,
    *,
    backbone: BackboneSpec,
    data: DataConfig,
    run_dir: Path,
    seed: int,
    config: dict[str, Any] | None = None,
) -> Any:
    """Fine-tune ``backbone`` on ``data``; returns the trainer's ``FitResult`` (``eval``: top1/top5 in %)."""
    from launch.trainer import fit

    whole = _check_settings(cfg)
    info = dataset_info(data)
    num_classes = num_classes_of(info, cfg.num_classes, "finetune.num_classes")
    source = resolve_backbone(backbone, cfg.model_args)
    model = build_classifier(cfg, source, num_classes)
    mean, std = tuple(data.mean or info.mean), tuple(data.std or info.std)
    img_size = check_fits(
        model,
        channels=data.channels or info.channels,
        img_size=cfg.img_size,
        key="finetune.img_size",
        data_size=info.img_size,
        source=source,
        data_mean=mean,
    )
    set_input_size(model, img_size)  # the exports record this size: timm rebuilds them at it

    def card(figures: dict[str, Any]) -> CardFacts:
        return finetune_card(
            cfg, backbone=source.name, dataset=info.source, num_classes=num_classes, img_size=img_size, figures=figures
        )

    best = BestKeeper(run_dir, mean, std, info.class_names, card) if whole else None
    task = FinetuneTask(
        model,
        mixup=build_mixup(cfg, num_classes),
        smoothing=cfg.smoothing,
        ema_decay=cfg.ema_decay if cfg.ema else None,
        best=best,
    )
    log.info("fine-tuning %s (%s head) on %d classes", source.name, cfg.pool, num_classes)
    result = fit(
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
    if dist.is_main():
        export = export_timm(
            result.task.model,
            Path(run_dir) / EXPORT_DIR,
            mean=mean,
            std=std,
            label_names=info.class_names,
            tag="mae-ft",
            overwrite=True,
        )
        write_card(
            export,
            card(
                {
                    "steps": result.steps,
                    "final_loss": result.final_loss,
                    "eval_loss": result.eval.get("loss"),
                    "top1": result.eval.get("top1"),
                    "top5": result.eval.get("top5"),
                }
            ),
        )
    return result


def finetune_card(
    cfg: FinetuneConfig, *, backbone: str, dataset: str, num_classes: int, img_size: int, figures: dict[str, Any]
) -> CardFacts:
    """Card facts of a classifier fine-tuned with ``cfg``; ``figures`` hold steps, losses, top-1 / top-5."""
    t = cfg.trainer
    world = dist.world_size()
    mixing = (
        f"mixup {cfg.mixup} / cutmix {cfg.cutmix} (prob {cfg.mixup_prob}, switch {cfg.mixup_switch_prob})"
        if cfg.mixes()
        else "no mixup / cutmix"
    )
    recipe = [
        f"fine-tuned end to end from `{backbone}` at {img_size} px, {cfg.pool} head, drop path {cfg.drop_path}",
        f"augmentation: preset {cfg.train_preset}, {mixing}, label smoothing {cfg.smoothing}"
        + (f", EMA of the weights (decay {cfg.ema_decay})" if cfg.ema else ""),
        *trainer_recipe(t, world),
    ]
    figures = {**figures, "images_seen": figures["steps"] * t.batch_size * t.accum_steps * world}
    description = (
        f"A Vision Transformer classifier ({num_classes} classes of {dataset_id(dataset)}) fine-tuned end to "
        f"end from `{backbone}` with mae-pipeline's `mae-finetune` (recipe below)."
    )
    return CardFacts(f"ViT classifier fine-tuned on {dataset_id(dataset)}", description, dataset, recipe, figures)


class FinetuneRun(StageRun):
    """``mae-finetune`` settings: what to fine-tune, on which data, where."""

    run_dir: str = Field(
        "runs/finetune", description="output folder (metrics, checkpoints, best/ and export/ timm folders)"
    )
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)


def run(argv: list[str]) -> int:
    cfg, result = run_stage(
        "mae-finetune",
        FinetuneRun,
        "Fine-tune a ViT backbone end to end (MAE paper recipe).",
        argv,
        "finetune",
        run_finetune,
    )
    best_file = Path(cfg.run_dir) / BEST_DIR / BEST_FILE
    best = json.loads(best_file.read_text()) if best_file.is_file() else {}
    print(
        f"fine-tune: top-1 {percent(result.eval, 'top1')}  top-5 {percent(result.eval, 'top5')}  "
        f"best top-1 {percent(best, 'top1')}  ({result.steps} steps, {cfg.run_dir})"
    )
    return 0


main = entry_point("mae-finetune", run)

if __name__ == "__main__":
    main()

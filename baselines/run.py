"""One baseline run, as an outline: build -> unsupervised fit(s) -> pictures -> linear probe ->
optional supervised fine-tuning -> ``results.json``. Every fit is the shared
:func:`launch.trainer.fit` (multi-process, checkpoint/resume, logging), one run directory
per stage, so an interrupted run resumes where it stopped.

Layout of ``run_dir``: ``config.yaml``, ``<stage>/`` (trainer runs: ``train`` or
``layer0 .. layerK``, ``probe``, ``finetune``), ``pictures/*.png``, ``tensorboard/``,
``results.json``. A latent sweep holds one such directory per size plus the error curve.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from baselines.base import ClassifierTask, Codes
from baselines.config import BaselineConfig
from baselines.families import build_task
from baselines.pictures import line_plot, save_pictures
from baselines.pixels import Pixels
from finetune.heads import num_classes_of
from finetune.probe import ProbeTask
from launch import dist
from launch.config import save_config
from launch.data.dataset import DatasetInfo, dataset_info
from launch.fileio import write_atomic
from launch.task import Task
from launch.trainer import fit

log = logging.getLogger(__name__)

#: validation images drawn in the final pictures (the code scatter uses all of them)
PICTURE_IMAGES = 1000


def run(cfg: BaselineConfig) -> dict[str, Any]:
    """Run the baseline ``cfg.name`` (or its latent sweep); returns what ``results.json`` holds."""
    return run_sweep(cfg) if cfg.latent_sweep else run_one(cfg, cfg.run_dir)


def run_one(cfg: BaselineConfig, run_dir: Path) -> dict[str, Any]:
    info = dataset_info(cfg.data)
    task = build_task(cfg.model, Pixels(info.mean, info.std), cfg.img_size)
    if dist.is_main():
        save_config(cfg, run_dir / "config.yaml")
    results: dict[str, Any] = {
        "name": cfg.name,
        "family": cfg.model.family,
        "model": cfg.model.model_dump(mode="json"),
        "params": sum(p.numel() for p in task.parameters()),
    }
    results |= pretrain(cfg, task, run_dir)
    if dist.is_main():
        write_pictures(cfg, task, run_dir)
    if cfg.probe is not None and info.num_classes:
        results["probe"] = probe(cfg, task, run_dir)
    if cfg.finetune is not None and info.num_classes:
        results["finetune"] = finetune(cfg, task, info, run_dir)
    if dist.is_main():
        _write_results(run_dir, results)
    log.info("%s: %s", cfg.name, json.dumps(results))
    return results


def _fit(cfg: BaselineConfig, task: Task, trainer_cfg: Any, run_dir: Path, preset: str):
    return fit(
        task,
        trainer_cfg,
        cfg.data,
        run_dir,
        seed=cfg.seed,
        img_size=cfg.img_size,
        train_preset=preset,
        config=cfg.model_dump(mode="json"),
    )


def pretrain(cfg: BaselineConfig, task: Task, run_dir: Path) -> dict[str, Any]:
    """Every unsupervised stage of ``task`` (one, or one per stacked layer); the last stage's eval."""
    start, steps, result = time.perf_counter(), 0, None
    for stage, stage_task in task.stages():
        result = _fit(cfg, stage_task, cfg.trainer, run_dir / stage, cfg.train_preset)
        steps += result.steps
    return {
        "eval": result.eval,
        "steps": steps,
        "train_seconds": round(time.perf_counter() - start, 1),
        "images_per_s": result.images_per_s,
    }


class CodeProbeTask(ProbeTask):
    """The MAE linear probe (frozen encoder, BatchNorm without affine + linear head, same
    optimizer and schedule) with a baseline's :class:`~baselines.base.Codes` as the encoder."""

    @torch.no_grad()
    def features(self, imgs: Tensor) -> Tensor:
        """imgs: (N, C, H, W) normalized -> codes (N, D)."""
        return self.encoder(imgs)


def probe(cfg: BaselineConfig, task: Task, run_dir: Path) -> dict[str, Any]:
    """Linear-probe accuracy (top-1, %) of the frozen codes on the val split."""
    results = probe_backbone(cfg, task.backbone(), run_dir / "probe")
    task.train()  # the probe left the shared encoder in eval mode
    return results


def probe_backbone(cfg: BaselineConfig, backbone: Codes, run_dir: Path) -> dict[str, Any]:
    """``cfg.probe`` on the frozen ``backbone``: top-1 (%) and loss on the val split."""
    info = dataset_info(cfg.data)
    probe_task = CodeProbeTask(backbone, num_classes_of(info, cfg.probe.num_classes, "probe.num_classes"))
    start = time.perf_counter()
    result = _fit(cfg, probe_task, cfg.probe.trainer, run_dir, cfg.probe.train_preset)
    return {
        "top1": result.eval.get("top1"),
        "loss": result.eval.get("loss"),
        "steps": result.steps,
        "seconds": round(time.perf_counter() - start, 1),
    }


def probe_pixels(cfg: BaselineConfig, run_dir: Path) -> dict[str, Any]:
    """The same linear probe on the raw [0, 1] pixels (no encoder): the floor a code should reach.
    Writes ``run_dir/results.json``; ``cfg.model`` is not used."""
    info = dataset_info(cfg.data)
    flat = Codes(Pixels(info.mean, info.std), nn.Flatten(), info.channels * cfg.img_size**2)
    results = {
        "name": "raw pixels",
        "family": None,
        "params": 0,
        "eval": {},
        "probe": probe_backbone(cfg, flat, run_dir / "probe"),
    }
    if dist.is_main():
        save_config(cfg, run_dir / "config.yaml")
        _write_results(run_dir, results)
    return results


def finetune(cfg: BaselineConfig, task: Task, info: DatasetInfo, run_dir: Path) -> dict[str, Any]:
    """Encoder + linear head trained end to end with labels (the classic "AE + classifier")."""
    start = time.perf_counter()
    result = _fit(
        cfg, ClassifierTask(task.backbone(), info.num_classes), cfg.finetune, run_dir / "finetune", cfg.train_preset
    )
    return {
        "top1": result.eval.get("top1"),
        "loss": result.eval.get("loss"),
        "steps": result.steps,
        "seconds": round(time.perf_counter() - start, 1),
    }


@torch.no_grad()
def write_pictures(cfg: BaselineConfig, task: Task, run_dir: Path) -> None:
    """The task's pictures on the first validation images: PNGs + TensorBoard (rank 0 only)."""
    from launch.data import build_loader

    loader = build_loader(
        cfg.data, "val", preset="eval", batch_size=PICTURE_IMAGES, img_size=cfg.img_size, seed=cfg.seed
    )
    device = next(task.parameters()).device
    batch = next(iter(loader))
    task.eval()
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        pictures = task.pictures({**batch, "image": batch["image"].to(device), "label": batch["label"].to(device)})
    save_pictures(pictures, run_dir / "pictures")
    with SummaryWriter(str(run_dir / "tensorboard")) as writer:
        for name, picture in pictures.items():
            writer.add_image(f"final/{name}", picture)


def run_sweep(cfg: BaselineConfig) -> dict[str, Any]:
    """One run per latent size, then the validation error against the latent size."""
    rows = []
    for size in cfg.latent_sweep:
        one = cfg.model_copy(update={"model": cfg.model.model_copy(update={"latent_dim": size}), "latent_sweep": []})
        rows.append(run_one(one, cfg.run_dir / f"latent{size:03d}") | {"latent_dim": size})
    results = {"name": cfg.name, "sweep": rows}
    if dist.is_main():
        sizes = [r["latent_dim"] for r in rows]
        series = {
            "val MSE per pixel": [r["eval"]["mse"] for r in rows],
            "val BCE per pixel": [r["eval"]["bce"] for r in rows],
        }
        curve = line_plot(sizes, series, "latent size", "reconstruction error", f"{cfg.name}: error vs latent size")
        save_pictures({"recon_vs_latent": curve}, cfg.run_dir / "pictures")
        with SummaryWriter(str(cfg.run_dir / "tensorboard")) as writer:
            writer.add_image("final/recon_vs_latent", curve)
        _write_results(cfg.run_dir, results)
    return results


def _write_results(run_dir: Path, results: dict[str, Any]) -> None:
    write_atomic(run_dir / "results.json", json.dumps(results, indent=2) + "\n")

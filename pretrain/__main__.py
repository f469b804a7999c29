"""``mae-pretrain`` / ``python -m pretrain``: pretrain an MAE, export it, probe it, picture it.

With no arguments: prepare the shipped MNIST on first use, pretrain a tiny MAE
(``configs/pretrain/mnist_tiny.yaml``), export the encoder to timm, run a linear probe,
save a reconstruction picture and print one summary line. Every launcher works:

    mae-pretrain --config configs/pretrain/vit_base_in1k.yaml trainer.batch_size=128
    torchrun --nproc_per_node 8 -m pretrain --config ... trainer.precision=bf16
    accelerate launch --config_file launch/accelerate/zero2.yaml -m pretrain --config ...
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torchvision.utils import save_image

from finetune.backbone import check_patch_multiple
from finetune.probe import run_probe
from launch import dist
from launch.card import write_card
from launch.cli import config_parser, entry_point
from launch.config import load_config
from launch.data import DataConfig, DatasetInfo, build_loader, dataset_info
from launch.errors import ConfigError
from launch.export import export_timm
from launch.fileio import replacing, write_atomic
from launch.trainer import FitResult, fit
from pretrain.card import pretrain_card
from pretrain.config import DEFAULT_CONFIG, PretrainConfig
from pretrain.export import export_full
from pretrain.task import MAETask, build_task

log = logging.getLogger("mae-pretrain")


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """The whole pipeline; returns the summary (also written to ``run_dir/summary.json``)."""
    run_dir = Path(cfg.run_dir)
    info = dataset_info(cfg.data)  # prepares a built-in source on first use
    mean, std = cfg.data.mean or info.mean, cfg.data.std or info.std
    _check_fits(cfg, info)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    task = build_task(cfg.model, image_mean=mean, image_std=std)
    result = fit(
        task,
        cfg.trainer,
        cfg.data,
        run_dir,
        seed=cfg.seed,
        img_size=task.model.img_size,
        config=cfg.model_dump(mode="json"),
    )
    trained: MAETask = result.task
    images_seen = result.steps * cfg.trainer.batch_size * cfg.trainer.accum_steps * dist.world_size()
    if dist.is_main():
        if cfg.export:
            export_timm(
                trained.model,
                run_dir / "export" / "timm",
                mean=mean,
                std=std,
                label_names=info.class_names,
                overwrite=True,
            )
            export_full(
                trained.model,
                run_dir / "export" / "full",
                mean=mean,
                std=std,
                overwrite=True,
                extra={"mask_ratio": cfg.model.mask_ratio, "norm_pix_loss": cfg.model.norm_pix_loss},
            )
            _write_card(cfg, _summary(result, None, info, images_seen))
        if cfg.picture:
            _save_picture(trained, cfg.data, run_dir / "reconstruction.png", seed=cfg.seed)
    dist.barrier()  # the probe of rank > 0 reads the export written by rank 0
    probe = None
    if cfg.linear_probe:
        backbone: Any = run_dir / "export" / "timm" if cfg.export else trained.model
        probe = run_probe(
            cfg.probe,
            backbone=backbone,
            data=cfg.data,
            run_dir=run_dir / "probe",
            seed=cfg.seed,
            config=cfg.probe.model_dump(mode="json"),
        )
    summary = _summary(result, probe, info, images_seen)
    if dist.is_main():
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
        if cfg.export and probe is not None:
            _write_card(cfg, summary)  # now with the probe's top-1
    return summary


def _write_card(cfg: PretrainConfig, summary: dict[str, Any]) -> None:
    write_card(
        Path(cfg.run_dir) / "export" / "timm", pretrain_card(cfg, summary["dataset"], summary, dist.world_size())
    )


def _check_fits(cfg: PretrainConfig, info: DatasetInfo) -> None:
    channels = cfg.data.channels or info.channels
    in_chans = cfg.model.model_args()["in_chans"]
    if in_chans != channels:
        raise ConfigError(
            f"model has in_chans={in_chans} but the data has {channels} channels: "
            f"set model.in_chans={channels} or data.channels={in_chans}"
        )
    if cfg.linear_probe and "val" not in info.splits:
        raise ConfigError("linear_probe=true needs a 'val' split in the data: prepare one or set linear_probe=false")
    if cfg.linear_probe:  # the probe runs after pretraining: refuse its size now, not hours later
        check_patch_multiple(cfg.probe.img_size, cfg.model.model_args()["patch_size"], "probe.img_size")


@torch.no_grad()
def _save_picture(task: MAETask, data: DataConfig, path: Path, *, seed: int) -> None:
    """Original / masked / reconstruction / pasted, for the first validation images."""
    split = "val" if "val" in dataset_info(data).splits else "train"
    loader = build_loader(
        data.model_copy(update={"workers": 0}),
        split,
        preset="eval",
        batch_size=task.num_pictures,
        img_size=task.model.img_size,
        seed=seed,
    )
    batch = next(iter(loader))
    device = next(task.parameters()).device
    task.eval()
    grid = task.pictures({**batch, "image": batch["image"].to(device)})["reconstruction"]
    with replacing(path) as tmp:  # a reader never sees half a picture
        save_image(grid.float().cpu(), tmp, format="png")


def _summary(result: FitResult, probe: FitResult | None, info: DatasetInfo, images_seen: int) -> dict[str, Any]:
    return {
        "run_dir": str(result.run_dir),
        "dataset": info.source,
        "steps": result.steps,
        "images_seen": images_seen,
        "final_loss": result.final_loss,
        "eval_loss": result.eval.get("loss"),
        "probe_top1": probe.eval.get("top1") if probe else None,
        "images_per_s": result.images_per_s,
        "mfu": result.mfu,
        "skipped_samples": result.skipped_samples,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
    }


def summary_line(s: dict[str, Any]) -> str:
    def num(value: float | None, fmt: str) -> str:
        return "n/a" if value is None or math.isnan(value) else format(value, fmt)

    mfu = f" | MFU {num(s['mfu'] * 100, '.1f')}%" if s["mfu"] is not None else ""
    probe = f"{num(s['probe_top1'], '.2f')}%" if s["probe_top1"] is not None else "n/a"
    return (
        f"mae-pretrain: final loss {num(s['final_loss'], '.4f')} | probe top-1 {probe} | "
        f"{num(s['images_per_s'], '.0f')} images/s{mfu} | {s['steps']} steps | {s['run_dir']}"
    )


def run(argv: list[str]) -> int:
    parser = config_parser(
        "mae-pretrain", PretrainConfig, __doc__.split("\n\n")[0] + f"\nNo --config: {DEFAULT_CONFIG}"
    )
    args = parser.parse_args(argv)
    if not dist.is_main():  # one copy of the progress messages, from global rank 0
        logging.getLogger().setLevel(logging.WARNING)
    path = args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    cfg = load_config(PretrainConfig, path, args.overrides)
    log.info("config: %s, run dir: %s", path or "built-in defaults", cfg.run_dir)
    summary = pretrain(cfg)
    if dist.is_main():
        print(summary_line(summary), flush=True)
    return 0


main = entry_point("mae-pretrain", run)

if __name__ == "__main__":
    main()

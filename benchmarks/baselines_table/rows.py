"""Table rows from run folders: a baseline's ``results.json`` + cost, the MAE run's own outputs
(its loss converted to [0, 1] pixels where that is possible), each run's probe protocol."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from benchmarks.baselines_table import COST

MAE_NAME = "mae (mnist_tiny)"


def present(run_root: Path, name: str) -> dict[str, Any] | None:
    """Row of the run ``run_root/name`` (its ``results.json`` and cost), None if it has not finished."""
    path = run_root / name / "results.json"
    return json.loads(path.read_text()) | {"cost": read_cost(run_root / name)} if path.is_file() else None


def read_cost(run_dir: Path) -> dict[str, float] | None:
    path = run_dir / COST
    return json.loads(path.read_text()) if path.is_file() else None


def mae_row(run_dir: Path, finetune_dir: Path) -> dict[str, Any]:
    """The MAE numbers from the shared pipeline's own outputs (a "not run yet" row without them)."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return {"name": MAE_NAME, "eval": {}, "missing": True}
    s = json.loads(summary.read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds = max((r["time"] for r in records if r.get("split") == "train"), default=None)
    best = finetune_dir / "best" / "best.json"
    cfg = _mae_config(run_dir)
    return {
        "name": MAE_NAME,
        "params": _mae_params(cfg),
        "train_seconds": seconds,
        "steps": s.get("steps"),
        "eval": {"mae_loss": s.get("eval_loss"), "mae_unit_mse": _unit_mse(cfg, s.get("eval_loss"))},
        "probe": {"top1": s.get("probe_top1")},
        "finetune": {"top1": json.loads(best.read_text())["top1"]} if best.is_file() else None,
    }


def _mae_config(run_dir: Path) -> Any:
    from pretrain.config import PretrainConfig

    return PretrainConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))


def _mae_params(cfg: Any) -> int:
    from pretrain.task import build_task

    chans = cfg.model.model_args()["in_chans"]
    task = build_task(cfg.model, image_mean=(0.5,) * chans, image_std=(0.5,) * chans)
    return sum(p.numel() for p in task.model.parameters())


def _unit_mse(cfg: Any, loss: float | None) -> float | None:
    """MAE's val loss in [0, 1] pixels: without ``norm_pix_loss`` it is the MSE of the
    dataset-normalized masked patches, so it scales by the variance of the normalization
    (mean over channels); a per-patch-normalized loss has no such conversion (None)."""
    if loss is None or cfg.model.norm_pix_loss:
        return None
    from launch.data import dataset_info

    info = dataset_info(cfg.data)
    std = cfg.data.std or info.std
    return loss * sum(v * v for v in std) / len(std)


def probe_protocol(run_dir: Path) -> str | None:
    """``LARS, 5 epochs, batch 256, base lr 0.1`` from a run's saved config (None if not probed)."""
    path = run_dir / "config.yaml"
    probe = (yaml.safe_load(path.read_text()) or {}).get("probe") if path.is_file() else None
    if not probe:
        return None
    t = probe["trainer"]
    lr = f"lr {t['optim']['lr']}" if t["optim"].get("lr") else f"base lr {t['optim']['base_lr']}"
    return f"{t['optim']['name'].upper()}, {t['epochs']} epochs, batch {t['batch_size']}, {lr}"

"""Does MAE pretraining help? The results table of docs/results.md, on the shipped MNIST (4,000 / 1,000 split).

Rows: (a) the MAE-pretrained tiny ViT, (b) the same ViT from random init, (c) logistic
regression on raw pixels (scikit-learn). Columns: linear-probe and fine-tune top-1 on the
fixed val split. Everything runs through the project's own pipeline (``pretrain`` ->
export -> ``run_probe`` / ``run_finetune``, the shared trainer and data stack)::

    python -m benchmarks.mnist_results                     # -> runs/mnist-results/{results.md,results.json}
    python -m benchmarks.mnist_results trainer.epochs=200  # the table in docs/results.md: MAE pretrained 200 epochs
    python -m benchmarks.mnist_results --skip-finetune     # probes only (faster)
    python -m benchmarks.mnist_results trainer.epochs=30 --finetune-set trainer.epochs=4

The pretraining, probe and fine-tune recipes are ``configs/pretrain/mnist_tiny.yaml`` and
``configs/finetune/mnist.yaml`` (``--pretrain-config`` / ``--finetune-config`` to change them;
trailing ``key=value`` items override the pretraining config). Every stage resumes from its run
folder under ``--out`` (``trainer.checkpoint.resume=auto``), so an interrupted script continues
where it stopped and finished stages are only re-evaluated.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from finetune.finetune import FinetuneConfig, run_finetune
from finetune.probe import run_probe
from launch.cli import entry_point
from launch.config import load_config, merge, parse_overrides
from launch.data import DataConfig, build_loader
from launch.fileio import write_atomic
from pretrain.__main__ import pretrain
from pretrain.config import DEFAULT_CONFIG, PretrainConfig
from pretrain.presets import build_model

log = logging.getLogger("mnist-results")
FINETUNE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "finetune" / "mnist.yaml"


def raw_pixel_features(data: DataConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, C*H*W) normalized pixels at the stored size (no resize, no crop) and (N,) labels."""
    plain = data.model_copy(update={"eval_crop_pct": 1.0, "workers": 0})
    xs, ys = [], []
    for batch in build_loader(plain, split, preset="eval", batch_size=500, img_size=28, seed=0):
        xs.append(batch["image"].flatten(1).numpy())
        ys.append(batch["label"].numpy())
    return np.concatenate(xs), np.concatenate(ys)


def logistic_regression(data: DataConfig) -> float:
    """Val top-1 (%) of multinomial logistic regression on standardized raw pixels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, y_train = raw_pixel_features(data, "train")
    x_val, y_val = raw_pixel_features(data, "val")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=500))
    return 100.0 * clf.fit(x_train, y_train).score(x_val, y_val)


def random_init_backbone(cfg: PretrainConfig) -> torch.nn.Module:
    """The pretrained run's architecture with its initial weights (same seed, no training)."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model)


def results(cfg: PretrainConfig, ft_cfg: FinetuneConfig | None, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(update={"run_dir": str(out / "pretrain")})
    rows: dict[str, dict[str, float | None]] = {}
    timings: dict[str, float] = {}

    start = time.perf_counter()
    summary = pretrain(cfg)  # pretrains, exports to <run>/export, probes the export
    timings["pretrain + probe"] = time.perf_counter() - start
    mae_backbone = Path(cfg.run_dir) / "export" / "timm"
    rows["MAE-pretrained ViT"] = {"probe": summary["probe_top1"], "finetune": None}

    start = time.perf_counter()
    scratch = run_probe(
        cfg.probe, backbone=random_init_backbone(cfg), data=cfg.data, run_dir=out / "probe-random", seed=cfg.seed
    )
    timings["probe random init"] = time.perf_counter() - start
    rows["same ViT, random init"] = {"probe": scratch.eval["top1"], "finetune": None}

    if ft_cfg is not None:
        for name, backbone, tag in (
            ("MAE-pretrained ViT", mae_backbone, "mae"),
            ("same ViT, random init", random_init_backbone(cfg), "random"),
        ):
            start = time.perf_counter()
            result = run_finetune(
                ft_cfg, backbone=backbone, data=cfg.data, run_dir=out / f"finetune-{tag}", seed=cfg.seed
            )
            timings[f"finetune {tag}"] = time.perf_counter() - start
            best = json.loads((out / f"finetune-{tag}" / "best" / "best.json").read_text())["top1"]
            rows[name]["finetune"] = result.eval["top1"]
            rows[name]["finetune_best"] = best

    start = time.perf_counter()
    rows["logistic regression, raw pixels"] = {"probe": logistic_regression(cfg.data), "finetune": None}
    timings["logistic regression"] = time.perf_counter() - start
    report = {
        "rows": rows,
        "seconds": timings,
        "pretrain": summary,
        "pretrain_config": cfg.model_dump(mode="json"),
        "finetune_config": ft_cfg.model_dump(mode="json") if ft_cfg else None,
    }
    write_atomic(out / "results.json", json.dumps(report, indent=1, default=str) + "\n")
    write_atomic(out / "results.md", table(rows) + "\n")
    return report


def table(rows: dict[str, dict[str, float | None]]) -> str:
    def pct(v: float | None) -> str:
        return "—" if v is None else f"{v:.2f} %"

    lines = [
        "| model (shipped MNIST, 1,000 val digits) | linear probe top-1 | fine-tune top-1 (final / best epoch) |",
        "|---|---|---|",
    ]
    for name, r in rows.items():
        ft = pct(r["finetune"]) + (f" / {pct(r['finetune_best'])}" if r.get("finetune_best") is not None else "")
        lines.append(f"| {name} | {pct(r['probe'])} | {ft if r['finetune'] is not None else '—'} |")
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mnist-results", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/mnist-results"), help="output folder")
    parser.add_argument("--pretrain-config", type=Path, default=DEFAULT_CONFIG, help="pretraining (+ probe) recipe")
    parser.add_argument(
        "--finetune-config", type=Path, default=FINETUNE_CONFIG, help="fine-tune recipe (its 'finetune:' section)"
    )
    parser.add_argument("--skip-finetune", action="store_true", help="only the linear probes and the pixel baseline")
    parser.add_argument(
        "--finetune-set",
        action="append",
        default=[],
        metavar="key=value",
        help="fine-tune config override, e.g. --finetune-set trainer.epochs=4 (repeatable)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="pretraining config overrides")
    args = parser.parse_args(argv)
    cfg = load_config(PretrainConfig, args.pretrain_config, args.overrides)
    ft_cfg = None
    if not args.skip_finetune:
        section = yaml.safe_load(args.finetune_config.read_text()).get("finetune", {})
        ft_cfg = FinetuneConfig.model_validate(merge(section, parse_overrides(args.finetune_set)))
    report = results(cfg, ft_cfg, args.out)
    print(table(report["rows"]))
    print(
        f"\n(written to {args.out}/results.md; "
        f"seconds: {json.dumps({k: round(v) for k, v in report['seconds'].items()})})"
    )
    return 0


main = entry_point("mnist-results", run)

if __name__ == "__main__":
    main()

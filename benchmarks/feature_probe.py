"""Which encoder block gives the most linearly separable features? A fast recipe check.

Frozen features of an exported timm backbone on the val and train splits (eval preset, whole
image), average-pooled patch tokens and the class token after every block and after the final
norm, each scored by scikit-learn's logistic regression (standardized, C=1). Cheaper than the
trainer's probe (seconds, no augmentation), so pretraining variants can be compared quickly::

    python -m benchmarks.feature_probe runs/mae-mnist/export/timm data.root=data
"""

from __future__ import annotations

import argparse

import numpy as np
import timm
import torch

from launch.cli import entry_point
from launch.config import merge, parse_overrides
from launch.data import DataConfig, build_loader


@torch.no_grad()
def block_features(model: torch.nn.Module, data: DataConfig, split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """{"b{i}_avg" / "b{i}_cls" / "norm_avg" / "norm_cls": (N, D)} and labels (N,) of ``split``."""
    feats: dict[str, list[np.ndarray]] = {}
    labels = []
    for batch in build_loader(
        data, split, preset="eval", batch_size=500, img_size=model.patch_embed.img_size[0], seed=0
    ):
        x = model.norm_pre(model._pos_embed(model.patch_embed(batch["image"])))
        for name, block in [*((f"b{i}", b) for i, b in enumerate(model.blocks)), ("norm", model.norm)]:
            x = block(x)
            feats.setdefault(f"{name}_avg", []).append(x[:, model.num_prefix_tokens :].mean(1).numpy())
            feats.setdefault(f"{name}_cls", []).append(x[:, 0].numpy())
        labels.append(batch["label"].numpy())
    return {k: np.concatenate(v) for k, v in feats.items()}, np.concatenate(labels)


def run(argv: list[str]) -> int:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    parser = argparse.ArgumentParser(
        prog="feature-probe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("backbone", help="a timm folder written by mae-export (…/export/timm)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="data settings, e.g. data.root=data")
    args = parser.parse_args(argv)
    section = merge(
        {"source": "mnist", "workers": 0, "eval_crop_pct": 1.0}, parse_overrides(args.overrides).get("data", {})
    )
    data = DataConfig.model_validate(section)
    model = timm.create_model(f"local-dir:{args.backbone}", pretrained=True).eval()
    train, y_train = block_features(model, data, "train")
    val, y_val = block_features(model, data, "val")
    print("| features | val top-1 (logistic regression) |\n|---|---|")
    for name in train:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(train[name], y_train)
        print(f"| {name} | {100 * clf.score(val[name], y_val):.1f} % |")
    return 0


main = entry_point("feature-probe", run)

if __name__ == "__main__":
    main()

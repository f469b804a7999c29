"""Shared pieces of the probe and fine-tune tasks: label checks and top-k evaluation sums."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from launch.data import DatasetInfo
from launch.errors import DataError


def num_classes_of(info: DatasetInfo, requested: int | None, key: str) -> int:
    """The class count from the dataset manifest; ``requested`` (a config value) must agree."""
    if info.num_classes < 2:
        raise DataError(
            f"the dataset has {info.num_classes} classes in its dataset.json: a classifier needs labels "
            f"(prepare an ImageFolder with one sub-folder per class)"
        )
    if requested is not None and requested != info.num_classes:
        raise DataError(
            f"{key}={requested} but the dataset manifest lists {info.num_classes} classes: "
            f"remove {key} (it defaults to the manifest) or point data.source at the intended dataset"
        )
    return info.num_classes


def topk_sums(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """logits: (N, K), labels: (N,) -> summed loss, top-1 and top-5 hits, and ``count``
    (the trainer all-reduces the sums and reports each divided by ``count``)."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # (N, k)
    hits = top == labels[:, None]
    return {
        "loss": F.cross_entropy(logits.float(), labels, reduction="sum"),
        "top1": hits[:, 0].float().sum() * 100,
        "top5": hits.any(dim=1).float().sum() * 100,
        "count": torch.tensor(float(labels.shape[0]), device=logits.device),
    }

"""Keep the model fed: loader images/s per worker (``benchmarks.data_loader``) against model demand.

The loader rate comes from the data stack's own benchmark: real JPEG photos (~500 x 375)
written as shards, read by ``launch.data.build_loader`` with the pretrain transforms at
224 px. Demand is the model's train images/s, measured here (the ``presets`` section) or
computed for GPUs (``benchmarks.gpu_table``). Workers needed per GPU (or per process) =
``ceil(LOADER_MARGIN x demand / images-per-s-per-worker)``; on a CPU-only machine the workers
share the cores with the model, so the measured ratio there is an upper bound.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.data_loader import loader_rates, photo_dataset
from benchmarks.gpu_table import LOADER_MARGIN, expected_table
from launch.data import DataConfig

DEFAULT_WORKERS = DataConfig().workers  # DataLoader workers per rank in every default config


def measure_loader(workers: list[int], images: int, batch_size: int, img_size: int) -> list[dict[str, Any]]:
    """Steady-state images/s of the shard loader for each worker count (0 = main process)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = photo_dataset(Path(tmp), images)
        for n in workers:
            per_worker = loader_rates("shards", data, n, batch_size, img_size)[0]
            rows.append({"workers": n, "images_per_s": per_worker * max(n, 1), "images_per_s_per_worker": per_worker})
    return rows


def demand_row(preset: str, where: str, model_ips: float, per_worker: float) -> dict[str, Any]:
    loader_ips = per_worker * DEFAULT_WORKERS
    return {
        "preset": preset,
        "where": where,
        "model_images_per_s": model_ips,
        "default_workers": DEFAULT_WORKERS,
        "loader_images_per_s": loader_ips,
        "ratio": loader_ips / model_ips,
        "workers_needed": math.ceil(LOADER_MARGIN * model_ips / per_worker),
    }


def loader_feed(
    workers: list[int], images: int, batch_size: int, img_size: int, *, model_rows: list[dict[str, Any]] | None
) -> dict[str, Any]:
    """Loader rates, and loader / model ratio at the default worker count for measured and computed demand."""
    rows = measure_loader(workers, images, batch_size, img_size)
    one = [r["images_per_s_per_worker"] for r in rows if r["workers"] == 1]
    per_worker = one[0] if one else max(r["images_per_s_per_worker"] for r in rows)
    demand = [
        demand_row(r["preset"], f"measured ({r['settings']})", r["images_per_s"], per_worker) for r in model_rows or []
    ]
    demand += [
        demand_row(r["preset"], f"{r['gpu']} (computed)", r["expected_images_per_s"], per_worker)
        for r in expected_table(per_worker)
    ]
    return {
        "images": images,
        "img_size": img_size,
        "batch_size": batch_size,
        "rows": rows,
        "per_worker_images_per_s": per_worker,
        "target_ratio": LOADER_MARGIN,
        "demand": demand,
    }

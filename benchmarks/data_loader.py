"""Loader throughput: this repo's shard loader vs a plain PIL + torchvision ImageFolder pipeline.

Both read the same JPEGs (≈500x375 crops of the real photos shipped with scikit-image and
scikit-learn) and make MAE pretraining crops (RandomResizedCrop 224, scale 0.2-1, bicubic,
flip, normalize) in DataLoader worker processes. Three figures per pipeline, all in the steady
state (second pass, persistent workers):

- images/s per worker: wall clock with ``workers`` workers, divided by ``workers``;
- images per worker CPU-second: the same pass timed by the CPU time (user + system) of the
  worker processes, which, unlike wall time, hardly moves when other jobs share the machine;
- images per CPU-second, all: worker and main-process CPU time together (the main process
  receives every batch and, with ``data.normalize=device`` on a CPU-only machine, normalizes it);
- images per CPU-second in-process: the pipeline run in the main process on one thread.

Pipelines: this loader with the default ``data.normalize=worker``, the same with
``data.normalize=device`` (uint8 hand-over; the "device" is the CPU here), and the official MAE
input pipeline (PIL + torchvision ``ImageFolder`` + ``DataLoader``).

Runs alternate between the pipelines and the best of ``repeats`` is kept.

    python -m benchmarks.data_loader [--images 512] [--workers 1] [--out bench-data-loader.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from PIL import Image

from launch.fileio import write_atomic

PHOTO_SIZE = (375, 500)  # (H, W): the median ImageNet training image


def real_photos() -> list[np.ndarray]:
    """RGB photos of at least 375x500 shipped with scikit-image and scikit-learn: (H, W, 3) uint8."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    names = ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
    photos = [getattr(skimage.data, n)() for n in names] + list(load_sample_images().images)
    return [p for p in photos if p.shape[0] >= PHOTO_SIZE[0] and p.shape[1] >= PHOTO_SIZE[1]]


def shipped_photos(min_side: int) -> dict[str, np.ndarray]:
    """Every image of scikit-image's data folder and scikit-learn's sample photos whose shorter
    side is at least ``min_side``, as RGB: name -> (H, W, 3) uint8 (grayscale replicated, alpha dropped)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = {}
    for path in sorted(Path(skimage.data.data_dir).iterdir()):
        try:
            with Image.open(path) as image:
                photos[path.stem] = np.asarray(image.convert("RGB"))
        except OSError:  # not an image (registry, cascade XML, arrays)
            continue
    sample = load_sample_images()
    photos |= {Path(name).stem: image for name, image in zip(sample.filenames, sample.images)}
    return {name: p for name, p in photos.items() if min(p.shape[:2]) >= min_side}


def write_photo_folder(
    root: Path,
    images: int,
    seed: int = 0,
    *,
    photos: list[np.ndarray] | None = None,
    size: tuple[int, int] = PHOTO_SIZE,
    jitter: float = 0.0,
) -> Path:
    """``root/photo<k>/<i>.jpg``: random crops of ``photos`` (default ``real_photos()``; image ``i``
    from photo ``i % len(photos)``) saved as JPEG quality 90. Crops are ``size`` (H, W), each side
    scaled by a random factor in [1 - jitter, 1 + jitter] and capped by the photo (ImageNet-like)."""
    rng = np.random.default_rng(seed)
    photos = real_photos() if photos is None else photos
    for i in range(images):
        k = i % len(photos)
        photo = photos[k]
        h, w = (min(photo.shape[d], round(size[d] * rng.uniform(1 - jitter, 1 + jitter))) for d in (0, 1))
        y = rng.integers(0, photo.shape[0] - h + 1)
        x = rng.integers(0, photo.shape[1] - w + 1)
        (root / f"photo{k}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[y : y + h, x : x + w]).save(root / f"photo{k}" / f"{i:05d}.jpg", quality=90)
    return root


def _cpu_seconds() -> tuple[float, float]:
    """User + system CPU time of (this process, its live child processes: the DataLoader workers)."""
    totals = []
    for procs in ([me := psutil.Process()], me.children(recursive=True)):
        totals.append(0.0)
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                totals[-1] += times.user + times.system
    return totals[0], totals[1]


def _steady_pass(loader: Iterable[Any]) -> tuple[float, float, float]:
    """(wall, main-process CPU, worker CPU) seconds of the second pass over ``loader`` (the first one
    starts the persistent workers)."""
    for _ in loader:
        pass
    (main, workers), wall = _cpu_seconds(), time.perf_counter()
    for _ in loader:
        pass
    wall, (main_end, workers_end) = time.perf_counter() - wall, _cpu_seconds()
    return wall, main_end - main, workers_end - workers


def shard_loader(
    shards: Path, workers: int, batch_size: int, img_size: int, normalize: str = "worker"
) -> Iterable[Any]:
    """This repo's loader, MAE pretraining preset; ``normalize`` "device" normalizes in the main process here."""
    from launch.data import DataConfig, build_loader

    cfg = DataConfig(
        source=str(shards), workers=workers, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), normalize=normalize
    )
    return build_loader(cfg, "train", preset="pretrain", batch_size=batch_size, img_size=img_size, seed=0, device="cpu")


def pil_loader(folder: Path, workers: int, batch_size: int, img_size: int) -> Iterable[Any]:
    """The official MAE pretraining input pipeline: PIL decode + torchvision (v1) transforms."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(
                img_size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    return DataLoader(
        datasets.ImageFolder(str(folder), transform=tf),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def photo_dataset(root: Path, images: int) -> tuple[Path, Path]:
    """The same JPEGs as an ImageFolder (``root/photos``) and as shards (``root/shards``)."""
    from launch.data.prepare import prepare

    folder = write_photo_folder(root / "photos", images)
    return folder, prepare(str(folder), root / "shards", shard_samples=128).parent


def loader_rates(
    pipeline: str, data: tuple[Path, Path], workers: int, batch_size: int = 64, img_size: int = 224
) -> tuple[float, float, float]:
    """Steady-state (images/s per worker, images per worker CPU-second, images per CPU-second of all
    processes) of a pipeline of ``PIPELINES``; ``workers`` 0 reads in this process, on one thread."""
    folder, shards = data
    images = sum(1 for _ in folder.rglob("*.jpg"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if workers == 0 else threads)  # workers run one thread each (DataLoader's doing)
    try:
        normalize = "device" if pipeline == "shards-device" else "worker"
        loader = (
            pil_loader(folder, workers, batch_size, img_size)
            if pipeline == "pil"
            else shard_loader(shards, workers, batch_size, img_size, normalize)
        )
        wall, main, worker = _steady_pass(loader)
    finally:
        torch.set_num_threads(threads)
    # CPU time comes in scheduler ticks (10 ms): a pass shorter than a tick must not divide by zero
    tick = 0.01
    return images / wall / max(workers, 1), images / max(worker or main, tick), images / max(main + worker, tick)


PIPELINES = {
    "shards": "shards, normalize in workers",
    "shards-device": "shards, normalize on device (*)",
    "pil": "PIL + torchvision ImageFolder",
}
COLUMNS = ("images_per_s_per_worker", "images_per_worker_cpu_s", "images_per_cpu_s_all", "images_per_cpu_s")


def run_benchmark(
    images: int = 512,
    workers: int = 1,
    batch_size: int = 64,
    img_size: int = 224,
    repeats: int = 3,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Best of ``repeats`` of every figure of every pipeline on the same JPEGs, runs alternating."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        data = photo_dataset(Path(tmp), images)
        jpeg_kb = sum(p.stat().st_size for p in data[0].rglob("*.jpg")) / images / 1024
        load = [os.getloadavg()[0]]
        best: dict[str, dict[str, float]] = {column: {} for column in COLUMNS}
        for _ in range(repeats):
            for pipeline in PIPELINES:
                rates = (
                    *loader_rates(pipeline, data, workers, batch_size, img_size),
                    loader_rates(pipeline, data, 0, batch_size, img_size)[2],
                )
                for column, rate in zip(COLUMNS, rates):
                    best[column][pipeline] = max(best[column].get(pipeline, 0.0), rate)
                load.append(os.getloadavg()[0])
    return {
        "images": images,
        "photo_size": list(PHOTO_SIZE),
        "jpeg_kb": round(jpeg_kb, 1),
        "img_size": img_size,
        "batch_size": batch_size,
        "workers": workers,
        "repeats": repeats,
        "pipelines": PIPELINES,
        **{column: {k: round(v, 1) for k, v in rates.items()} for column, rates in best.items()},
        "speedup_vs_pil": {
            column: {k: round(v / rates["pil"], 2) for k, v in rates.items() if k != "pil"}
            for column, rates in best.items()
        },
        "load_average": [round(min(load), 1), round(max(load), 1)],
        "cpu": _cpu_name(),
        "torch": torch.__version__,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def format_table(result: dict[str, Any]) -> str:
    heads = ("per worker, img/s", "per worker CPU-s", "per CPU-s, all", "per CPU-s, in-process")
    widths = (18, 17, 16, 22)
    rows = [f"{'pipeline':<34}" + "".join(f" {h:>{w}}" for h, w in zip(heads, widths))]
    for key, name in result["pipelines"].items():
        rows.append(f"{name:<34}" + "".join(f" {result[c][key]:>{w}.1f}" for c, w in zip(COLUMNS, widths)))
    for key in result["pipelines"]:
        if key != "pil":
            ratios = [result["speedup_vs_pil"][c][key] for c in COLUMNS]
            rows.append(f"{'  speedup: ' + key:<34}" + "".join(f" {r:>{w - 1}.2f}x" for r, w in zip(ratios, widths)))
    rows.append(
        f"({result['images']} JPEGs {result['photo_size'][1]}x{result['photo_size'][0]}, ~{result['jpeg_kb']} KB "
        f"-> {result['img_size']} crops, batch {result['batch_size']}, {result['workers']} worker(s), best of "
        f"{result['repeats']}; {result['cpu']}, load average {result['load_average'][0]}-"
        f"{result['load_average'][1]})"
    )
    rows.append(
        "(*) workers hand over uint8 and the main process normalizes: on a GPU that is a kernel on the device; "
        "on this CPU-only machine it runs on the CPU, counted in 'all' and 'in-process'"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.data_loader",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-data-loader.json"))
    args = parser.parse_args(argv)
    result = run_benchmark(args.images, args.workers, args.batch_size, repeats=args.repeats)
    print(format_table(result))
    write_atomic(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

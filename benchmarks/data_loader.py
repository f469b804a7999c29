"""Loader throughput: this repo's shard loader vs a plain PIL + torchvision ImageFolder pipeline.

Both read the same JPEGs (≈500x375 crops of the real photos shipped with scikit-image and
scikit-learn) and make MAE pretraining crops (RandomResizedCrop 224, scale 0.2-1, bicubic,
flip, normalize) in DataLoader worker processes; the figure is images/s per worker, in the
steady state (second pass, persistent workers), and images per CPU-second of one core
(the pipeline run in-process on one thread, timed by process time, which a busy shared
machine does not distort). Runs alternate and the best of ``repeats`` is kept.

    python -m benchmarks.data_loader [--images 512] [--workers 1] [--out bench-data-loader.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

PHOTO_SIZE = (375, 500)  # (H, W): the median ImageNet training image


def real_photos() -> list[np.ndarray]:
    """RGB photos of at least 375x500 shipped with scikit-image and scikit-learn: (H, W, 3) uint8."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    names = ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
    photos = [getattr(skimage.data, n)() for n in names] + list(load_sample_images().images)
    return [p for p in photos if p.shape[0] >= PHOTO_SIZE[0] and p.shape[1] >= PHOTO_SIZE[1]]


def write_photo_folder(root: Path, images: int, seed: int = 0) -> Path:
    """``root/<photo>/<i>.jpg``: random 500x375 crops saved as JPEG quality 90 (ImageNet-like)."""
    rng = np.random.default_rng(seed)
    photos = real_photos()
    for i in range(images):
        k = i % len(photos)
        photo = photos[k]
        y = rng.integers(0, photo.shape[0] - PHOTO_SIZE[0] + 1)
        x = rng.integers(0, photo.shape[1] - PHOTO_SIZE[1] + 1)
        (root / f"photo{k}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[y:y + PHOTO_SIZE[0], x:x + PHOTO_SIZE[1]]).save(root / f"photo{k}" / f"{i:05d}.jpg", quality=90)
    return root


def _steady_rate(loader: Iterable[Any], images: int, clock: Any = time.perf_counter) -> float:
    """images/s of the second pass over ``loader`` (the first one starts the workers)."""
    for _ in loader:
        pass
    start = clock()
    for _ in loader:
        pass
    return images / (clock() - start)


def shard_loader(shards: Path, workers: int, batch_size: int, img_size: int) -> Iterable[Any]:
    from launch.data import DataConfig, build_loader

    cfg = DataConfig(source=str(shards), workers=workers, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    return build_loader(cfg, "train", preset="pretrain", batch_size=batch_size, img_size=img_size, seed=0)


def pil_loader(folder: Path, workers: int, batch_size: int, img_size: int) -> Iterable[Any]:
    """The official MAE pretraining input pipeline: PIL decode + torchvision (v1) transforms."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    return DataLoader(datasets.ImageFolder(str(folder), transform=tf), batch_size=batch_size, shuffle=True,
                      num_workers=workers, persistent_workers=workers > 0)


def photo_dataset(root: Path, images: int) -> tuple[Path, Path]:
    """The same JPEGs as an ImageFolder (``root/photos``) and as shards (``root/shards``)."""
    from launch.data.prepare import prepare

    folder = write_photo_folder(root / "photos", images)
    return folder, prepare(str(folder), root / "shards", shard_samples=128).parent


def loader_rate(pipeline: str, data: tuple[Path, Path], workers: int, batch_size: int = 64,
                img_size: int = 224) -> float:
    """Steady-state images/s per worker (per process when ``workers`` is 0) of "shards" or "pil"."""
    folder, shards = data
    images = sum(1 for _ in folder.rglob("*.jpg"))
    loader = (shard_loader(shards, workers, batch_size, img_size) if pipeline == "shards"
              else pil_loader(folder, workers, batch_size, img_size))
    return _steady_rate(loader, images) / max(workers, 1)


def loader_cpu_rate(pipeline: str, data: tuple[Path, Path], batch_size: int = 64, img_size: int = 224) -> float:
    """Images per CPU-second of one core: the whole pipeline in this process on one thread, timed by
    ``time.process_time`` -- unlike wall time, this does not drop when other jobs share the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder, shards = data
        images = sum(1 for _ in folder.rglob("*.jpg"))
        loader = (shard_loader(shards, 0, batch_size, img_size) if pipeline == "shards"
                  else pil_loader(folder, 0, batch_size, img_size))
        return _steady_rate(loader, images, clock=time.process_time)
    finally:
        torch.set_num_threads(threads)


def run_benchmark(images: int = 512, workers: int = 1, batch_size: int = 64, img_size: int = 224,
                  repeats: int = 3, workdir: Path | None = None) -> dict[str, Any]:
    """Best-of-``repeats`` images/s per worker of both pipelines on the same JPEGs, runs alternating."""
    names = {"shards": "shards + torchvision.io + v2", "pil": "PIL + torchvision ImageFolder"}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        data = photo_dataset(Path(tmp), images)
        jpeg_kb = sum(p.stat().st_size for p in data[0].rglob("*.jpg")) / images / 1024
        wall = {name: 0.0 for name in names.values()}
        cpu = dict(wall)
        for _ in range(repeats):
            for pipeline, name in names.items():
                wall[name] = max(wall[name], loader_rate(pipeline, data, workers, batch_size, img_size))
                cpu[name] = max(cpu[name], loader_cpu_rate(pipeline, data, batch_size, img_size))
    return {"images": images, "photo_size": list(PHOTO_SIZE), "jpeg_kb": round(jpeg_kb, 1), "img_size": img_size,
            "batch_size": batch_size, "workers": workers, "repeats": repeats,
            "images_per_s_per_worker": {k: round(v, 1) for k, v in wall.items()},
            "images_per_cpu_s": {k: round(v, 1) for k, v in cpu.items()},
            "speedup_wall": round(_ratio(wall), 2), "speedup_cpu": round(_ratio(cpu), 2),
            "load_average": [round(x, 1) for x in os.getloadavg()], "cpu": _cpu_name(), "torch": torch.__version__}


def _ratio(rates: dict[str, float]) -> float:
    ours, baseline = rates.values()
    return ours / baseline


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def format_table(result: dict[str, Any]) -> str:
    wall, cpu = result["images_per_s_per_worker"], result["images_per_cpu_s"]
    rows = [f"{'pipeline':<32} {'images/s per worker':>20} {'images per CPU-second':>22}"]
    rows += [f"{name:<32} {wall[name]:>20.1f} {cpu[name]:>22.1f}" for name in wall]
    rows.append(f"{'speedup':<32} {result['speedup_wall']:>19.2f}x {result['speedup_cpu']:>21.2f}x")
    rows.append(f"({result['images']} JPEGs {result['photo_size'][1]}x{result['photo_size'][0]}, ~{result['jpeg_kb']} KB "
                f"-> {result['img_size']} crops, batch {result['batch_size']}, {result['workers']} worker(s), best of "
                f"{result['repeats']}; {result['cpu']}, load average {result['load_average'][0]})")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_loader", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-data-loader.json"))
    args = parser.parse_args(argv)
    result = run_benchmark(args.images, args.workers, args.batch_size, repeats=args.repeats)
    print(format_table(result))
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``mae-prepare``: turn a built-in source or an image folder into WebDataset shards.

    mae-prepare mnist --out data/mnist
    mae-prepare /datasets/imagenet --out /shards/imagenet --workers 16 --shard-bytes 500000000

Output: ``<split>-%06d.tar`` files and ``dataset.json`` (splits, samples per shard,
classes, image size, channels, per-channel mean/std measured on a sample). Everything is
written to a hidden temporary folder that is renamed to ``--out`` at the end, with the
manifest written last, so a half-written dataset can never be taken for a complete one.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import random
import shutil
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_image, encode_jpeg

from launch.cli import entry_point
from launch.data.shards import plural
from launch.data.sources import BUILTINS, Source, image_folder
from launch.data.writer import INDEX_SUFFIX, MANIFEST, Item, publish, temp_dir_for, write_manifest, write_split
from launch.errors import DataError

log = logging.getLogger(__name__)
STATS_SAMPLES = 2000


def load_source(source: str, seed: int = 0) -> Source:
    return BUILTINS[source](seed) if source in BUILTINS else image_folder(Path(source))


def _decode(data: bytes, mode: ImageReadMode = ImageReadMode.UNCHANGED) -> torch.Tensor:
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)


def _shapes(items: list[Item]) -> list[tuple[Item, tuple[int, ...]]]:
    """(item, (C, H, W)) of each decodable item; undecodable ones are reported and left out of the stats."""
    shapes = []
    for item in items:
        try:
            shapes.append((item, tuple(_decode(item.read()).shape)))
        except (RuntimeError, ValueError):
            log.warning(
                "undecodable image %s: left out of the statistics (the loader skips it too)", item.path or item.key
            )
    if not shapes:
        raise DataError(f"none of the {len(items)} images sampled for statistics can be decoded")
    return shapes


def measure(items: list[Item], channels: int | None, seed: int = 0) -> dict[str, Any]:
    """Channels, median (H, W), and per-channel mean/std in [0, 1] over up to STATS_SAMPLES images."""
    shapes = _shapes(random.Random(seed).sample(items, min(len(items), STATS_SAMPLES)))
    found = Counter(1 if shape[0] in (1, 2) else 3 for _, shape in shapes)
    if channels is None and len(found) > 1:
        raise DataError(
            f"inconsistent channels: {found[1]} grayscale and {found[3]} color images among {len(shapes)} "
            "sampled; pass --channels 1 or 3 to convert every image on read"
        )
    channels = channels or next(iter(found))
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    total = torch.zeros(channels, dtype=torch.float64)
    square = torch.zeros(channels, dtype=torch.float64)
    pixels = 0
    for item, _ in shapes:
        x = _decode(item.read(), mode).double().div_(255).flatten(1)  # (C, H*W)
        total += x.sum(1)
        square += x.square().sum(1)
        pixels += x.shape[1]
    mean = total / pixels
    std = (square / pixels - mean.square()).clamp_min(0).sqrt()
    heights = sorted(shape[1] for _, shape in shapes)
    widths = sorted(shape[2] for _, shape in shapes)
    return {
        "channels": channels,
        "img_size": [heights[len(heights) // 2], widths[len(widths) // 2]],
        "img_size_min": [heights[0], widths[0]],
        "img_size_max": [heights[-1], widths[-1]],
        "mean": [round(v, 6) for v in mean.tolist()],
        "std": [round(v, 6) for v in std.tolist()],
    }


def reencode(data: bytes, channels: int) -> tuple[str, bytes]:
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    return "jpg", encode_jpeg(_decode(data, mode), quality=95).numpy().tobytes()


def prepare(
    source: str,
    out: str | Path,
    *,
    overwrite: bool = False,
    shard_samples: int = 1000,
    shard_bytes: int = 512 << 20,
    workers: int = 1,
    reencode_images: bool = False,
    channels: int | None = None,
    seed: int = 0,
) -> Path:
    """Write ``source`` as shards under ``out``; returns the manifest path. Never touches an existing
    ``out`` unless ``overwrite``; if another process publishes ``out`` first, its dataset is kept."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise DataError(f"output folder exists: {out} (pass --overwrite to replace it)")
    if shard_samples < 1 or shard_bytes < 1 or workers < 1:
        raise DataError(
            f"--shard-samples, --shard-bytes and --workers must be >= 1 (got {shard_samples}, {shard_bytes}, {workers})"
        )
    src = load_source(source, seed)
    stats = measure(src.splits["train"], channels, seed)
    transcode = functools.partial(reencode, channels=stats["channels"]) if reencode_images else None
    tmp = temp_dir_for(out)
    try:
        splits = {}
        for split, items in src.splits.items():
            names, counts = write_split(
                tmp,
                split,
                items,
                max_samples=shard_samples,
                max_bytes=shard_bytes,
                workers=workers,
                transcode=transcode,
            )
            splits[split] = {"shards": names, "samples": counts, "num_samples": sum(counts)}
        write_manifest(tmp, _manifest(src, splits, stats, seed))  # last: its presence marks a complete dataset
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not publish(tmp, out, overwrite):
        log.info("%s was prepared by another process meanwhile; using that one", out)
    return out / MANIFEST


def _manifest(src: Source, splits: dict[str, Any], stats: dict[str, Any], seed: int) -> dict[str, Any]:
    return {
        "format": "webdataset",
        "version": 1,
        "source": src.name,
        "notes": src.notes,
        "seed": seed,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "num_classes": len(src.classes),
        "classes": src.classes,
        **stats,
        "splits": splits,
        "index_suffix": INDEX_SUFFIX,
    }


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.source not in BUILTINS and not Path(args.source).is_dir():
        raise DataError(f"unknown source '{args.source}': use {', '.join(BUILTINS)} or an image folder")
    out = args.out or Path("data") / (args.source if args.source in BUILTINS else Path(args.source).resolve().name)
    manifest = prepare(
        args.source,
        out,
        overwrite=args.overwrite,
        shard_samples=args.shard_samples,
        shard_bytes=args.shard_bytes,
        workers=args.workers,
        reencode_images=args.reencode,
        channels=args.channels,
    )
    info = json.loads(manifest.read_text())
    sizes = ", ".join(
        f"{k} {v['num_samples']} in {plural(len(v['shards']), 'shard')}" for k, v in info["splits"].items()
    )
    print(f"{manifest}: {sizes}; {info['num_classes']} classes, {info['channels']} channels")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mae-prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("source", help=f"built-in source ({', '.join(BUILTINS)}) or an image folder")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: data/<source name>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--shard-samples", type=int, default=1000, help="max samples per shard")
    p.add_argument("--shard-bytes", type=int, default=512 << 20, help="max bytes per shard")
    p.add_argument("--workers", type=int, default=1, help="shard-writer processes")
    p.add_argument("--reencode", action="store_true", help="re-encode every image as JPEG (quality 95)")
    p.add_argument(
        "--channels", type=int, choices=(1, 3), default=None, help="force grayscale or RGB (default: detect)"
    )
    return p


main = entry_point("mae-prepare", run)

if __name__ == "__main__":
    raise SystemExit(main())

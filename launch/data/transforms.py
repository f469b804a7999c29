"""Decode (torchvision.io) and augment (on uint8 tensors) one sample.

Presets (normalization with the dataset mean/std always comes last):
- ``pretrain`` (MAE): RandomResizedCrop(img_size, scale=crop_scale, bicubic) + horizontal flip + normalize,
  torchvision's crop sampling with torch's uint8 antialiased resize (``RandomResizedCropFlip``).
- ``eval``: resize the short side to ``img_size / eval_crop_pct`` + center crop + normalize.
- ``finetune``: timm's own ``create_transform(is_training=True)`` (RandomResizedCrop 0.08-1, flip,
  RandAugment ``auto_augment``, RandomErasing ``re_prob``), fed a PIL view of the decoded tensor,
  because timm's RandAugment operates on PIL images.

Every sample's randomness comes from its own seed, so an augmented sample depends only on
(seed, epoch, position in the epoch's global order) in exact mode -- so not on the world size --
and never on what the worker did before. ``pretrain`` draws its
crop and flip from a ``random.Random(seed)`` of its own; ``finetune`` seeds the global RNGs timm
draws from (``seeded``).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.nn.functional import interpolate
from torch.utils.data import get_worker_info
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from launch.data.config import DataConfig
from launch.errors import ConfigError

PRESETS = ("pretrain", "eval", "finetune")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
Transform = Callable[[torch.Tensor, int], torch.Tensor]  # (uint8 (C, H, W), seed) -> (C, img_size, img_size)
JPEG_MAGIC = b"\xff\xd8\xff"
_DECODE_JPEG = torch.ops.image.decode_jpeg  # registered when torchvision.io is imported (above)


def decode(data: bytes, channels: int) -> torch.Tensor:
    """Encoded JPEG/PNG/WebP bytes -> uint8 (C, H, W), converted to ``channels``; raises on bad bytes."""
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if data[:3] == JPEG_MAGIC:
        # the op behind torchvision.io.decode_jpeg: no format sniffing, logging or deprecation warning per
        # call (~10 % of decode_image's time on 500x375 photos); exif orientation ignored, as decode_image does
        return _DECODE_JPEG(encoded, mode.value, False)
    return decode_image(encoded, mode=mode)


class Preset(NamedTuple):
    sample: Transform  # one image, with its seed; contiguous output
    batch: Callable[[list[torch.Tensor]], torch.Tensor]  # B samples -> float32 (B, C, img_size, img_size), normalized
    stack: Callable[[list[torch.Tensor]], torch.Tensor]  # B samples -> (B, C, img_size, img_size) as they are (uint8)
    normalize: Callable[[torch.Tensor], torch.Tensor]  # a ``stack`` batch, on any device -> what ``batch`` gives


def build_transform(
    cfg: DataConfig, preset: str, img_size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> Preset:
    """Per-sample augmentation, then batch assembly. pretrain / eval stay uint8 per sample and are
    normalized while the batch is assembled, straight into shared memory (``batch``), or later on the
    training device (``stack`` in the worker, ``normalize`` on the device)."""
    interp = v2.InterpolationMode.BICUBIC if cfg.interpolation == "bicubic" else v2.InterpolationMode.BILINEAR
    if preset == "pretrain":
        norm = _Normalize(mean, std)
        return Preset(RandomResizedCropFlip(img_size, cfg.crop_scale, interp, cfg.hflip), norm, _stack, norm.on_device)
    if preset == "eval":
        norm = _Normalize(mean, std)
        resize = v2.Resize(math.floor(img_size / cfg.eval_crop_pct), interpolation=interp, antialias=True)
        return Preset(_Fixed(v2.Compose([resize, v2.CenterCrop(img_size)])), norm, _stack, norm.on_device)
    if preset == "finetune":  # timm's transform ends with its own normalize (RandomErasing works on normalized pixels)
        return Preset(_TimmTrainTransform(cfg, img_size, mean, std), _stack, _stack, _as_is)
    raise ConfigError(f"unknown preset '{preset}' (allowed: {', '.join(PRESETS)})")


def _batch_buffer(images: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, C, H, W) of ``dtype`` to fill. In a worker it is allocated in shared memory, as torch's
    default_collate does, so the batch reaches the main process without a copy (``share_memory_()``
    would allocate twice and copy)."""
    shape = (len(images), *images[0].shape)
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(images, out=_batch_buffer(images, images[0].dtype))


def _as_is(images: torch.Tensor) -> torch.Tensor:
    return images


class _Normalize:
    """uint8 images (C, H, W) -> float32 (B, C, H, W) with (x / 255 - mean) / std, one image at a time
    while it is in cache (a uint8 batch stack would be one more 9.6 MB allocation per 64 crops)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.shift = torch.tensor(mean).mul(255).view(-1, 1, 1)
        self.scale = torch.tensor(std).mul(255).reciprocal().view(-1, 1, 1)
        self.moved: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        out = _batch_buffer(images)
        for row, image in zip(out, images):
            row.copy_(image).sub_(self.shift).mul_(self.scale)
        return out

    def on_device(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) on any device -> float32 (B, C, H, W), the same operations as ``__call__``."""
        if images.device not in self.moved:
            self.moved[images.device] = (self.shift.to(images.device), self.scale.to(images.device))
        shift, scale = self.moved[images.device]
        return images.float().sub_(shift).mul_(scale)


class RandomResizedCropFlip:
    """MAE's ``RandomResizedCrop(size, scale, ratio=(3/4, 4/3))`` + ``RandomHorizontalFlip(hflip)`` on a
    uint8 (C, H, W) image, with torchvision's sampling (10 tries of a uniform area fraction and a
    log-uniform aspect ratio, else a center crop clamped to the ratio range) drawn from
    ``random.Random(seed)``. A v2 Compose spent ~60-90 us per image on dispatch and one-element
    torch ops; this spends ~10. Output: contiguous uint8 (C, size, size)."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float],
        interpolation: v2.InterpolationMode,
        hflip: float,
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        self.size, self.scale, self.ratio, self.hflip = size, scale, ratio, hflip
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.mode = interpolation.value  # "bicubic" / "bilinear", as torch's interpolate names them

    def box(self, rng: random.Random, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, h, w) of the crop, as ``v2.RandomResizedCrop.make_params`` draws it."""
        area = height * width
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self.log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        w, h = width, height
        if width / height < self.ratio[0]:
            h = round(w / self.ratio[0])
        elif width / height > self.ratio[1]:
            w = round(h * self.ratio[1])
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        rng = random.Random(seed)
        top, left, h, w = self.box(rng, image.shape[-2], image.shape[-1])
        # uint8 in, uint8 out: torch's antialiased bicubic/bilinear has a native uint8 CPU kernel; a
        # (1, C, h, w) view of the decoder's HWC buffer gives a contiguous CHW result at no extra copy
        out = interpolate(
            image[None, :, top : top + h, left : left + w],
            size=(self.size, self.size),
            mode=self.mode,
            align_corners=False,
            antialias=True,
        )[0]
        return out.flip(-1) if rng.random() < self.hflip else out


class _Fixed:
    """A deterministic v2 transform in the (image, seed) form; contiguous output for ``_Normalize``."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        return self.transform(image).contiguous()


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
        self.timm_tf = create_transform(
            input_size=(len(mean), img_size, img_size),
            is_training=True,
            scale=cfg.finetune_crop_scale,
            hflip=cfg.hflip,
            color_jitter=None,
            auto_augment=cfg.auto_augment,
            interpolation=cfg.interpolation,
            re_prob=cfg.re_prob,
            re_mode="pixel",
            re_count=1,
            mean=mean,
            std=std,
        )
        for t in self.timm_tf.transforms:
            for op in t.ops if isinstance(t, RandAugment) else []:
                op.aug_fn = _posterize_any if op.aug_fn is posterize else op.aug_fn

    def __call__(self, img: torch.Tensor, seed: int) -> torch.Tensor:
        with seeded(seed, restore=get_worker_info() is None):
            return self.timm_tf(F.to_pil_image(img))


@contextlib.contextmanager
def seeded(seed: int, restore: bool) -> Iterator[None]:
    """Seed the global RNGs timm draws from (torch CPU, ``random``, numpy). ``restore`` puts the
    previous states back, for reading in the main process, whose RNGs belong to the trainer."""
    saved = (torch.get_rng_state(), random.getstate(), np.random.get_state()) if restore else None
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    try:
        yield
    finally:
        if saved is not None:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])

"""Per-sample transforms: the MAE crop follows torchvision's sampling and pixels, JPEG decoding,
and normalization on the device gives the same batches as normalization in the workers."""

from __future__ import annotations

import io
import math
import random
from pathlib import Path

import pytest
import skimage.data
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from launch.data import DataConfig, build_loader
from launch.data.prepare import prepare
from launch.data.transforms import RandomResizedCropFlip, decode

BICUBIC = v2.InterpolationMode.BICUBIC


def _jpeg(array, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_fast_path_decodes_like_decode_image(channels: int) -> None:
    data = _jpeg(skimage.data.astronaut()[:300, :400])
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    expected = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    assert torch.equal(decode(data, channels), expected) and expected.shape == (channels, 300, 400)


@pytest.mark.parametrize("size", [(375, 500), (500, 120), (64, 64)])  # (500, 120): ratio outside 3/4-4/3 -> fallbacks
def test_crop_boxes_follow_torchvision_sampling(size: tuple[int, int]) -> None:
    height, width = size
    ours = RandomResizedCropFlip(32, (0.2, 1.0), BICUBIC, 0.5)
    theirs = v2.RandomResizedCrop(32, scale=(0.2, 1.0), interpolation=BICUBIC)
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    torch.manual_seed(0)
    boxes = {
        "ours": [ours.box(random.Random(seed), height, width) for seed in range(3000)],
        "torchvision": [tuple(theirs.make_params([image]).values()) for _ in range(3000)],
    }
    for top, left, h, w in boxes["ours"]:
        assert 0 <= top <= height - h and 0 <= left <= width - w and h > 0 and w > 0
    for stat in (lambda b: b[2] * b[3] / (height * width), lambda b: math.log(b[3] / b[2]), lambda b: b[0] / height):
        means = [sum(map(stat, boxes[k])) / 3000 for k in boxes]
        assert abs(means[0] - means[1]) < 0.03, means  # the std error of each mean is < 0.01


def test_crop_pixels_equal_torchvision_resized_crop_and_flip() -> None:
    image = decode(_jpeg(skimage.data.astronaut()[:375, :500]), 3)
    crop = RandomResizedCropFlip(224, (0.2, 1.0), BICUBIC, 0.5)
    flips = 0
    for seed in range(8):
        rng = random.Random(seed)
        box = crop.box(rng, 375, 500)
        flip = rng.random() < 0.5
        expected = F.resized_crop(image, *box, [224, 224], interpolation=BICUBIC, antialias=True)
        out = crop(image, seed)
        assert out.is_contiguous() and out.dtype == torch.uint8
        assert torch.equal(out, F.horizontal_flip(expected) if flip else expected)
        flips += flip
    assert 0 < flips < 8


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("transforms") / "digits"
    prepare("digits", out, shard_samples=100)
    return out


@pytest.mark.parametrize("preset", ["pretrain", "eval", "finetune"])
def test_normalizing_on_the_device_gives_the_worker_batches(digits: Path, preset: str) -> None:
    def batches(normalize: str, workers: int) -> list[dict]:
        cfg = DataConfig(source=str(digits), workers=workers, shuffle_buffer=20, normalize=normalize)
        loader = build_loader(cfg, "val", preset=preset, batch_size=64, img_size=16, seed=1, device="cpu")
        return list(loader)

    for workers in (2, 0):  # the sample order depends on the worker count, not on where normalization runs
        worker, device = batches("worker", workers), batches("device", workers)
        assert len(worker) == len(device) == 5
        for a, b in zip(worker, device):
            assert a["key"] == b["key"] and b["image"].dtype == torch.float32
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_normalize_auto_hands_uint8_to_a_gpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from launch.data.loader import normalize_where

    cpu = DataConfig(source="mnist", workers=2)
    assert cpu.normalize == "auto" and normalize_where(cpu) == "worker"  # no CUDA here: the workers normalize
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert normalize_where(cpu) == "device"
    assert normalize_where(cpu.model_copy(update={"workers": 0})) == "worker"  # no workers to relieve
    assert normalize_where(cpu.model_copy(update={"normalize": "worker"})) == "worker"

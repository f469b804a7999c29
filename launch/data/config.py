"""``DataConfig``: where the shards come from and how they are read and augmented."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from launch.config import Schema

BUILTIN_SOURCES = ("mnist", "digits")


class DataConfig(Schema):
    """Data section of every stage; the defaults read the shipped MNIST with no setting at all."""

    source: str | list[str] = Field(
        "mnist",
        description="'mnist' / 'digits' (built in, prepared under root on first use), a dataset folder or its "
        "dataset.json, or shard specs (brace pattern, folder, http(s):// URL, 'pipe:' command; '{split}' is "
        "replaced by the split name); a list concatenates several",
    )
    root: str = Field(
        "data", description="folder (relative to the working directory) holding prepared built-in sources"
    )
    mode: Literal["exact", "resampled"] = Field(
        "exact",
        description="exact: every sample once per epoch; resampled: shards drawn with replacement, fixed epoch length",
    )
    epoch_samples: int | None = Field(
        None, ge=1, description="resampled mode: samples per epoch over all ranks (default: split size)"
    )
    shuffle_buffer: int = Field(
        2000,
        ge=0,
        description="exact mode: the epoch's order is permuted within blocks of this "
        "many consecutive samples of the shuffled shards; resampled mode: samples held by each "
        "worker's shuffle buffer (0 = off)",
    )
    workers: int = Field(2, ge=0, description="DataLoader worker processes per rank (0 = read in the main process)")
    prefetch: int = Field(2, ge=1, description="batches prefetched by each worker")
    normalize: Literal["auto", "worker", "device"] = Field(
        "auto",
        description="where uint8 pixels become normalized floats: in the DataLoader workers, or on the "
        "training device after a 4x smaller uint8 hand-over (on a CPU-only machine: the main process); "
        "auto = device when CUDA is present and workers > 0, else worker",
    )
    channels: Literal[1, 3] | None = Field(
        None, description="decode to 1 (gray) or 3 (RGB) channels; None = the dataset's"
    )
    mean: tuple[float, ...] | None = Field(
        None, description="normalization mean per channel; None = the dataset's measured mean"
    )
    std: tuple[float, ...] | None = Field(
        None, description="normalization std per channel; None = the dataset's measured std"
    )
    crop_scale: tuple[float, float] = Field(
        (0.2, 1.0), description="pretrain preset: RandomResizedCrop area range (MAE: 0.2-1.0)"
    )
    hflip: float = Field(0.5, ge=0, le=1, description="horizontal flip probability (set 0 for digits)")
    interpolation: Literal["bicubic", "bilinear"] = Field("bicubic", description="resize interpolation of every preset")
    eval_crop_pct: float = Field(
        0.875, gt=0, le=1, description="eval preset: resize to img_size / crop_pct, then center crop"
    )
    finetune_crop_scale: tuple[float, float] = Field(
        (0.08, 1.0), description="finetune preset: RandomResizedCrop area range (timm/MAE: 0.08-1.0)"
    )
    auto_augment: str | None = Field(
        "rand-m9-mstd0.5-inc1", description="finetune preset: timm auto-augment policy, None = off"
    )
    re_prob: float = Field(0.25, ge=0, le=1, description="finetune preset: timm RandomErasing probability")
    retries: int = Field(
        5,
        ge=0,
        description="re-opens of a remote shard after a transient fault (connection reset, "
        "timeout, HTTP 429/5xx, a pipe: command exiting non-zero), resuming at the next sample's byte; "
        "reading further than at the last fault starts a fresh count",
    )
    retry_wait: float = Field(1.0, ge=0, description="seconds before the first retry; doubled before each next one")
    on_error: Literal["skip", "fail"] = Field(
        "skip",
        description="a shard still unreadable after the retries: skip (and count) the rest of it, or stop the run",
    )
    max_skipped_fraction: float = Field(
        0.01,
        ge=0,
        le=1,
        description="stop the run when the samples skipped so far (corrupt, unreadable, unreachable; "
        "all ranks) exceed this fraction of an epoch's samples per epoch begun",
    )

    @field_validator("crop_scale", "finetune_crop_scale")
    @classmethod
    def _ordered_scale(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError("must be (low, high) with 0 < low <= high <= 1")
        return value

    @field_validator("source")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        if not value or (isinstance(value, list) and not all(s.strip() for s in value)):
            raise ValueError("empty shard spec: name a built-in source, a dataset folder or shards")
        return value

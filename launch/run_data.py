"""The trainer's data: its two loaders, how many steps an epoch holds, and the limit on skipped samples."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from launch.config import TrainerConfig
from launch.errors import ConfigError, DataError

LoaderFactory = Callable[..., Any]


class RunData:
    """``train``: the train split, shuffled whatever the preset (a probe trains on the unshuffled "eval"
    transform), each rank's short last batch dropped (Mixup needs even batches; DDP weighs every batch
    alike); ``eval``: the eval split, None when the data has none. ``factory`` defaults to
    ``launch.data.build_loader``. Raises ConfigError when one optimizer step does not fit in an epoch."""

    def __init__(
        self,
        data: Any,
        factory: LoaderFactory | None,
        cfg: TrainerConfig,
        *,
        img_size: int,
        presets: tuple[str, str],
        splits: tuple[str, str],
        seed: int,
        rank: int,
        world: int,
    ) -> None:
        if factory is None:
            from launch.data import build_loader as factory
        common = dict(batch_size=cfg.batch_size, img_size=img_size, seed=seed, rank=rank, world_size=world)
        self.train = factory(data, splits[0], preset=presets[0], shuffle=True, drop_last=True, **common)
        counts = getattr(self.train.info, "splits", {})
        self.eval = factory(data, splits[1], preset=presets[1], **common) if splits[1] in counts else None
        self.max_skipped_fraction: float | None = getattr(data, "max_skipped_fraction", None)
        planned = len(self.train) * cfg.batch_size * world  # resampled streams without counts
        self.epoch_samples: int = counts.get(splits[0]) or planned
        self.global_batch = cfg.batch_size * cfg.accum_steps * world
        self.steps_per_epoch = len(self.train) // cfg.accum_steps
        self._check_batch_split(cfg, world, splits[0], counts.get(splits[0]))

    def _check_batch_split(self, cfg: TrainerConfig, world: int, split: str, samples: int | None) -> None:
        """One optimizer step must fit in one epoch, on every rank."""
        what = (
            f"trainer.batch_size={cfg.batch_size} x trainer.accum_steps={cfg.accum_steps} x {world} ranks "
            f"= {self.global_batch} images per step"
        )
        if samples is not None and self.global_batch > samples:
            raise ConfigError(
                f"{what}, more than the {samples} samples of split '{split}': lower the batch size or accum_steps"
            )
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{what}, but each rank gets only {len(self.train)} batches per epoch: lower accum_steps")

    def check_skipped(self, skipped: int, *, step: int, epoch: int, checkpoint: Path | None) -> None:
        """Stop when more than ``data.max_skipped_fraction`` of an epoch's samples per epoch begun was lost.
        ``skipped`` is summed over ranks, so every rank stops here together."""
        fraction = self.max_skipped_fraction
        if fraction is None or skipped <= fraction * self.epoch_samples * (epoch + 1):
            return
        last = self.train.last_skip() or "on another rank (see its warnings)"
        raise DataError(
            f"data.max_skipped_fraction={fraction}: {skipped} training samples skipped "
            f"by step {step} (more than {fraction:.1%} of {self.epoch_samples} per epoch, "
            f"{epoch + 1} epoch(s) begun); last: {last}. Fix the shards, or raise "
            f"data.max_skipped_fraction; {checkpoint or 'no checkpoint yet'} is intact"
        )

"""``build_loader`` -> ``ShardLoader``: one reader for every stage.

The main process's side: a ``ShardLoader`` owns the position -- the number of samples of the
epoch's global order that all ranks together have consumed -- so a resume on any number of
ranks or workers re-deals the rest of the epoch; its DataLoader workers run a ``ShardStream``
(``stream``), which reads and decodes their share of it.

Epoch and restore position live in a small shared-memory tensor created before the
workers start, so persistent workers see every new epoch (and a restore) on the next
``iter()``.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch.utils.data import DataLoader

from launch import dist
from launch.data.config import DataConfig
from launch.data.dataset import DatasetInfo, Part, dataset_info, resolve_parts
from launch.data.remote import ReadPolicy
from launch.data.shards import ShardIndex, count_samples, plural
from launch.data.stream import Batch, ShardStream, read_policy
from launch.data.transforms import PRESETS
from launch.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Workers start from a single-threaded fork server, never by forking this process: by the time a
# loader starts its workers, gloo / NCCL, DeepSpeed and TensorBoard threads run here, and a fork
# while one of them holds a lock leaves the child deadlocked before it runs a line (seen: a ZeRO-3
# rank's eval worker stuck in CPython 3.11's after-fork thread cleanup, the run hung). Preloading
# this package makes a worker's start a fork of a process that has already imported torch.
_WORKERS = multiprocessing.get_context("forkserver")
_WORKERS.set_forkserver_preload([__name__])


class ShardLoader:
    """Iterable of batches ``{"image": float (B, C, H, W), "label": int64 (B,), "key": list[str],
    "seed": int64 (B,)}``; ``len()`` batches per epoch, equal on every rank. Iterating to the end
    advances the epoch. With a ``device``, workers hand over uint8 images (4x fewer bytes through
    shared memory and pinned memory) and "image" is normalized on that device, as timm's
    PrefetchLoader does.

    The position is global: samples of the epoch's order consumed by all ranks together, so a
    loader with another world size, batch size or worker count continues at the same sample."""

    def __init__(
        self, stream: ShardStream, info: DatasetInfo, workers: int, prefetch: int, device: torch.device | None = None
    ) -> None:
        self.info = info
        self.device = device
        self._stream = stream
        self._epoch = self._position = self._corrupt = 0
        self._corrupt_why = ""  # the reason of the last skip, for the max_skipped_fraction stop
        self._loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            multiprocessing_context=_WORKERS if workers > 0 else None,
            prefetch_factor=prefetch if workers else None,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator(),
        )  # its per-iter() base seed must not draw from the trainer's RNG

    def __len__(self) -> int:
        return self._stream.num_batches

    def batches_left(self) -> int:
        """Batches of the current epoch still to come (``len()`` at its start; 0 after a restore to a
        position where this layout has no batch left: the next iteration starts the next epoch)."""
        return len(self._stream.batch_ends(self._position))

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` on the next iteration; the current position is kept if it is the same epoch."""
        if epoch != self._epoch:
            self._epoch, self._position = epoch, 0

    def restart(self, epoch: int = 0) -> None:
        """Read ``epoch`` from its first batch on the next iteration, wherever the last pass
        stopped (evaluation passes and picture batches, which must not resume mid-epoch)."""
        self._epoch, self._position = epoch, 0

    def corrupt_samples(self) -> int:
        return self._corrupt

    def last_skip(self) -> str:
        """Why the last skipped sample was skipped ("" if none was): "<url>: <error>"."""
        return self._corrupt_why

    def _order_key(self) -> dict[str, Any]:
        """What the epoch's sample order depends on (a position means the same samples iff equal)."""
        s = self._stream
        key = {"exact": s.exact, "seed": s.seed, "shuffle": s.shuffle, "samples": s.total, "shards": s.identity()}
        if s.exact:
            return {**key, "block": s.cfg.shuffle_buffer}
        # resampled streams are drawn per (rank, worker): only the same layout replays them; 0 workers
        # read in the main process exactly as 1 worker does
        workers = max(self._loader.num_workers, 1)
        return {**key, "world_size": s.world_size, "batch_size": s.batch_size, "workers": workers}

    def _roll_over(self) -> None:
        # a consumer that stops after the epoch's last batch never resumes the generator past its
        # last yield, so a finished epoch is also recognized here
        if self.batches_left() == 0:
            self._epoch, self._position = self._epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        """Global position after the last yielded batch (plus what the order depends on)."""
        self._roll_over()
        return {"epoch": self._epoch, "position": self._position, "corrupt": self._corrupt, "order": self._order_key()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, position = int(state["epoch"]), int(state.get("position", -1))
        if position < 0:  # a checkpoint of per-rank batch counts (before global positions)
            layout = state.get("layout", {})
            position = int(state["consumed"]) * int(layout.get("batch_size", 1)) * int(layout.get("world_size", 1))
            log.warning(
                "the checkpoint counts batches per rank, not samples: resuming epoch %d at sample %d, "
                "which is not sample-exact",
                epoch,
                position,
            )
        elif state.get("order") != self._order_key():
            log.warning(
                "the sample order changed since the checkpoint (%s -> %s): resuming epoch %d at sample %d, "
                "which is not sample-exact",
                state.get("order"),
                self._order_key(),
                epoch,
                position,
            )
        self._epoch, self._position, self._corrupt = (
            epoch,
            min(position, self._stream.total),
            int(state.get("corrupt", 0)),
        )  # not rolled over yet: batches_left() tells a resumed trainer that this epoch is over

    def __iter__(self) -> Iterator[Batch]:
        self._roll_over()
        self._stream.shared[0], self._stream.shared[1] = self._epoch, self._position
        ends = self._stream.batch_ends(self._position)
        try:
            for batch, end in zip(self._loader, ends):
                if self.device is not None:
                    image = batch["image"].to(self.device, non_blocking=True)
                    batch["image"] = self._stream.preset_fns.normalize(image)
                self._corrupt += batch.pop("corrupt")
                self._corrupt_why = batch.pop("corrupt_why") or self._corrupt_why
                self._position = end
                yield batch
        except DataError as err:  # re-raised from a worker with its traceback: keep the one line
            raise DataError(str(err).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
        self._roll_over()  # a state_dict() taken at the last batch may have rolled over already


def build_loader(
    cfg: DataConfig,
    split: str,
    *,
    preset: str,
    batch_size: int,
    img_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool | None = None,
    drop_last: bool = False,
    device: torch.device | str | None = None,
) -> ShardLoader:
    """The loader of ``split`` for one rank. ``preset`` "eval" reads in exact mode, unshuffled unless
    ``shuffle`` says otherwise; other presets follow ``cfg.mode`` and shuffle. ``drop_last`` (training):
    only full global micro-batches (exact mode; resampled batches are always full). ``cfg.normalize``
    "device" normalizes on ``device`` (default: this rank's GPU, else the CPU of the main process).
    With ``world_size`` > 1 every rank must call it alike: shards without a manifest are counted by rank 0
    and the counts broadcast."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}' (allowed: {', '.join(PRESETS)})")
    if batch_size < 1 or img_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(
            f"need batch_size >= 1, img_size >= 1, 0 <= rank < world_size "
            f"(got {batch_size}, {img_size}, {rank}, {world_size})"
        )
    parts = resolve_parts(cfg)
    info = dataset_info(cfg, parts)
    needs_counts = cfg.mode == "exact" or preset == "eval" or cfg.epoch_samples is None
    urls, counts, suffixes = _shards(parts, split, read_policy(cfg), needs_counts, rank=rank, world_size=world_size)
    if counts is not None and sum(counts) == 0:
        raise DataError(f"split '{split}' of {info.source} holds no samples")
    info = replace(info, splits={**info.splits, split: sum(counts)} if counts is not None else info.splits)
    stream = ShardStream(
        cfg,
        info,
        urls,
        counts,
        preset=preset,
        batch_size=batch_size,
        img_size=img_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        shuffle=preset != "eval" if shuffle is None else shuffle,
        drop_last=drop_last,
        stack_only=normalize_where(cfg) == "device",
        index=ShardIndex(urls, suffixes, read_policy(cfg)),
    )
    return ShardLoader(stream, info, cfg.workers, cfg.prefetch, _normalize_device(cfg, device))


def _shards(
    parts: list[Part], split: str, policy: ReadPolicy, needs_counts: bool, *, rank: int, world_size: int
) -> tuple[list[str], list[int] | None, list[str]]:
    """``split``'s shard URLs, samples per shard (None when a part has none and they are not needed)
    and sample-index suffixes, over every part. Shards without a manifest are counted once per job
    (see ``_count_once``)."""
    listed = [(part, *part.shards(split)) for part in parts]
    uncounted = [(part, urls) for part, urls, counts in listed if counts is None] if needs_counts else []
    for part, urls in uncounted if rank == 0 else []:
        log.info(
            "counting the samples of %s of %s (a dataset.json would skip this)", plural(len(urls), "shard"), part.name
        )
    counted = iter(_count_once([u for _, urls in uncounted for u in urls], policy, rank=rank, world_size=world_size))
    urls, counts, suffixes = [], [], []
    for part, part_urls, part_counts in listed:
        if part_counts is None and needs_counts:
            part_counts = list(itertools.islice(counted, len(part_urls)))
        urls += part_urls
        suffixes += [part.index_suffix] * len(part_urls)
        counts = None if counts is None or part_counts is None else counts + part_counts
    return urls, counts, suffixes


def _count_once(urls: list[str], policy: ReadPolicy, *, rank: int, world_size: int) -> list[int]:
    """Samples in each of ``urls``, counted by rank 0 alone when ``world_size`` ranks build this loader
    together (a collective then): counting a remote shard downloads it, so counting on every rank
    would fetch the dataset once per rank before training starts. Rank 0's DataError is raised on
    every rank, so none waits for counts that never come; without a process group each rank counts."""
    if world_size == 1 or not urls:
        return [count_samples(u, policy) for u in urls]
    counted: list[int] | str | None = None
    if rank == 0:
        try:
            counted = [count_samples(u, policy) for u in urls]
        except DataError as err:
            counted = str(err)
    counted = dist.broadcast_object(counted)
    if counted is None:  # no process group to share them: broadcast_object handed back our own None
        return [count_samples(u, policy) for u in urls]
    if isinstance(counted, str):
        raise DataError(counted)
    return counted


def normalize_where(cfg: DataConfig) -> str:
    """``cfg.normalize`` resolved: "auto" hands uint8 to the GPU when there is one and workers to
    relieve (a worker then needs ~2.4x less CPU than the PIL pipeline's, and the copy is 4x smaller);
    on a CPU-only machine the main process is busy training, so the workers normalize."""
    if cfg.normalize != "auto":
        return cfg.normalize
    return "device" if torch.cuda.is_available() and cfg.workers > 0 else "worker"


def _normalize_device(cfg: DataConfig, device: torch.device | str | None) -> torch.device | None:
    if normalize_where(cfg) == "worker":
        return None
    if device is not None:
        return torch.device(device)
    return torch.device("cuda", dist.local_rank()) if torch.cuda.is_available() else torch.device("cpu")

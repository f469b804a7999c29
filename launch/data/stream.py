"""``ShardStream``: what a DataLoader worker does -- which samples it reads, reading them, making batches.

Exact mode: a worker computes which positions of the epoch's global order its batches hold
(see ``plan``), reads just those samples as raw bytes, opening each shard once and in order
(a remote shard with a sample index: one byte-range request per run of them), and only then
decodes and augments them, each with the seed of its global position.
Resampled mode: workers stream drawn shards through a seeded shuffle buffer; a resume replays
a worker's raw stream without decoding and skips the batches it had already produced.

Corrupt samples are dropped from their batch (which shrinks by one), counted and reported
with the batch; a batch left with no readable sample gets the first readable sample of the
split instead, so every rank still yields the same number of batches.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.filters import shuffle as shuffle_filter

from launch.data.config import DataConfig
from launch.data.dataset import DatasetInfo
from launch.data.plan import (
    GlobalOrder,
    Segment,
    deal,
    global_batch_ends,
    mix,
    resampled_batches,
    resampled_shards,
    runs,
    worker_batches,
)
from launch.data.remote import ReadPolicy
from launch.data.shards import BROKEN, Sample, ShardIndex, plural, read_samples
from launch.data.transforms import IMAGE_KEYS, build_transform, decode
from launch.errors import DataError

log = logging.getLogger(__name__)
Batch = dict[str, Any]


class _Corrupt(Exception):
    pass


@dataclass
class _Lost:
    """Samples skipped since the last batch (broken shards, corrupt samples), and the last reason."""

    count: int = 0
    why: str = ""

    def add(self, count: int, why: str) -> None:
        self.count, self.why = self.count + count, why


class ShardStream(IterableDataset):
    """Batches of one rank; each DataLoader worker yields its share (see ``plan``).

    ``shared`` = [epoch, start]: a pass yields the batches after global position ``start`` (samples
    of the epoch's order already consumed by all ranks together)."""

    def __init__(
        self,
        cfg: DataConfig,
        info: DatasetInfo,
        urls: list[str],
        counts: list[int] | None,
        *,
        preset: str,
        batch_size: int,
        img_size: int,
        seed: int,
        rank: int,
        world_size: int,
        shuffle: bool,
        drop_last: bool = False,
        stack_only: bool = False,
        index: ShardIndex | None = None,
    ) -> None:
        self.cfg, self.info, self.urls, self.counts = cfg, info, urls, counts
        self.index = index or ShardIndex(urls, [""] * len(urls))  # where a remote shard is entered mid-way
        self.stack_only = stack_only  # hand over uint8 batches; the ShardLoader normalizes them on its device
        self.preset, self.batch_size, self.img_size = preset, batch_size, img_size
        self.seed, self.rank, self.world_size, self.shuffle, self.drop_last = seed, rank, world_size, shuffle, drop_last
        self.exact = preset == "eval" or cfg.mode == "exact"
        self.unit = batch_size * world_size  # samples of one global micro-batch
        self.total = sum(counts) if self.exact else (cfg.epoch_samples or sum(counts or []))
        self.shared = torch.zeros(2, dtype=torch.int64).share_memory_()
        self.num_batches = len(self.batch_ends(0))
        if self.num_batches == 0 and not drop_last:  # drop_last: the trainer names the batch that does not fit
            raise DataError(
                f"the split has {plural(self.total, 'sample')}, fewer than the {world_size} ranks reading it"
            )
        self.preset_fns = build_transform(cfg, preset, img_size, info.mean, info.std)  # before fork: imports done once
        self.policy = read_policy(cfg)
        self._spare: Sample | None = None

    def batch_ends(self, start: int) -> list[int]:
        """Global position after each batch a pass from ``start`` yields (the same on every rank)."""
        if self.exact:
            return global_batch_ends(
                self.total, start, world_size=self.world_size, batch_size=self.batch_size, drop_last=self.drop_last
            )
        batches = resampled_batches(self.total, world_size=self.world_size, batch_size=self.batch_size)
        return [(b + 1) * self.unit for b in range(start // self.unit, batches)]

    def identity(self) -> str:
        """A digest of the shards in order, by file name and sample count: replacing or reordering
        shards changes it, moving them to another folder or host (or re-signing their URLs) does not."""
        names = [url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] for url in self.urls]
        listed = json.dumps([names, self.counts]).encode()
        return hashlib.blake2b(listed, digest_size=8).hexdigest()

    def order(self, epoch: int) -> GlobalOrder:
        assert self.counts is not None
        return GlobalOrder(
            self.counts, seed=self.seed, epoch=epoch, shuffle=self.shuffle, block=self.cfg.shuffle_buffer
        )

    def __iter__(self) -> Iterator[Batch]:
        worker = get_worker_info()
        workers, physical = (worker.num_workers, worker.id) if worker else (1, 0)
        epoch, start = int(self.shared[0]), int(self.shared[1])
        if self.exact:
            return self._exact(epoch, start, workers, physical)
        return self._resampled(epoch, start // self.unit, workers, physical)

    def _exact(self, epoch: int, start: int, workers: int, worker: int) -> Iterator[Batch]:
        """This worker's batches of the pass from ``start``: reads only its own samples, shard by shard."""
        order = self.order(epoch)
        plan = deal(
            self.total,
            start,
            world_size=self.world_size,
            batch_size=self.batch_size,
            rank=self.rank,
            drop_last=self.drop_last,
        )
        batches = [[(q, order.storage(q)) for q in plan[i]] for i in worker_batches(len(plan), workers, worker)]
        reader = self._read(order, sorted(index for batch in batches for _, index in batch))
        ready: dict[int, Sample] = {}
        for batch in batches:
            for _, index in batch:
                while index not in ready:  # the reader walks the storage in order, batches the global order
                    got, sample = next(reader)
                    ready[got] = sample
            yield self._batch([(mix(self.seed, epoch, q), ready.pop(index)) for q, index in batch], _Lost())

    def _read(self, order: GlobalOrder, wanted: list[int]) -> Iterator[tuple[int, Sample]]:
        """(index, raw sample) for the ascending storage indices ``wanted``, opening each shard once (a
        remote shard with a sample index: one range request per run of them, gaps under
        ``policy.read_through`` read through); ``{BROKEN: why}`` for a sample that a broken shard could not give."""
        located = [(index, *order.locate(index)) for index in wanted]
        for shard, group in itertools.groupby(located, key=lambda item: item[1]):
            group = list(group)
            inner = [k for _, _, k in group]  # ascending: indices inside the shard
            gap = self.policy.read_through if self.index.indexed(shard) else math.inf
            for lo, hi in runs(inner, gap):
                run = group[bisect.bisect_left(inner, lo) : bisect.bisect_left(inner, hi)]
                samples = read_samples(
                    self.urls[shard], lo, hi, self.policy, self.index.span(shard, lo, hi), keep={k for _, _, k in run}
                )
                broken = None
                for index, _, k in run:
                    sample = broken or next(samples, None) or {BROKEN: f"{self.urls[shard]}: ended before sample {k}"}
                    if BROKEN in sample:  # the rest of this run is lost with it
                        broken = sample
                    yield index, sample

    def _resampled(self, epoch: int, start: int, workers: int, physical: int) -> Iterator[Batch]:
        """Shards drawn per (rank, worker): batches before ``start`` are read again but not decoded."""
        # the DataLoader always begins at worker 0: rotate so it plays the worker whose batch is next
        logical = (physical + start) % workers
        done = start // workers + (logical < start % workers)
        lost = _Lost()  # samples of broken shards met since the last batch
        draws = resampled_shards(
            self.counts, len(self.urls), seed=self.seed, epoch=epoch, rank=self.rank, worker=logical
        )
        raw = self._raw(draws, lost)
        if self.shuffle and self.cfg.shuffle_buffer > 1:
            buffer_seed = mix(self.seed, epoch, self.rank, logical, "buffer")
            raw = shuffle_filter(bufsize=self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer, seed=buffer_seed)(
                raw
            )
        total = resampled_batches(self.total, world_size=self.world_size, batch_size=self.batch_size)
        for j, index in enumerate(worker_batches(total, workers, logical)):
            samples = list(itertools.islice(raw, self.batch_size))
            if j >= done:  # batches already yielded before a restore are read, never decoded
                seeds = [mix(self.seed, epoch, self.rank, index, k) for k in range(len(samples))]
                yield self._batch(list(zip(seeds, samples)), lost)
            lost.count, lost.why = 0, ""  # in place: the raw stream adds to this object

    def _raw(self, segments: Iterator[Segment], lost: _Lost) -> Iterator[Sample]:
        """Raw samples of the segments in order; samples a broken shard could not give are added to ``lost``."""
        barren = 0
        for seg in segments:
            got = 0
            span = self.index.span(seg.shard, seg.start, seg.stop)
            for sample in read_samples(self.urls[seg.shard], seg.start, seg.stop, self.policy, span):
                if BROKEN in sample:
                    planned = seg.stop if seg.stop is not None else (self.counts[seg.shard] if self.counts else None)
                    lost.add(max(planned - seg.start - got, 1) if planned is not None else 1, sample[BROKEN])
                    break
                got += 1
                yield sample
            barren = 0 if got else barren + 1
            if barren > 2 * len(self.urls) + 8:  # only resampled streams are endless
                raise DataError(f"no readable sample in {barren} shard draws in a row (e.g. {self.urls[seg.shard]})")

    def _batch(self, items: list[tuple[int, Sample]], lost: _Lost) -> Batch:
        """Decode + augment (seed, raw sample) pairs (``{BROKEN: why}``: lost to a broken shard); a sample's
        seed also goes out in the batch's "seed", for the task's own per-sample randomness (masks)."""
        images, labels, keys, seeds = [], [], [], []
        for seed, sample in items:
            if BROKEN in sample:
                lost.add(1, sample[BROKEN])
                continue
            try:
                image, label = self._sample(sample, seed)
            except _Corrupt as err:
                log.warning("skipping corrupt sample %s in %s: %s", sample["__key__"], sample["__url__"], err)
                lost.add(1, f"{sample['__url__']}: sample {sample['__key__']}: {err}")
                continue
            images.append(image)
            labels.append(label)
            keys.append(sample["__key__"])
            seeds.append(seed)
        if not images:  # the stand-in takes the seed of its batch's first sample
            spare, seed = self.spare(), items[0][0]
            image, label = self._sample(spare, seed)
            images, labels, keys, seeds = [image], [label], [spare["__key__"]], [seed]
        image = self.preset_fns.stack(images) if self.stack_only else self.preset_fns.batch(images)
        return {
            "image": image,
            "label": torch.tensor(labels, dtype=torch.int64),
            "key": keys,
            "seed": torch.tensor(seeds, dtype=torch.int64),
            "corrupt": lost.count,
            "corrupt_why": lost.why,
        }

    def _sample(self, sample: Sample, seed: int) -> tuple[torch.Tensor, int]:
        """-> ((C, img_size, img_size) uint8, float for finetune; label); raises _Corrupt for a bad image or label."""
        label = self._label(sample)
        data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if data is None:
            raise _Corrupt(f"no image member ({', '.join(IMAGE_KEYS)}) among {sorted(sample)}")
        try:
            image = decode(data, self.info.channels)
        except (RuntimeError, ValueError) as err:  # ValueError: an empty member
            raise _Corrupt(f"undecodable image ({str(err).splitlines()[0]})") from None
        return self.preset_fns.sample(image, seed), label

    def _label(self, sample: Sample) -> int:
        classes = self.info.num_classes
        if "cls" not in sample:
            if classes:
                raise _Corrupt("missing label (.cls)")
            return -1
        try:
            label = int(sample["cls"].decode().strip())
        except (UnicodeDecodeError, ValueError):
            raise _Corrupt(f"bad label {sample['cls'][:20]!r}") from None
        if classes and not 0 <= label < classes:
            raise _Corrupt(f"label {label} outside 0..{classes - 1}")
        return label

    def spare(self) -> Sample:
        """The first readable sample of the split (stands in for a batch that lost all its samples)."""
        if self._spare is None:
            for sample in self._raw(iter([Segment(i, 0, None) for i in range(len(self.urls))]), _Lost()):
                try:
                    self._sample(sample, 0)
                except _Corrupt:
                    continue
                self._spare = sample
                break
            else:
                raise DataError(f"no readable sample in {plural(len(self.urls), 'shard')} (e.g. {self.urls[0]})")
        return self._spare


def read_policy(cfg: DataConfig) -> ReadPolicy:
    return ReadPolicy(retries=cfg.retries, retry_wait=cfg.retry_wait, fail=cfg.on_error == "fail")

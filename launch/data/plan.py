"""Who reads which samples: the epoch's global sample order and how it is dealt to ranks.

Exact mode (every sample once per epoch). The **global order** of an epoch depends only on
(seed, epoch, shard sample counts, shuffle block), never on the number of ranks or workers:
shards are put in a seeded order, their samples concatenated, and that sequence is cut into
blocks of ``block`` samples, each permuted by its own seeded RNG (a world-size-independent
stand-in for a shuffle buffer of the same size).

The **deal**: from a start position ``p`` (0, or the samples a resumed run had consumed), the rest
of the order is cut into global micro-batches of ``world_size x batch_size`` samples, and rank ``r``
takes part ``r`` of each: for a full one, positions ``[p + i*W*B + r*B, p + i*W*B + (r+1)*B)``. Hence,
whatever the world size, the trainer's optimizer step ``s`` (``accum_steps`` micro-batches on every
rank) holds the positions ``[p + s*G, p + (s+1)*G)`` with ``G = batch_size x accum_steps x world_size``:
the same samples for every split of the same ``G``. A last, partial global micro-batch is split into
near-equal contiguous parts; one with fewer samples than ranks is merged into the one before, so every
rank yields the same number of batches, each with at least one sample. With ``drop_last`` (training
loaders) the partial global micro-batch is dropped instead, as the official MAE code's
``drop_last=True``: an epoch uses ``floor(N / (W*B)) * W*B`` samples, every batch full (a short batch
would weigh as much as a full one in the DDP mean and break pairwise Mixup); the shard order and
blocks change which samples fall off from epoch to epoch. The trainer's epoch is the first
``len // accum_steps`` steps of these micro-batches.

Worker ``w`` of ``K`` makes the rank's batches ``w, w + K, ...``; the DataLoader takes them
round-robin, so output batch ``i`` is plan batch ``i``.

Resampled mode: each (rank, worker) draws whole shards with replacement (weighted by size)
from its own seeded RNG; an epoch is ``epoch_samples // (world * batch)`` full batches per rank.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

from launch.errors import DataError


def mix(*parts: object) -> int:
    """A stable 63-bit seed from any tuple (Python's hash() is salted per process)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class Segment:
    """Samples ``[start, stop)`` of shard number ``shard``; ``stop`` None = to the shard's end."""

    shard: int
    start: int
    stop: int | None


class GlobalOrder:
    """The epoch's sample order: position ``q`` -> (shard, index in shard). See the module docstring."""

    def __init__(self, counts: list[int], *, seed: int, epoch: int, shuffle: bool, block: int) -> None:
        self.total = sum(counts)
        self.shards = list(range(len(counts)))
        if shuffle:
            random.Random(mix(seed, epoch, "shards")).shuffle(self.shards)
        self.starts = list(itertools.accumulate((counts[s] for s in self.shards), initial=0))  # in shard order
        self.block = block if shuffle and block > 1 else 1
        self.seed, self.epoch = seed, epoch
        self._current: tuple[int, list[int]] = (-1, [])  # readers walk positions upwards: one block at a time

    def _permutation(self, block: int) -> list[int]:
        if self._current[0] != block:
            lo = block * self.block
            perm = list(range(lo, min(lo + self.block, self.total)))
            random.Random(mix(self.seed, self.epoch, "block", block)).shuffle(perm)
            self._current = (block, perm)
        return self._current[1]

    def storage(self, position: int) -> int:
        """Position in the epoch's order -> index in the concatenation of the shards (in shard order)."""
        if self.block == 1:
            return position
        block, offset = divmod(position, self.block)
        return self._permutation(block)[offset]

    def locate(self, index: int) -> tuple[int, int]:
        """Index in the shard concatenation -> (shard number, sample index inside that shard)."""
        k = bisect.bisect_right(self.starts, index) - 1
        return self.shards[k], index - self.starts[k]


def deal(
    total: int, start: int, *, world_size: int, batch_size: int, rank: int, drop_last: bool = False
) -> list[range]:
    """This rank's batches, as ranges of positions in the global order, for positions ``[start, total)``;
    with ``drop_last`` only the full global micro-batches.

    Empty when fewer samples than ranks (``drop_last``: than one global micro-batch) are left."""
    unit, left = world_size * batch_size, total - start
    full, rem = divmod(max(left, 0), unit)
    if drop_last:
        rem = 0
    elif left < world_size:
        return []
    sizes = [unit] * full + ([rem] if rem else [])
    if 0 < rem < world_size:  # not one sample per rank: merged into the batch before (which exists: left >= W)
        sizes[-2:] = [unit + rem]
    out, pos = [], start
    for size in sizes:
        out.append(range(pos + rank * size // world_size, pos + (rank + 1) * size // world_size))
        pos += size
    return out


def global_batch_ends(
    total: int, start: int, *, world_size: int, batch_size: int, drop_last: bool = False
) -> list[int]:
    """The position after each global micro-batch of ``deal`` (where a checkpoint resumes)."""
    last = deal(total, start, world_size=world_size, batch_size=batch_size, rank=world_size - 1, drop_last=drop_last)
    return [r.stop for r in last]


def worker_batches(batches: int, workers: int, worker: int) -> range:
    """Plan indices of ``worker``'s batches: ``worker, worker + W, ...`` -- the DataLoader's round-robin
    then yields plan batch ``i`` as output batch ``i``."""
    return range(worker, batches, workers)


def runs(indices: list[int], gap: float) -> list[tuple[int, int]]:
    """Ascending ``indices`` as ``[lo, hi)`` runs, joining runs fewer than ``gap`` apart (a reader's
    byte-range requests: the samples between two joined runs are read through)."""
    out: list[list[int]] = []
    for i in indices:
        if out and i - out[-1][1] < gap:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return [(lo, hi) for lo, hi in out]


def resampled_batches(epoch_samples: int, *, world_size: int, batch_size: int) -> int:
    batches = epoch_samples // (world_size * batch_size)
    if batches < 1:
        raise DataError(f"epoch_samples={epoch_samples} is less than one batch per rank ({world_size} x {batch_size})")
    return batches


def resampled_shards(
    counts: list[int] | None, num_shards: int, *, seed: int, epoch: int, rank: int, worker: int
) -> Iterator[Segment]:
    """An endless, seeded draw of whole shards for one (rank, worker) slot, weighted by their sample
    counts when known, so that every sample is equally likely whatever the shard sizes."""
    rng = random.Random(mix(seed, epoch, rank, worker, "resample"))
    shards = range(num_shards)
    while True:
        yield Segment(rng.choices(shards, weights=counts)[0] if counts else rng.randrange(num_shards), 0, None)

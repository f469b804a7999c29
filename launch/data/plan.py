"""Who reads which samples: the deterministic per-(seed, epoch) plan of one rank.

Exact mode: shards are put in a seeded order, their samples concatenated, and the
sequence cut contiguously into ``world_size`` near-equal parts. Every rank gets the
same number of batches ``K = ceil(ceil(N / world) / batch)``; batches are full except
at the end of an epoch, where sizes shrink so that every sample is used exactly once. With
``drop_last`` (training) every rank reads ``K = floor(floor(N / world) / batch)`` full batches from
the start of its part, as the official MAE code's ``drop_last=True``: a short batch would weigh as
much as a full one in the DDP mean and break pairwise Mixup; the shard shuffle changes which
samples fall off from epoch to epoch.
Worker ``w`` of ``W`` makes the rank's batches ``w, w + W, ...`` and fills them from one
contiguous stretch of the rank's samples, so it opens few shards; fewer shards than
ranks x workers simply means several workers read different parts of the same shard.

Resampled mode: each (rank, worker) draws whole shards with replacement (weighted by size)
from its own seeded RNG; an epoch is ``epoch_samples // (world * batch)`` full batches per rank.

The DataLoader takes batches from its workers round-robin, so output batch ``i`` of a
rank is worker ``i % W``'s ``i // W``-th batch; that is what makes a resume from
"batches consumed" exact.
"""

from __future__ import annotations

import hashlib
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


def batch_sizes(samples: int, batches: int, batch_size: int) -> list[int]:
    """``batches`` sizes summing to ``samples``: full first, a shortfall taken from the end (every batch
    keeps >= 1 sample); a surplus of one (batch_size 1 on a rank with one sample more) goes to the first."""
    if samples < batches or samples > batches * (batch_size + 1):
        raise DataError(f"{samples} samples cannot fill {batches} batches of {batch_size}")
    sizes = [batch_size + (i < samples - batches * batch_size) for i in range(batches)]
    deficit = sum(sizes) - samples
    for i in reversed(range(batches)):
        take = min(deficit, sizes[i] - 1)
        sizes[i] -= take
        deficit -= take
    return sizes


def cut(segments: list[Segment], counts: list[int], lo: int, hi: int) -> list[Segment]:
    """The part ``[lo, hi)`` of the sample sequence that ``segments`` spell out."""
    out, pos = [], 0
    for seg in segments:
        stop = counts[seg.shard] if seg.stop is None else seg.stop
        n = stop - seg.start
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            out.append(Segment(seg.shard, seg.start + a - pos, seg.start + b - pos))
        pos += n
    return out


def worker_batches(batches: int, workers: int, worker: int) -> range:
    """Plan indices of ``worker``'s batches: ``worker, worker + W, ...`` -- the DataLoader's round-robin
    then yields plan batch ``i`` as output batch ``i``, so the short batches come last."""
    return range(worker, batches, workers)


@dataclass(frozen=True)
class RankPlan:
    sizes: list[int]                 # samples per batch, K entries, in output order
    segments: list[Segment] | None   # exact mode: this rank's samples in order; None = resampled

    def worker_segments(self, counts: list[int], workers: int, worker: int) -> list[Segment]:
        """The contiguous stretch of samples that fills ``worker``'s batches (workers in order)."""
        assert self.segments is not None
        lo = sum(sum(self.sizes[w::workers]) for w in range(worker))
        return cut(self.segments, counts, lo, lo + sum(self.sizes[worker::workers]))


def exact_plan(counts: list[int], *, seed: int, epoch: int, shuffle: bool, rank: int, world_size: int,
               batch_size: int, drop_last: bool = False) -> RankPlan:
    order = list(range(len(counts)))
    if shuffle:
        random.Random(mix(seed, epoch, "shards")).shuffle(order)
    total = sum(counts)
    if total < world_size:
        raise DataError(f"the split has {total} samples, fewer than the {world_size} ranks reading it")
    bounds = [total * r // world_size for r in range(world_size + 1)]
    shards = [Segment(i, 0, counts[i]) for i in order]
    if drop_last:  # full batches only, as many on every rank as the smallest share holds
        batches = total // world_size // batch_size
        return RankPlan([batch_size] * batches, cut(shards, counts, bounds[rank], bounds[rank] + batches * batch_size))
    # ceil(largest rank share / batch), unless the smallest share has fewer samples (batch_size 1)
    batches = min(-(-(-(-total // world_size)) // batch_size), total // world_size)
    segments = cut(shards, counts, bounds[rank], bounds[rank + 1])
    return RankPlan(batch_sizes(bounds[rank + 1] - bounds[rank], batches, batch_size), segments)


def resampled_plan(epoch_samples: int, *, world_size: int, batch_size: int) -> RankPlan:
    batches = epoch_samples // (world_size * batch_size)
    if batches < 1:
        raise DataError(f"epoch_samples={epoch_samples} is less than one batch per rank ({world_size} x {batch_size})")
    return RankPlan([batch_size] * batches, None)


def resampled_shards(counts: list[int] | None, num_shards: int, *, seed: int, epoch: int, rank: int,
                     worker: int) -> Iterator[Segment]:
    """An endless, seeded draw of whole shards for one (rank, worker) slot, weighted by their sample
    counts when known, so that every sample is equally likely whatever the shard sizes."""
    rng = random.Random(mix(seed, epoch, rank, worker, "resample"))
    shards = range(num_shards)
    while True:
        yield Segment(rng.choices(shards, weights=counts)[0] if counts else rng.randrange(num_shards), 0, None)

"""Ranks x workers: every sample exactly once per epoch, the same batch count on every rank.

The multi-process test runs this file under ``torchrun --nproc_per_node 2`` (see ``__main__``).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.data.plan import batch_sizes, exact_plan, worker_batches

UNEVEN = (97, 3, 40, 1, 59)  # 200 samples; fewer shards than 2 ranks x 4 workers in the plan test


@pytest.mark.parametrize("world_size,batch_size,workers", list(itertools.product((1, 2, 3, 8), (1, 7, 64), (1, 2, 3))))
def test_plan_covers_every_sample_once_with_equal_batch_counts(world_size: int, batch_size: int, workers: int) -> None:
    counts = list(UNEVEN)
    seen: list[tuple[int, int]] = []
    batches = set()
    for rank in range(world_size):
        plan = exact_plan(counts, seed=1, epoch=2, shuffle=True, rank=rank, world_size=world_size, batch_size=batch_size)
        batches.add(len(plan.sizes))
        assert all(1 <= s <= max(batch_size, 2) for s in plan.sizes) and plan.sizes == sorted(plan.sizes, reverse=True)
        for w in range(workers):
            mine = sum(plan.sizes[i] for i in worker_batches(len(plan.sizes), workers, w))
            segments = plan.worker_segments(counts, workers, w)
            assert sum(s.stop - s.start for s in segments) == mine
            seen += [(s.shard, i) for s in segments for i in range(s.start, s.stop)]
    assert len(batches) == 1
    assert sorted(seen) == [(shard, i) for shard, n in enumerate(counts) for i in range(n)]


def test_batch_sizes_shrink_only_at_the_end() -> None:
    assert batch_sizes(10, 3, 4) == [4, 4, 2]
    assert batch_sizes(8, 3, 4) == [4, 3, 1]
    assert batch_sizes(3, 3, 1) == [1, 1, 1]
    assert batch_sizes(4, 3, 1) == [2, 1, 1]  # batch 1, three ranks over 10 samples: 3, 3, 4 -> 3 batches each


def test_one_shard_feeds_two_ranks_of_two_workers(tmp_path: Path) -> None:
    from launch.data import DataConfig, build_loader

    _write_uneven(tmp_path)
    cfg = DataConfig(source=str(tmp_path / "part-000000.tar"), workers=2, shuffle_buffer=10)
    ranks = [[b["key"] for b in build_loader(cfg, "train", preset="pretrain", batch_size=16, img_size=8, seed=0,
                                             rank=r, world_size=2)] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4  # 97 samples: 49 + 48 per rank, ceil(49 / 16) batches each
    keys = [k for rank in ranks for batch in rank for k in batch]
    assert len(keys) == len(set(keys)) == UNEVEN[0]


def _write_uneven(folder: Path) -> None:
    """Digit shards of UNEVEN sizes, without a manifest (the reader counts them)."""
    from launch.data.sources import digits
    from launch.data.writer import write_shard

    items = digits().splits["train"]
    start = 0
    for i, n in enumerate(UNEVEN):
        write_shard(folder / f"part-{i:06d}.tar", items[start:start + n])
        start += n


@pytest.mark.dist
def test_two_ranks_two_workers_read_every_key_once(tmp_path: Path) -> None:
    _write_uneven(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0", __file__,
           str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]["0"]) == len(ranks[1]["0"]) == len(ranks[0]["1"]) == len(ranks[1]["1"]) == 13  # ceil(100/8)
    for epoch in ("0", "1"):
        keys = [k for rank in ranks for batch in rank[epoch] for k in batch]
        assert len(keys) == len(set(keys)) == sum(UNEVEN)
    assert ranks[0]["0"] != ranks[0]["1"]


def _rank_main(folder: str) -> None:
    from launch.data import DataConfig, build_loader
    from launch.dist import rank, world_size

    cfg = DataConfig(source=folder, workers=2, shuffle_buffer=30)
    loader = build_loader(cfg, "train", preset="pretrain", batch_size=8, img_size=8, seed=5,
                          rank=rank(), world_size=world_size())
    epochs = {}
    for epoch in range(2):
        loader.set_epoch(epoch)
        epochs[epoch] = [batch["key"] for batch in loader]
    Path(folder, f"rank{rank()}.json").write_text(json.dumps(epochs))


if __name__ == "__main__":
    _rank_main(sys.argv[1] if len(sys.argv) > 1 else os.getcwd())

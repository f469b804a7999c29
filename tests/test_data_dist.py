"""Ranks x workers: every sample exactly once per epoch, the same batch count on every rank, and
global batches that do not depend on how they are split over ranks.

The multi-process test runs this file under ``torchrun --nproc_per_node 2`` (see ``__main__``).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.data.plan import GlobalOrder, deal, global_batch_ends, runs, worker_batches

UNEVEN = (97, 3, 40, 1, 59)  # 200 samples; fewer shards than 2 ranks x 4 workers in the plan test


@pytest.mark.parametrize("world_size,batch_size,start", list(itertools.product((1, 2, 3, 8), (1, 7, 64), (0, 5, 150))))
def test_deal_covers_every_position_once_with_equal_batch_counts(world_size: int, batch_size: int, start: int) -> None:
    ranks = [deal(200, start, world_size=world_size, batch_size=batch_size, rank=r) for r in range(world_size)]
    assert len({len(batches) for batches in ranks}) == 1
    sizes = [len(b) for batches in ranks for b in batches]
    assert min(sizes) >= 1 and max(sizes) <= batch_size + 1
    for batches in ranks:  # full batches first: only the last one of the pass may differ
        assert all(len(b) == batch_size for b in batches[:-1])
    assert sorted(q for batches in ranks for b in batches for q in b) == list(range(start, 200))


@pytest.mark.parametrize("start", [0, 36, 50])
def test_global_micro_batches_do_not_depend_on_the_split_over_ranks(start: int) -> None:
    """The same W x B from the same position: global batch i holds the same positions, whatever W."""

    def global_batches(world_size: int, batch_size: int) -> list[list[int]]:
        ranks = [deal(200, start, world_size=world_size, batch_size=batch_size, rank=r) for r in range(world_size)]
        return [[q for batches in ranks for q in batches[i]] for i in range(len(ranks[0]))]

    one = global_batches(1, 12)
    assert global_batches(2, 6) == global_batches(3, 4) == global_batches(4, 3) == one
    assert one[0][0] == start and len(one) == -(-(200 - start) // 12)


@pytest.mark.parametrize("world_size,batch_size,start", [(1, 12, 0), (2, 6, 0), (3, 4, 36), (8, 7, 5), (3, 64, 0)])
def test_drop_last_deals_only_full_global_micro_batches(world_size: int, batch_size: int, start: int) -> None:
    """Training (drop_last): floor(left / (W x B)) global micro-batches, every one full, the first positions
    of the order; the partial rest is dropped (not merged, not split)."""
    unit = world_size * batch_size
    ranks = [
        deal(200, start, world_size=world_size, batch_size=batch_size, rank=r, drop_last=True)
        for r in range(world_size)
    ]
    assert all(len(batches) == (200 - start) // unit for batches in ranks)
    assert all(len(b) == batch_size for batches in ranks for b in batches)
    used = sorted(q for batches in ranks for b in batches for q in b)
    assert used == list(range(start, start + (200 - start) // unit * unit))
    assert global_batch_ends(200, start, world_size=world_size, batch_size=batch_size, drop_last=True) == [
        start + (i + 1) * unit for i in range((200 - start) // unit)
    ]


def test_a_resume_in_the_last_samples_of_an_epoch_has_nothing_left() -> None:
    assert deal(200, 199, world_size=2, batch_size=4, rank=0) == []
    assert [len(b) for b in deal(200, 198, world_size=2, batch_size=4, rank=1)] == [1]


@pytest.mark.parametrize("block", [0, 1, 16, 1000])
def test_global_order_is_a_seeded_permutation_of_the_shards(block: int) -> None:
    counts = list(UNEVEN)

    def positions(seed: int, epoch: int) -> list[tuple[int, int]]:
        order = GlobalOrder(counts, seed=seed, epoch=epoch, shuffle=True, block=block)
        return [order.locate(order.storage(q)) for q in range(order.total)]

    first = positions(1, 2)
    assert sorted(first) == [(shard, i) for shard, n in enumerate(counts) for i in range(n)]
    assert positions(1, 2) == first and positions(1, 3) != first
    plain = GlobalOrder(counts, seed=1, epoch=2, shuffle=False, block=block)
    assert [plain.locate(plain.storage(q)) for q in range(plain.total)] == sorted(first)
    if block > 1:  # a position stays inside its block of the shard sequence
        order = GlobalOrder(counts, seed=1, epoch=2, shuffle=True, block=block)
        assert all(order.storage(q) // block == q // block for q in range(order.total))


def test_runs_join_indices_fewer_than_gap_apart() -> None:
    assert runs([1, 2, 3, 7, 20], 8) == [(1, 8), (20, 21)]  # 4..6 are read through
    assert runs([1, 2, 3, 7, 20], 1) == [(1, 4), (7, 8), (20, 21)]
    assert runs([5, 900], float("inf")) == [(5, 901)] and runs([], 8) == []


def test_worker_batches_interleave() -> None:
    assert [list(worker_batches(7, 3, w)) for w in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]


def test_one_shard_feeds_two_ranks_of_two_workers(tmp_path: Path) -> None:
    from launch.data import DataConfig, build_loader

    _write_uneven(tmp_path)
    cfg = DataConfig(source=str(tmp_path / "part-000000.tar"), workers=2, shuffle_buffer=10)
    ranks = [
        [
            b["key"]
            for b in build_loader(
                cfg, "train", preset="pretrain", batch_size=16, img_size=8, seed=0, rank=r, world_size=2
            )
        ]
        for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 3  # 97 samples: 2 x 32, then 33 (the last one is merged in)
    keys = [k for rank in ranks for batch in rank for k in batch]
    assert len(keys) == len(set(keys)) == UNEVEN[0]


@pytest.mark.parametrize("drop_last", [False, True])
def test_an_empty_shard_among_three_feeds_two_ranks_of_two_workers(tmp_path: Path, drop_last: bool) -> None:
    """Shards of 30, 0 and 17 samples, 2 ranks x 2 workers x batch 4: no sample twice in an epoch, none
    missing but the drop_last remainder (47 = 5 global micro-batches of 8 + 7), equal batch counts."""
    from launch.data import DataConfig, build_loader

    _write_uneven(tmp_path, (30, 0, 17))
    cfg = DataConfig(source=str(tmp_path), workers=2, shuffle_buffer=10)
    ranks = [
        [
            b["key"]
            for b in build_loader(
                cfg,
                "train",
                preset="pretrain",
                batch_size=4,
                img_size=8,
                seed=0,
                rank=r,
                world_size=2,
                drop_last=drop_last,
            )
        ]
        for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == (5 if drop_last else 6)
    keys = [k for rank in ranks for batch in rank for k in batch]
    assert len(keys) == len(set(keys)) == (40 if drop_last else 47)


@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_a_split_of_one_sample_is_one_batch_per_epoch_and_too_small_for_two_ranks(tmp_path: Path, mode: str) -> None:
    from launch.data import DataConfig, build_loader
    from launch.errors import DataError

    _write_uneven(tmp_path, (1,))
    cfg = DataConfig(source=str(tmp_path), workers=2, mode=mode, epoch_samples=1)
    make = functools.partial(build_loader, cfg, "train", preset="pretrain", batch_size=1, img_size=8, seed=0)
    loader = make(drop_last=True)
    epochs = [[b["key"] for b in loader] for _ in range(2)]
    assert len(loader) == 1 and epochs[0] == epochs[1] and len(epochs[0][0]) == 1
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["position"] == 0
    with pytest.raises(DataError, match="has 1 sample, fewer than the 2 ranks" if mode == "exact" else "less than one"):
        make(rank=1, world_size=2)


def _write_uneven(folder: Path, sizes: tuple[int, ...] = UNEVEN) -> None:
    """Digit shards of ``sizes`` samples, without a manifest (the reader counts them)."""
    from launch.data.sources import digits
    from launch.data.writer import write_shard

    items = digits().splits["train"]
    start = 0
    for i, n in enumerate(sizes):
        write_shard(folder / f"part-{i:06d}.tar", items[start : start + n])
        start += n


def _global_batches(
    folder: Path, world_size: int, batch_size: int, workers: int, stop: int | None = None, state: dict | None = None
) -> tuple[list[list[tuple[str, torch.Tensor]]], dict]:
    """Global micro-batches (rank 0's samples, then rank 1's, ...) as (key, image) pairs, and the position
    after ``stop`` of them; ``state`` restores every rank first."""
    from launch.data import DataConfig, build_loader

    cfg = DataConfig(source=folder, workers=workers, shuffle_buffer=30)
    loaders = [
        build_loader(
            cfg, "train", preset="pretrain", batch_size=batch_size, img_size=8, seed=5, rank=r, world_size=world_size
        )
        for r in range(world_size)
    ]
    ranks = []
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
        ranks.append([list(zip(b["key"], b["image"])) for b in itertools.islice(loader, stop)])
    assert len({len(r) for r in ranks}) == 1 and len({repr(loader.state_dict()) for loader in loaders}) == 1
    return [[s for rank in ranks for s in rank[i]] for i in range(len(ranks[0]))], loaders[0].state_dict()


def _same_samples(a: list[list[tuple[str, torch.Tensor]]], b: list[list[tuple[str, torch.Tensor]]]) -> None:
    assert [[k for k, _ in batch] for batch in a] == [[k for k, _ in batch] for batch in b]
    assert all(torch.equal(x, y) for p, q in zip(a, b) for (_, x), (_, y) in zip(p, q))  # same augmentation


@pytest.mark.parametrize("before,after", [((2, 8, 2), (1, 16, 1)), ((1, 16, 2), (2, 8, 1)), ((2, 8, 1), (4, 4, 2))])
def test_resume_on_another_world_size_continues_with_the_same_global_batches(tmp_path: Path, before, after) -> None:
    """(world size, batch size, workers) before and after a stop after 5 global batches: the rest of the
    epoch holds the same samples, augmented the same way, as the uninterrupted run's."""
    _write_uneven(tmp_path)
    reference, _ = _global_batches(str(tmp_path), *before)
    assert len(reference) == 13 and sorted(k for b in reference for k, _ in b) == sorted(
        {k for b in reference for k, _ in b}
    )  # 200 samples, once each
    head, state = _global_batches(str(tmp_path), *before, stop=5)
    assert state["position"] == 80
    rest, _ = _global_batches(str(tmp_path), *after, state=state)
    _same_samples(head + rest, reference)


@pytest.mark.dist
def test_two_ranks_two_workers_read_every_key_once(tmp_path: Path) -> None:
    _write_uneven(tmp_path)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "0",
        __file__,
        str(tmp_path),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]["0"]) == len(ranks[1]["0"]) == len(ranks[0]["1"]) == len(ranks[1]["1"]) == 13  # ceil(100/8)
    for epoch in ("0", "1"):
        keys = [k for rank in ranks for batch in rank[epoch] for k in batch]
        assert len(keys) == len(set(keys)) == sum(UNEVEN)
    assert ranks[0]["0"] != ranks[0]["1"]


@pytest.mark.dist
def test_two_processes_count_the_shards_of_a_spec_without_manifest_once(tmp_path: Path) -> None:
    """Rank 0 counts (reads every shard) and broadcasts the counts: each shard is opened once for the
    job, not once per rank (the first one is also probed by each rank for its channels)."""
    _write_uneven(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    result = subprocess.run([*cmd, str(tmp_path), "count"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    opens = [Path(line).name for line in (tmp_path / "opens.log").read_text().split()]
    assert [opens.count(f"part-{i:06d}.tar") for i in range(1, len(UNEVEN))] == [1] * (len(UNEVEN) - 1)
    assert [json.loads((tmp_path / f"samples{r}.json").read_text()) for r in range(2)] == [sum(UNEVEN)] * 2


def _count_main(folder: str) -> None:
    import torch.distributed as torch_dist

    from launch.data import DataConfig, build_loader

    torch_dist.init_process_group("gloo")
    shards = f"{folder}/part-{{000000..{len(UNEVEN) - 1:06d}}}.tar"
    cfg = DataConfig(source=f"pipe:f={shards} && echo $f >> {folder}/opens.log && cat $f", workers=0)
    rank = torch_dist.get_rank()
    loader = build_loader(cfg, "train", preset="pretrain", batch_size=8, img_size=8, seed=0, rank=rank, world_size=2)
    Path(folder, f"samples{rank}.json").write_text(json.dumps(loader.info.splits["train"]))
    torch_dist.destroy_process_group()


def _rank_main(folder: str) -> None:
    from launch.data import DataConfig, build_loader
    from launch.dist import rank, world_size

    cfg = DataConfig(source=folder, workers=2, shuffle_buffer=30)
    loader = build_loader(
        cfg, "train", preset="pretrain", batch_size=8, img_size=8, seed=5, rank=rank(), world_size=world_size()
    )
    epochs = {}
    for epoch in range(2):
        loader.set_epoch(epoch)
        epochs[epoch] = [batch["key"] for batch in loader]
    Path(folder, f"rank{rank()}.json").write_text(json.dumps(epochs))


if __name__ == "__main__":
    if sys.argv[2:] == ["count"]:
        _count_main(sys.argv[1])
    else:
        _rank_main(sys.argv[1] if len(sys.argv) > 1 else os.getcwd())

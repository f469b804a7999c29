"""build_loader: exact resume, epoch shuffling, corrupt data, http / pipe shards, presets, bad input."""

from __future__ import annotations

import functools
import http.server
import io
import json
import random
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
import skimage.data
import torch
from PIL import Image

from launch.config import load_config
from launch.data import DataConfig, build_loader, dataset_info
from launch.data.prepare import prepare
from launch.data.shards import BROKEN, read_samples
from launch.data.writer import Item, write_shard
from launch.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sklearn digits as shards: train 1,497 samples in 8 shards (7 x 200 + 97), val 300."""
    out = tmp_path_factory.mktemp("loader") / "digits"
    prepare("digits", out, shard_samples=200)
    return out


def _cfg(source: str | list[str], **kw) -> DataConfig:
    return DataConfig(source=source, **{"workers": 2, "shuffle_buffer": 50, **kw})


def _take(loader, n: int | None = None) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"]
        assert torch.equal(x["label"], y["label"]) and torch.equal(x["image"], y["image"])


@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_resume_yields_exactly_the_uninterrupted_batches(digits: Path, mode: str) -> None:
    cfg = _cfg(str(digits), mode=mode, epoch_samples=400)
    make = functools.partial(build_loader, cfg, "train", preset="pretrain", batch_size=16, img_size=8, seed=3)
    reference = make()
    per_epoch = len(reference)
    full = _take(reference) + _take(reference, 6)  # epoch 0, then 6 batches of epoch 1 in the same workers
    for stop in (5, per_epoch + 3):  # mid epoch 0 (not a multiple of the workers), and inside epoch 1
        first = make()
        _take(first, min(stop, per_epoch))
        if stop > per_epoch:
            _take(first, stop - per_epoch)
        state = first.state_dict()
        _same(_take(first, 3), full[stop : stop + 3])  # a new iter() on the same loader continues too
        resumed = make()
        resumed.load_state_dict(state)
        rest = _take(resumed, max(per_epoch - stop, 0)) if stop < per_epoch else []
        rest += _take(resumed, per_epoch + 6 - max(stop, per_epoch))
        _same(rest, full[stop:])
    assert all(len(b["key"]) == 16 for b in full[:-7])


def test_state_is_a_global_position_and_old_batch_counts_still_load(digits: Path, caplog) -> None:
    make = functools.partial(build_loader, _cfg(str(digits), workers=0), "train", preset="pretrain", img_size=8, seed=3)
    loader = make(batch_size=16)
    _take(loader, 5)
    assert loader.state_dict()["position"] == 80 and loader.batches_left() == len(loader) - 5
    legacy = {"epoch": 0, "consumed": 5, "corrupt": 0, "layout": {"batch_size": 8, "world_size": 2, "workers": 2}}
    resumed = make(batch_size=32)
    resumed.load_state_dict(legacy)  # a checkpoint from before global positions: 5 x 8 x 2 samples
    assert "not sample-exact" in caplog.text
    assert resumed.state_dict()["position"] == 80 and resumed.batches_left() == -(-(1497 - 80) // 32)


@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_a_resume_over_other_shards_of_the_same_total_warns(tmp_path: Path, digits: Path, mode: str, caplog) -> None:
    """Two shards of 200 swapped, or one replaced, leave the total alone but not the samples at a position;
    the same shards read from another folder are the same order."""
    one, two = digits / "train-000000.tar", digits / "train-000001.tar"
    moved = tmp_path / "train-000000.tar"
    moved.write_bytes(one.read_bytes())
    other = tmp_path / "train-000002.tar"
    other.write_bytes((digits / "train-000002.tar").read_bytes())

    def state_of(*shards: Path) -> dict:
        cfg = _cfg("::".join(map(str, shards)), workers=0, mode=mode, epoch_samples=400)
        loader = build_loader(cfg, "train", preset="pretrain", batch_size=16, img_size=8, seed=0)
        _take(loader, 2)
        return loader.state_dict()

    saved = state_of(one, two)
    for shards, warns in (((moved, two), False), ((two, one), True), ((other, two), True)):
        caplog.clear()
        cfg = _cfg("::".join(map(str, shards)), workers=0, mode=mode, epoch_samples=400)
        build_loader(cfg, "train", preset="pretrain", batch_size=16, img_size=8, seed=0).load_state_dict(saved)
        assert ("not sample-exact" in caplog.text) == warns, [s.name for s in shards]


def test_a_resampled_resume_from_0_to_1_worker_replays_the_same_batches_without_a_warning(digits: Path, caplog) -> None:
    """Workers=0 reads in the main process exactly as one worker does: nothing changes, nothing to warn of."""
    make = functools.partial(build_loader, preset="pretrain", batch_size=16, img_size=8, seed=0)
    cfg = _cfg(str(digits), mode="resampled", epoch_samples=160)
    reference = _take(make(cfg.model_copy(update={"workers": 0}), "val"))
    for before, after in ((0, 1), (1, 0)):
        first = make(cfg.model_copy(update={"workers": before}), "val")
        _take(first, 4)
        caplog.clear()
        resumed = make(cfg.model_copy(update={"workers": after}), "val")
        resumed.load_state_dict(first.state_dict())
        assert "not sample-exact" not in caplog.text
        _same(_take(resumed), reference[4:])


def test_shards_without_a_manifest_are_counted_by_rank_0_only(tmp_path: Path, digits: Path, monkeypatch) -> None:
    """Counting a remote shard reads all of it: two ranks must not download the split twice before training.
    A stand-in broadcast hands every rank what rank 0 (built first) sent; every shard open is logged."""
    from launch import dist

    opens = tmp_path / "opens.log"
    spec = f"pipe:f={digits}/train-{{000000..000007}}.tar && echo $f >> {opens} && cat $f"
    sent: list = []
    monkeypatch.setattr(dist, "broadcast_object", lambda obj, src=0: sent[0] if sent else sent.append(obj) or obj)
    loaders = [
        build_loader(
            _cfg(spec, workers=0), "train", preset="pretrain", batch_size=16, img_size=8, seed=0, rank=r, world_size=2
        )
        for r in range(2)
    ]
    assert len(loaders[0]) == len(loaders[1]) == -(-1497 // 32)
    read = [Path(line).name for line in opens.read_text().split()]
    assert [read.count(f"train-{i:06d}.tar") for i in range(1, 8)] == [1] * 7  # shard 0 is also probed once per rank


def test_a_state_taken_at_the_last_batch_does_not_skip_the_next_epoch(digits: Path) -> None:
    make = functools.partial(
        build_loader, _cfg(str(digits), workers=0), "val", preset="pretrain", batch_size=64, img_size=8, seed=0
    )
    loader = make()
    for _ in loader:  # a loop that saves after every batch, the last one included
        state = loader.state_dict()
    assert state["epoch"] == loader.state_dict()["epoch"] == 1 and state["position"] == 0
    again = make()
    again.set_epoch(1)
    assert [b["key"] for b in loader] == [b["key"] for b in again]


def test_a_restored_position_past_the_last_batch_of_this_layout_leaves_none_in_its_epoch(digits: Path) -> None:
    """Samples 272..299 of 300 are not one batch of 32: the restored loader has no batch left in the saved epoch
    (what the trainer counts the resumed step from), and its next pass is the next epoch."""
    make = functools.partial(build_loader, _cfg(str(digits), workers=0), "val", preset="pretrain", img_size=8, seed=0)
    loader = make(batch_size=32, drop_last=True)
    loader.load_state_dict({**make(batch_size=16, drop_last=True).state_dict(), "position": 272})
    assert loader.batches_left() == 0
    epoch1 = make(batch_size=32, drop_last=True)
    epoch1.set_epoch(1)
    assert [b["key"] for b in loader] == [b["key"] for b in epoch1] and len(epoch1) == 9


def test_epochs_reshuffle_inside_persistent_workers_and_seed_fixes_the_order(digits: Path) -> None:
    make = functools.partial(build_loader, _cfg(str(digits)), "train", preset="pretrain", batch_size=32, img_size=8)
    loader = make(seed=0)
    epoch0 = [k for b in _take(loader) for k in b["key"]]
    epoch1 = [k for b in _take(loader) for k in b["key"]]
    assert sorted(epoch0) == sorted(epoch1) and len(set(epoch0)) == len(epoch0) == 1497
    assert epoch0 != epoch1
    again = make(seed=0)
    again.set_epoch(1)
    assert [k for b in _take(again) for k in b["key"]] == epoch1
    assert [k for b in _take(make(seed=1)) for k in b["key"]] != epoch0


def test_eval_reads_every_sample_once_in_a_fixed_order(digits: Path) -> None:
    loader = build_loader(_cfg(str(digits)), "val", preset="eval", batch_size=64, img_size=8, seed=0)
    first, second = _take(loader), _take(loader)
    _same(first, second)
    assert [len(b["key"]) for b in first] == [64, 64, 64, 64, 44]
    assert len({k for b in first for k in b["key"]}) == 300


def test_restart_reads_the_whole_epoch_after_a_partial_pass(digits: Path) -> None:
    """A picture batch taken from the eval loader must not make the next evaluation skip it."""
    loader = build_loader(_cfg(str(digits)), "val", preset="eval", batch_size=64, img_size=8, seed=0)
    full = _take(loader)
    loader.restart(0)
    _take(loader, 1)
    loader.restart(0)
    _same(_take(loader), full)


@pytest.mark.parametrize("preset", ["pretrain", "finetune"])  # finetune seeds the global RNGs timm draws from
def test_reading_in_the_main_process_leaves_the_trainer_rng_alone(digits: Path, preset: str) -> None:
    loader = build_loader(_cfg(str(digits), workers=0), "val", preset=preset, batch_size=100, img_size=8, seed=0)

    def draws() -> tuple:
        return torch.rand(4).tolist(), random.random(), np.random.rand()

    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    expected = draws()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    _take(loader)
    assert draws() == expected


def _photo_items(n: int, start: int) -> list[Item]:
    rng = np.random.default_rng(start)
    photo = skimage.data.astronaut()
    items = []
    for i in range(start, start + n):
        y, x = rng.integers(0, 480, size=2)
        buf = io.BytesIO()
        Image.fromarray(photo[y : y + 32, x : x + 32]).save(buf, "JPEG", quality=90)
        items.append(Item(key=f"photo-{i:04d}", ext="jpg", label=i % 4, size=len(buf.getvalue()), data=buf.getvalue()))
    return items


def _manifest(folder: Path, shards: list[str], counts: list[int], channels: int = 3) -> None:
    (folder / "dataset.json").write_text(
        json.dumps(
            {
                "num_classes": 4,
                "classes": list("abcd"),
                "channels": channels,
                "img_size": [32, 32],
                "mean": [0.5] * channels,
                "std": [0.25] * channels,
                "splits": {"train": {"shards": shards, "samples": counts, "num_samples": sum(counts)}},
            }
        )
    )


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str], int]:
    """3 photo shards of 20: an undecodable JPEG, an empty PNG, a bad label, a missing label, a truncated tar."""
    folder = tmp_path_factory.mktemp("broken")
    shards = [_photo_items(20, 20 * s) for s in range(3)]
    shards[0][4] = Item("photo-bad-jpeg", "jpg", 1, 9, data=b"\xff\xd8garbage")
    shards[0][6] = Item("photo-empty", "png", 1, 0, data=b"")
    shards[1][7] = Item("photo-bad-label", "jpg", 7, shards[1][7].size, data=shards[1][7].data)  # 7 >= 4 classes
    shards[1][9] = Item("photo-no-label", "jpg", -1, shards[1][9].size, data=shards[1][9].data)
    names = [f"train-{i:06d}.tar" for i in range(3)]
    for name, items in zip(names, shards):
        write_shard(folder / name, items)
    data = (folder / names[2]).read_bytes()
    (folder / names[2]).write_bytes(data[: len(data) // 2])
    survived = [s["__key__"] for s in read_samples(str(folder / names[2])) if BROKEN not in s]
    _manifest(folder, names, [20, 20, 20])
    good = {i.key for items in shards[:2] for i in items} - {
        "photo-bad-jpeg",
        "photo-empty",
        "photo-bad-label",
        "photo-no-label",
    }
    return folder, good | set(survived), 4 + 20 - len(survived)


@pytest.mark.parametrize("batch_size", [8, 1])
def test_corrupt_samples_are_skipped_and_counted(broken: tuple[Path, set[str], int], batch_size: int) -> None:
    folder, good, bad = broken
    loader = build_loader(_cfg(str(folder)), "train", preset="pretrain", batch_size=batch_size, img_size=16, seed=0)
    batches = _take(loader)
    assert len(batches) == len(loader) == -(-60 // batch_size)
    keys = [k for b in batches for k in b["key"]]
    assert set(keys) == good and loader.corrupt_samples() == bad
    if batch_size == 8:  # broken samples shrink their batch; one that lost them all holds a single stand-in
        shared = [k for b in batches if len(b["key"]) > 1 for k in b["key"]]
        assert len(shared) == len(set(shared)) and len(set(keys)) == len(good)
    assert loader.state_dict()["corrupt"] == bad


@pytest.fixture(scope="module")
def http_root(digits: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(digits.parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{digits.name}"
    server.shutdown()


def test_http_and_pipe_shards_stream_like_local_files(digits: Path, http_root: str) -> None:
    spec = "/train-{000000..000007}.tar"
    make = functools.partial(build_loader, preset="pretrain", batch_size=64, img_size=8, seed=0)
    local = _take(make(_cfg(str(digits)), "train"))
    _same(_take(make(_cfg(f"{http_root}/dataset.json"), "train")), local)
    info = dataset_info(_cfg(str(digits)))
    stats = {"mean": info.mean, "std": info.std}
    bare = _take(make(_cfg(str(digits) + spec, **stats), "train"))  # no manifest: samples counted, labels kept
    _same(_take(make(_cfg(http_root + spec, **stats), "train")), bare)
    _same(_take(make(_cfg(f"pipe:cat {digits}{spec}", **stats), "train")), bare)
    assert sorted(k for b in bare for k in b["key"]) == sorted(k for b in local for k in b["key"])


@pytest.mark.parametrize("channels", [1, 3])
def test_finetune_preset_runs_timm_augmentation_reproducibly(digits: Path, channels: int) -> None:
    cfg = _cfg(str(digits), channels=channels)
    make = functools.partial(build_loader, cfg, "val", preset="finetune", batch_size=50, img_size=16, seed=0)
    first, second = _take(make()), _take(make())
    _same(first, second)
    assert first[0]["image"].shape == (50, channels, 16, 16) and torch.isfinite(first[0]["image"]).all()
    assert first[0]["image"].dtype == torch.float32 and first[0]["label"].dtype == torch.int64


def test_bad_sources_fail_with_one_line(tmp_path: Path, digits: Path, broken: tuple[Path, set[str], int]) -> None:
    with pytest.raises(ConfigError, match="source"):
        load_config(DataConfig, overrides=["source=''"])
    cases = {
        "mnsit": "unknown source",
        str(tmp_path / "s-{000..003}.tar"): "shard not found",
        str(tmp_path): "holds no",
        "pipe:false": "cannot",
    }
    for source, message in cases.items():
        with pytest.raises(DataError, match=message):
            build_loader(_cfg(source), "train", preset="pretrain", batch_size=4, img_size=8, seed=0)
    with pytest.raises(DataError, match="inconsistent channels"):
        dataset_info(_cfg([str(digits), str(broken[0])]))
    with pytest.raises(DataError, match="split 'test'"):
        build_loader(_cfg(str(digits)), "test", preset="eval", batch_size=4, img_size=8, seed=0)


def test_workers_are_not_forks_of_the_training_process(digits: Path) -> None:
    """A fork of a process whose gloo / NCCL / DeepSpeed threads may hold a lock can deadlock before it
    runs a line (a ZeRO-3 run hung so); workers come from a single-threaded fork server instead."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    loader = build_loader(_cfg(str(digits)), "train", preset="pretrain", batch_size=16, img_size=8, seed=0)
    assert _take(loader, 1)
    new = [p for p in me.children(recursive=True) if p.pid not in before]
    workers = [p for p in new if p.ppid() != me.pid]
    assert len(workers) == 2, [(p.pid, p.ppid(), p.cmdline()[-2:]) for p in new]  # grandchildren: the server's
    # this process's own new children are multiprocessing's fork server and resource tracker only
    assert all("from multiprocessing." in " ".join(p.cmdline()) for p in new if p.ppid() == me.pid)

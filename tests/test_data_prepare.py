"""mae-prepare: built-in MNIST, ImageFolder round trip, and bad input that must touch nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import webdataset as wds
from PIL import Image

from launch.data.prepare import main, prepare

PHOTOS = ("astronaut", "coffee", "rocket", "immunohistochemistry")


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "mnist"
    assert main(["mnist", "--out", str(out)]) == 0
    return out


def test_mnist_has_5000_samples_all_labels_and_plain_webdataset_reads_it(mnist_dir: Path) -> None:
    manifest = json.loads((mnist_dir / "dataset.json").read_text())
    assert {s: v["num_samples"] for s, v in manifest["splits"].items()} == {"train": 4000, "val": 1000}
    assert manifest["channels"] == 1 and manifest["img_size"] == [28, 28] and manifest["num_classes"] == 10
    assert 0.1 < manifest["mean"][0] < 0.16 and 0.28 < manifest["std"][0] < 0.34  # MNIST: 0.1307 / 0.3081
    urls = [str(mnist_dir / n) for s in ("train", "val") for n in manifest["splits"][s]["shards"]]
    labels, keys = [], set()
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("l"):
        assert sample["png"].shape == (28, 28)
        labels.append(int(sample["cls"]))
        keys.add(sample["__key__"])
    assert len(labels) == len(keys) == 5000
    counts = np.bincount(labels, minlength=10)
    assert set(labels) == set(range(10)) and counts.min() > 400
    val_labels = [int(s["cls"]) for s in wds.WebDataset([urls[-1]], shardshuffle=False)]
    assert np.abs(np.bincount(val_labels) / 1000 - counts / 5000).max() < 0.01  # stratified


def test_split_is_seeded_and_shards_reproducible(tmp_path: Path) -> None:
    first, again = prepare("digits", tmp_path / "a"), prepare("digits", tmp_path / "b")
    assert json.loads(first.read_text())["splits"] == json.loads(again.read_text())["splits"]
    assert (tmp_path / "a" / "val-000000.tar").read_bytes() == (tmp_path / "b" / "val-000000.tar").read_bytes()


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/<photo>/<crop>.{jpg,png}: 64x48 crops of real photos; the class is the photo."""
    root = tmp_path_factory.mktemp("photos") / "imagefolder"
    rng = np.random.default_rng(0)
    for name in PHOTOS:
        photo = getattr(skimage.data, name)()
        (root / name).mkdir(parents=True)
        for i in range(12):
            y, x = rng.integers(0, photo.shape[0] - 48), rng.integers(0, photo.shape[1] - 64)
            crop = Image.fromarray(photo[y : y + 48, x : x + 64])
            crop.save(root / name / (f"crop.{i}.jpg" if i % 2 else f"crop_{i}.png"), quality=90)
    return root


def test_image_folder_round_trips_bytes_and_labels(tmp_path: Path, photo_folder: Path) -> None:
    manifest = json.loads(prepare(str(photo_folder), tmp_path / "ds", shard_samples=10, workers=2).read_text())
    assert manifest["classes"] == sorted(PHOTOS) and manifest["channels"] == 3
    assert manifest["splits"]["train"]["samples"] == [10, 10, 10, 10, 8]
    urls = [str(tmp_path / "ds" / n) for n in manifest["splits"]["train"]["shards"]]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False):
        ext = "jpg" if "jpg" in sample else "png"
        cls_name, stem = sample["__key__"].split("/")
        original = photo_folder / cls_name / f"{stem.replace('crop_', 'crop.' if ext == 'jpg' else 'crop_')}.{ext}"
        assert sample[ext] == original.read_bytes()
        assert int(sample["cls"]) == sorted(PHOTOS).index(cls_name)
        seen += 1
    assert seen == 12 * len(PHOTOS)


def test_existing_output_is_never_touched(tmp_path: Path, mnist_dir: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in mnist_dir.iterdir()}
    with pytest.raises(SystemExit) as exit_info:
        main(["digits", "--out", str(mnist_dir)])
    assert exit_info.value.code == 2
    assert {p.name: p.stat().st_mtime_ns for p in mnist_dir.iterdir()} == before
    assert not [p for p in mnist_dir.parent.iterdir() if p.name.startswith(".")]  # no temp left behind


def test_overwrite_replaces(tmp_path: Path) -> None:
    out = tmp_path / "d"
    prepare("digits", out, shard_samples=2000)
    prepare("digits", out, shard_samples=500, overwrite=True)
    assert sorted(p.name for p in out.glob("train-*.tar")) == [f"train-{i:06d}.tar" for i in range(3)]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


@pytest.mark.parametrize("case", ["unknown", "empty", "exists", "mixed_channels"])
def test_bad_input_is_one_line_exit_2(tmp_path: Path, case: str, capsys: pytest.CaptureFixture) -> None:
    source, out = "mnsit", tmp_path / "out"
    if case == "empty":
        source = str(tmp_path / "empty")
        (tmp_path / "empty" / "cls").mkdir(parents=True)
    elif case == "exists":
        source = "digits"
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "mixed_channels":
        source = str(tmp_path / "mixed")
        (tmp_path / "mixed" / "a").mkdir(parents=True)
        Image.fromarray(skimage.data.camera()[:32, :32]).save(tmp_path / "mixed" / "a" / "gray.png")
        Image.fromarray(skimage.data.astronaut()[:32, :32]).save(tmp_path / "mixed" / "a" / "rgb.png")
    with pytest.raises(SystemExit) as exit_info:
        main([source, "--out", str(out)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mae-prepare: error: "), lines
    expected = {
        "unknown": "unknown source",
        "empty": "holds no images",
        "exists": "output folder exists",
        "mixed_channels": "inconsistent channels",
    }[case]
    assert expected in lines[0]
    if case == "exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_two_processes_preparing_at_once_leave_one_complete_dataset(tmp_path: Path) -> None:
    code = (
        "import sys; from launch.data import DataConfig, dataset_info; "
        "print(dataset_info(DataConfig(source='digits', root=sys.argv[1])).splits)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outputs[0] == outputs[1] == "{'train': 1497, 'val': 300}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]
    assert (tmp_path / "digits" / "dataset.json").is_file()


def test_second_publisher_keeps_the_first_dataset(tmp_path: Path) -> None:
    from launch.data.writer import publish, temp_dir_for

    out = tmp_path / "ds"
    first, second = temp_dir_for(out), temp_dir_for(out)
    for tmp, tag in ((first, "first"), (second, "second")):
        (tmp / "dataset.json").write_text(tag)
    assert publish(first, out, overwrite=False) is True
    assert publish(second, out, overwrite=False) is False
    assert (out / "dataset.json").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]

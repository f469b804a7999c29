"""The rehearsal (see ``tests/rehearsal.py``): every shipped config and launch file, in miniature.

    python -m pytest -m rehearsal -p no:cacheprovider               # the whole matrix (<= 20 min, 2 cores)
    python -m pytest -m rehearsal -k zero3-bf16 -p no:cacheprovider # one cell

The default suite runs the rule below and one fast cell per backend (``smoke-ddp``,
``smoke-deepspeed``); a cell's commands and their output stay in its pytest tmp folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from distrun import TORCHRUN
from rehearsal import (
    BASELINE_COMMON,
    BASELINES,
    CELLS,
    CROP,
    ROOT,
    Runner,
    rehearsed_files,
    run_cell,
    shipped_files,
)

from benchmarks.data_loader import shipped_photos, write_photo_folder
from launch.data.prepare import main as mae_prepare

#: runs every baseline recipe in one interpreter: ``mae-baseline``'s own parse-and-run function per recipe
BASELINES_DRIVER = """import json, sys
from baselines.__main__ import run_cli
for argv in json.loads(sys.argv[1]):
    assert run_cli(argv) == 0
"""


#: train crops (an odd count with the corrupt JPEG: 80 + 1) and val crops
TRAIN_CROPS, VAL_CROPS = 80, 27


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real-photo ImageFolder written as shards by ``mae-prepare``: crops of the ~27 photos
    scikit-image and scikit-learn ship (one class per photo), sides 157-291 px around 224
    (many sizes, so the median is not the model's), 81 training files of which one is a
    corrupt JPEG, then one training shard truncated to half its bytes. Returns the shard folder."""
    root = tmp_path_factory.mktemp("rehearsal-photos")
    photos = list(shipped_photos(min_side=160).values())
    folder = root / "photos"
    write_photo_folder(folder / "train", TRAIN_CROPS, seed=0, photos=photos, size=(CROP, CROP), jitter=0.3)
    write_photo_folder(folder / "val", VAL_CROPS, seed=1, photos=photos, size=(CROP, CROP), jitter=0.3)
    (folder / "train" / "photo0" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG after its first marker")
    shards = root / "shards"
    assert mae_prepare([str(folder), "--out", str(shards), "--shard-samples", "16"]) == 0
    truncated = shards / "train-000001.tar"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    return shards


@pytest.fixture(scope="session")
def mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``data.root`` holding the shipped MNIST digits prepared by ``mae-prepare mnist``."""
    root = tmp_path_factory.mktemp("rehearsal-mnist")
    assert mae_prepare(["mnist", "--out", str(root / "mnist")]) == 0
    return root


def _cells(fast: bool) -> list:
    marks = [pytest.mark.dist] if fast else [pytest.mark.rehearsal, pytest.mark.dist]
    return [pytest.param(name, marks=marks, id=name) for name, cell in CELLS.items() if cell.fast == fast]


@pytest.mark.parametrize("name", _cells(fast=False) + _cells(fast=True))
def test_cell(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Exit 0 at every stage, exports that load in plain timm, a finite loss that falls."""
    photos = request.getfixturevalue("photos") if CELLS[name].data == "photos" else None
    run_cell(name, photos, request.getfixturevalue("mnist"), tmp_path)


@pytest.mark.rehearsal
@pytest.mark.dist
def test_every_baseline_recipe(mnist: Path, tmp_path: Path) -> None:
    """Every ``configs/baselines`` recipe through ``mae-baseline``'s own entry function, in one
    2-process launch (a torchrun start per recipe would cost more than the twelve runs)."""
    runs = [
        [name, *BASELINE_COMMON, *extra, f"data.root={mnist}", f"run_root={tmp_path / 'runs'}"]
        for name, extra in BASELINES.items()
    ]
    script = tmp_path / "baselines_driver.py"
    script.write_text(BASELINES_DRIVER)
    cmd = [
        *TORCHRUN,
        str(script),
        json.dumps(runs),
    ]
    Runner(tmp_path).run("mae-baseline", cmd)
    for name, extra in BASELINES.items():
        assert (tmp_path / "runs" / name / "results.json").is_file(), name
        # the recipe file itself ran: its model settings (those the run did not override) are the run's
        shipped = yaml.safe_load((ROOT / "configs" / "baselines" / f"{name}.yaml").read_text())["model"]
        saved = min((tmp_path / "runs" / name).rglob("config.yaml"))  # a sweep saves one per point
        ran = yaml.safe_load(saved.read_text())["model"]
        kept = {k: v for k, v in shipped.items() if not any(e.startswith(f"model.{k}=") for e in extra)}
        assert {k: ran[k] for k in kept} == kept, name


def test_every_shipped_file_is_rehearsed() -> None:
    """A file added under configs/, or a launch file (anything but Python) under launch/, needs a
    cell (CELLS / BASELINES in tests/rehearsal.py) that runs it; cells name only existing files."""
    shipped, rehearsed = shipped_files(), rehearsed_files()
    assert not shipped - rehearsed, f"not run by the rehearsal: {sorted(shipped - rehearsed)}"
    assert not rehearsed - shipped, f"the rehearsal names missing files: {sorted(rehearsed - shipped)}"
    assert all((ROOT / f).is_file() for f in rehearsed)

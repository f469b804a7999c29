"""``launch.fileio.replacing``: the one way a file or folder is written in place."""

import os
from pathlib import Path

import pytest

from launch.fileio import OLD_PREFIX, TMP_PREFIX, replacing, write_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "grid.png"
    write_atomic(path, "old")
    with pytest.raises(RuntimeError), replacing(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_a_folder_replaces_a_folder(tmp_path: Path) -> None:
    out = tmp_path / "export"
    for text in ("first", "second"):
        with replacing(out) as tmp:
            tmp.mkdir()
            (tmp / "config.json").write_text(text)
    assert (out / "config.json").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def _export(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text(text)


def test_a_folder_replacement_whose_rename_fails_keeps_the_old_folder(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "export"
    _export(out, "old")
    real = os.replace

    def failing(src, dst):
        if Path(src).name.startswith(TMP_PREFIX):  # the new folder's rename
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        _export(out, "new")
    assert (out / "config.json").read_text() == "old"


def test_a_folder_replacement_killed_between_its_renames_is_recovered_by_the_next(tmp_path: Path) -> None:
    out = tmp_path / "export"
    _export(out, "old")
    os.replace(out, tmp_path / f"{OLD_PREFIX}export")  # the old folder set aside, then SIGKILL
    with pytest.raises(RuntimeError), replacing(out):
        raise RuntimeError("this attempt fails too")
    assert (out / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]

"""``launch.fileio.replacing``: the one way a file or folder is written in place."""

from pathlib import Path

import pytest

from launch.fileio import replacing, write_atomic


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

"""Writes that survive a kill: the one way this project writes a small file (a config, a card,
a checkpoint's marker and pointer) so that no reader ever sees half of it."""

from __future__ import annotations

import os
from pathlib import Path

#: prefix of files and directories being written; a checkpoint directory's start removes leftovers
TMP_PREFIX = ".tmp-"


def write_synced(path: Path, text: str) -> None:
    """Write ``text`` and fsync it: for files inside a directory that is itself published by a rename."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically and durably: a hidden sibling is written and fsync'd,
    renamed over ``path``, and the directory fsync'd, so a kill leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    write_synced(tmp, text)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

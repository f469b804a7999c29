"""Writes that survive a kill: the one way this project writes a file or a folder in place (a config,
a card, a picture, an export, a checkpoint's marker and pointer) so that no reader ever sees half of it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: prefix of files and directories being written; a checkpoint directory's start removes leftovers
TMP_PREFIX = ".tmp-"
#: prefix of a folder set aside while its replacement is renamed in
OLD_PREFIX = ".old-"


def write_synced(path: Path, text: str) -> None:
    """Write ``text`` and fsync it: for files inside a directory that is itself published by a rename."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically and durably (:func:`replacing`)."""
    with replacing(path) as tmp:
        write_synced(tmp, text)


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yields a hidden sibling of ``path`` for the block to write (a file or a folder); after the block
    it is fsync'd, renamed over ``path`` and the directory fsync'd, so a kill leaves the old ``path`` or
    the new one. A block that raises leaves ``path`` as it was and no temporary behind.

    A rename replaces a file or an empty folder only, so an old folder is first renamed aside: a kill
    between the two renames leaves it there, and the next ``replacing(path)`` puts it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = path.with_name(f"{TMP_PREFIX}{path.name}"), path.with_name(f"{OLD_PREFIX}{path.name}")
    if old.exists() and not path.exists():  # a killed earlier replacement's
        os.replace(old, path)
    _remove(tmp)
    _remove(old)
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        _remove(tmp)
        raise
    aside = path.is_dir()
    if aside:
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if aside:
            os.replace(old, path)
        _remove(tmp)
        raise
    fsync_dir(path.parent)
    _remove(old)


def fsync_tree(root: Path) -> None:
    """fsync ``root`` (a file, or a folder and everything below it): files written by other code
    (DeepSpeed, safetensors, PIL) may still sit in the page cache."""
    files = [root] if root.is_file() else [p for p in sorted(root.rglob("*")) if p.is_file()]
    for path in files:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    if root.is_dir():
        for path in sorted({p.parent for p in root.rglob("*")} | {root}):
            fsync_dir(path)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()

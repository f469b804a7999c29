"""The checkpoint layout's names, and writes that reach the disk before they return."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from launch.errors import CheckpointError
from launch.fileio import TMP_PREFIX as TMP_PREFIX  # the layout names it; fileio owns it
from launch.fileio import fsync_tree as fsync_tree  # the save protocol uses it; fileio owns it

COMPLETE, META, LATEST, TRAINER_FILE = "COMPLETE", "meta.json", "latest", "trainer.pt"
STEP_RE = re.compile(r"^step-(\d{8,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def rank_file(ckpt: Path, rank: int) -> Path:
    return Path(ckpt) / f"rank-{rank:05d}.pt"


def save_file(obj: Any, path: Path) -> None:
    """``torch.save`` that reaches the disk before returning (flush + fsync). A failed
    write raises the ``OSError`` itself ("No space left on device"), not torch's
    "unexpected pos" from its C++ writer."""
    with open(path, "wb") as f:
        sink = _Sink(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise
        f.flush()
        os.fsync(f.fileno())


class _Sink:
    """A file wrapper that remembers the ``OSError`` torch's writer swallows."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def load_file(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers, no code runs."""
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a truncated or foreign file: the message is the story
        raise CheckpointError(f"cannot read checkpoint file {path}: {str(err).splitlines()[0]}") from None


def is_complete(ckpt: Path) -> bool:
    return (ckpt / COMPLETE).is_file() and (ckpt / META).is_file() and STEP_RE.match(ckpt.name) is not None


def read_meta(ckpt: Path) -> dict[str, Any]:
    if not is_complete(ckpt):
        raise CheckpointError(f"{ckpt} is not a complete checkpoint (no {COMPLETE} marker); use a step-* directory")
    return json.loads((ckpt / META).read_text())

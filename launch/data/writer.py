"""Writing WebDataset shards: cut items into size-limited tars, write them in parallel,
then publish the whole folder with one rename (the manifest is written before it).

A sample is two tar members, ``<key>.<ext>`` (the image bytes) and ``<key>.cls``
(the integer label, absent for unlabeled data). Next to each ``<shard>.tar`` goes
``<shard>.tar.idx``, a JSON list of the byte where each sample's first member header
starts, so a remote reader can begin mid-shard with an HTTP Range request.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from launch.errors import DataError

log = logging.getLogger(__name__)
MANIFEST = "dataset.json"
INDEX_SUFFIX = ".idx"  # <shard><suffix>: sample byte offsets (the manifest's "index_suffix")
_BLOCK = 512


@dataclass(frozen=True)
class Item:
    """One sample to write: image bytes in memory (``data``) or a file copied as-is (``path``)."""

    key: str
    ext: str
    label: int  # -1 = unlabeled
    size: int
    data: bytes | None = None
    path: str | None = None

    def read(self) -> bytes:
        return self.data if self.data is not None else Path(self.path).read_bytes()  # type: ignore[arg-type]


def _tar_bytes(item: Item) -> int:
    padded = -(-item.size // _BLOCK) * _BLOCK
    return _BLOCK + padded + (2 * _BLOCK if item.label >= 0 else 0)


def cut_shards(items: Iterable[Item], max_samples: int, max_bytes: int) -> Iterator[list[Item]]:
    """Consecutive groups of items, each under both limits (a single oversized item gets its own shard)."""
    shard: list[Item] = []
    size = 0
    for item in items:
        cost = _tar_bytes(item)
        if shard and (len(shard) >= max_samples or size + cost > max_bytes):
            yield shard
            shard, size = [], 0
        shard.append(item)
        size += cost
    if shard:
        yield shard


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(payload), 0o444, 0  # fixed metadata: identical input -> identical shard
    tar.addfile(info, io.BytesIO(payload))


def write_shard(path: Path, items: list[Item], transcode: Any = None) -> int:
    """Write one tar; ``transcode(bytes) -> (ext, bytes)`` re-encodes images when given (an image it
    cannot decode is left out with a warning), and its sample index. Returns the samples written."""
    starts = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for item in items:
            try:
                ext, payload = (item.ext, item.read()) if transcode is None else transcode(item.read())
            except (RuntimeError, ValueError):
                log.warning("cannot re-encode %s; left out", item.path or item.key)
                continue
            starts.append(tar.offset)  # where this sample's first header goes
            _add(tar, f"{item.key}.{ext}", payload)
            if item.label >= 0:
                _add(tar, f"{item.key}.cls", str(item.label).encode())
    Path(f"{path}{INDEX_SUFFIX}").write_text(json.dumps(starts))
    return len(starts)


def write_split(
    tmp: Path, split: str, items: list[Item], *, max_samples: int, max_bytes: int, workers: int, transcode: Any = None
) -> tuple[list[str], list[int]]:
    """Write ``<split>-%06d.tar`` files into ``tmp``; returns shard names and samples per shard."""
    shards = list(cut_shards(items, max_samples, max_bytes))
    names = [f"{split}-{i:06d}.tar" for i in range(len(shards))]
    counts = []
    with tqdm(total=len(items), desc=f"writing {split}", unit="img", disable=None) as bar:
        if workers <= 1:
            for name, shard in zip(names, shards):
                counts.append(write_shard(tmp / name, shard, transcode))
                bar.update(len(shard))
        else:
            with ProcessPoolExecutor(workers) as pool:
                jobs = [pool.submit(write_shard, tmp / name, shard, transcode) for name, shard in zip(names, shards)]
                for job, shard in zip(jobs, shards):
                    counts.append(job.result())
                    bar.update(len(shard))
    return names, counts


def temp_dir_for(out: Path) -> Path:
    """A hidden sibling of ``out`` (same filesystem, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def publish(tmp: Path, out: Path, overwrite: bool) -> bool:
    """Rename the finished ``tmp`` to ``out``. False if another process published ``out`` first."""
    old = None
    if overwrite and out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    try:
        tmp.rename(out)  # fails on a non-empty ``out``: whoever renamed first wins
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            old.rename(out)
        if (out / MANIFEST).is_file():
            return False
        raise DataError(
            f"output folder {out} appeared while writing and holds no {MANIFEST}; nothing was replaced"
        ) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return True

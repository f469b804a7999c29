"""``DatasetInfo`` and resolving ``DataConfig.source`` to shard URLs per split.

A source entry is one of: a built-in name (prepared under ``root`` on first use), a
dataset folder or ``dataset.json`` (local or http(s)), or a shard spec. Built-in
preparation is safe when several processes start at once: each writes a private
temporary folder and the first rename wins.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from webdataset.gopen import gopen

from launch.data.config import BUILTIN_SOURCES, DataConfig
from launch.data.shards import BROKEN, expand_spec, is_remote, read_samples
from launch.data.writer import MANIFEST
from launch.errors import ConfigError, DataError

log = logging.getLogger(__name__)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int  # 0 = unlabeled or unknown (labels then read as -1 when absent)
    class_names: list[str]
    channels: int
    img_size: tuple[int, int]  # (H, W), median of a sample
    mean: tuple[float, ...]
    std: tuple[float, ...]
    splits: dict[str, int]  # split -> samples; empty for shard specs without a manifest
    source: str = ""


@dataclass(frozen=True)
class Part:
    """One entry of ``source``: a manifest (with its folder/URL base) or a bare shard spec."""

    name: str
    manifest: dict[str, Any] | None = None
    base: str = ""
    spec: str = ""
    probe: dict[str, Any] = field(default_factory=dict)

    @property
    def index_suffix(self) -> str:
        """``<shard><suffix>`` holds the shard's sample byte offsets ("" = no index)."""
        return str(self.manifest.get("index_suffix", "")) if self.manifest else ""

    def shards(self, split: str) -> tuple[list[str], list[int] | None]:
        if self.manifest is None:
            if "{split}" not in self.spec and split != "train":
                raise DataError(
                    f"shard spec '{self.spec}' has no '{{split}}' placeholder, so it only serves split "
                    f"'train', not '{split}'"
                )
            return expand_spec(self.spec.replace("{split}", split)), None
        splits = self.manifest["splits"]
        if split not in splits:
            raise DataError(f"split '{split}' is not in {self.name} (it has: {', '.join(splits)})")
        return [f"{self.base}/{name}" for name in splits[split]["shards"]], list(splits[split]["samples"])


def _read_manifest(location: str) -> dict[str, Any]:
    try:
        with gopen(location, "rb") if is_remote(location) else open(location, "rb") as stream:
            manifest = json.loads(stream.read())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read manifest {location}: {err}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise DataError(f"{location} is not a dataset manifest (no 'splits' mapping)")
    return manifest


def _builtin(name: str, root: str) -> Part:
    folder = Path(root) / name
    if not (folder / MANIFEST).is_file():
        if folder.exists() and any(folder.iterdir()):
            raise DataError(f"{folder} exists but holds no {MANIFEST}; remove it or set data.root elsewhere")
        from launch.data.prepare import prepare

        log.info("preparing the built-in '%s' dataset under %s (first use)", name, folder)
        prepare(name, folder)
    return Part(name, _read_manifest(str(folder / MANIFEST)), str(folder))


def _probe(spec: str) -> dict[str, Any]:
    """Channels and size of the first sample of a manifest-less spec (decoded once)."""
    from launch.data.transforms import IMAGE_KEYS, decode

    url = expand_spec(spec.replace("{split}", "train"))[0]
    for sample in read_samples(url, 0, 1):
        data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if BROKEN in sample or data is None:
            break
        img = decode(data, 3)
        gray = bool((img[0] == img[1]).all() and (img[1] == img[2]).all())
        return {"channels": 1 if gray else 3, "img_size": list(img.shape[1:])}
    raise DataError(f"cannot read a first image from {url} to learn its channels; write a manifest with mae-prepare")


def resolve_part(entry: str, root: str) -> Part:
    if entry in BUILTIN_SOURCES:
        return _builtin(entry, root)
    if entry.endswith(".json"):
        return Part(entry, _read_manifest(entry), entry.rsplit("/", 1)[0] if "/" in entry else ".")
    if not is_remote(entry) and (Path(entry) / MANIFEST).is_file():
        return Part(entry, _read_manifest(str(Path(entry) / MANIFEST)), entry.rstrip("/"))
    if not is_remote(entry) and not any(c in entry for c in "{*:") and not Path(entry).exists():
        raise DataError(
            f"unknown source '{entry}': not a built-in ({', '.join(BUILTIN_SOURCES)}), folder, manifest or shard"
        )
    return Part(entry, spec=entry, probe=_probe(entry))


def resolve_parts(cfg: DataConfig) -> list[Part]:
    entries = [cfg.source] if isinstance(cfg.source, str) else list(cfg.source)
    return [resolve_part(entry.strip(), cfg.root) for entry in entries]


def dataset_info(cfg: DataConfig, parts: list[Part] | None = None) -> DatasetInfo:
    """Facts about the data of ``cfg``; prepares a built-in source on first use."""
    parts = parts if parts is not None else resolve_parts(cfg)
    infos = [_part_info(p) for p in parts]
    for other in infos[1:]:
        if other.channels != infos[0].channels:
            raise DataError(
                f"inconsistent channels: {infos[0].source} has {infos[0].channels}, "
                f"{other.source} has {other.channels}; set data.channels to convert on read"
            )
        if other.class_names != infos[0].class_names:
            raise DataError(f"inconsistent classes between {infos[0].source} and {other.source}")
    splits = {s: sum(i.splits.get(s, 0) for i in infos) for s in infos[0].splits if all(s in i.splits for i in infos)}
    return _override(replace(infos[0], splits=splits, source=", ".join(i.source for i in infos)), cfg)


def _part_info(part: Part) -> DatasetInfo:
    m = part.manifest
    if m is None:
        channels = part.probe["channels"]
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))
        log.info("%s has no manifest: assuming mean %s, std %s (set data.mean / data.std)", part.name, mean, std)
        return DatasetInfo(0, [], channels, tuple(part.probe["img_size"]), mean, std, {}, part.name)
    return DatasetInfo(
        int(m.get("num_classes", 0)),
        list(m.get("classes", [])),
        int(m["channels"]),
        tuple(m["img_size"]),
        tuple(m["mean"]),
        tuple(m["std"]),
        {s: int(v["num_samples"]) for s, v in m["splits"].items()},
        part.name,
    )


def _override(info: DatasetInfo, cfg: DataConfig) -> DatasetInfo:
    """Apply data.channels / data.mean / data.std; a channel change averages or repeats the stats."""
    channels = cfg.channels or info.channels
    mean, std = info.mean, info.std
    if channels != info.channels:
        avg = lambda v: (sum(v) / len(v),)  # noqa: E731
        mean, std = (avg(mean), avg(std)) if channels == 1 else (mean * 3, std * 3)
    mean, std = cfg.mean or mean, cfg.std or std
    for name, value in (("mean", mean), ("std", std)):
        if len(value) != channels:
            raise ConfigError(f"data.{name} has {len(value)} values but the data has {channels} channels")
    return replace(info, channels=channels, mean=tuple(mean), std=tuple(std))

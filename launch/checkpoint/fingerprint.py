"""What a checkpoint must share with a run to resume it, and the one line that says what differs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from launch.config import flatten
from launch.errors import CheckpointError


def fingerprint(model: nn.Module, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint must share with a run to resume it: the task class, every
    parameter and buffer shape (ZeRO-3's full ``ds_shape``, not the local shard), and
    ``settings`` (dotted keys such as ``model.embed_dim``, ``world_size``)."""
    fp: dict[str, Any] = {"task": type(model).__name__}
    fp.update(flatten(settings or {}))
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        fp[f"shape of {name}"] = list(getattr(tensor, "ds_shape", tensor.shape))
    return fp


def check_compatible(ckpt: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise a one-line :class:`CheckpointError` naming what differs (settings first)."""
    keys = sorted(saved.keys() | current.keys(), key=lambda k: (k.startswith("shape of "), k))
    diffs = [k for k in keys if saved.get(k, _ABSENT) != current.get(k, _ABSENT)]
    if not diffs:
        return
    shown = "; ".join(
        f"checkpoint has {k}={_show(saved.get(k, _ABSENT))}, this run has {_show(current.get(k, _ABSENT))}"
        for k in diffs[:3]
    )
    more = f" (and {len(diffs) - 3} more differences)" if len(diffs) > 3 else ""
    raise CheckpointError(
        f"cannot resume from {ckpt}: {shown}{more}. To start from its weights only, use a new run_dir "
        f"with trainer.checkpoint.weights_only={ckpt}"
    )


_ABSENT = object()


def _show(value: Any) -> str:
    return "<absent>" if value is _ABSENT else json.dumps(value)

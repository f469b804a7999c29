"""Validation metrics and picture grids between training steps.

Both run in eval mode under a forked RNG with a fixed seed: the same masks every time, and the
training RNG stream is untouched (a resumed run stays bit-identical). Under ZeRO-3 / FSDP they read
weights outside the forward (``Backend.outside_forward``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from launch.backend import Backend
from launch.task import Task


@torch.no_grad()
def evaluate(
    model: nn.Module, task: Task, backend: Backend, loader: Any, *, batches: int | None, seed: int
) -> dict[str, float]:
    """Mean of ``task.eval_step``'s sums over the first ``batches`` batches of ``loader`` (None: all), summed
    over ranks and divided by the summed ``"count"``. ``model`` is the wrapped ``task``."""
    sums: dict[str, Tensor] = {}
    with _offline(model, backend, seed):
        loader.restart(0)
        for batch in itertools.islice(loader, batches):
            for name, value in task.eval_step(backend.to_device(batch)).items():
                sums[name] = sums.get(name, 0.0) + value.float()
    totals = {k: v.item() for k, v in backend.all_reduce(sums).items()}
    count = totals.pop("count", 0.0) or 1.0
    return {k: v / count for k, v in totals.items()}


@torch.no_grad()
def pictures(model: nn.Module, task: Task, backend: Backend, loader: Any, *, seed: int) -> dict[str, Tensor]:
    """``task.pictures`` of ``loader``'s first batch: name -> (3, H, W) in [0, 1]."""
    with _offline(model, backend, seed):
        loader.restart(0)
        return task.pictures(backend.to_device(next(iter(loader))))


@contextmanager
def _offline(model: nn.Module, backend: Backend, seed: int) -> Iterator[None]:
    """Eval mode, weights readable, a forked RNG seeded with ``seed``; training mode again after."""
    model.eval()
    devices = [backend.device.index or 0] if backend.device.type == "cuda" else []
    with backend.outside_forward(model), torch.random.fork_rng(devices=devices), backend.autocast():
        torch.manual_seed(seed)
        yield
    model.train()

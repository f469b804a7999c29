"""Step metrics between log points: device-side sums, one all-reduce and one host read per
interval, throughput (images/s over all ranks), FLOP/s and MFU; host counters (e.g. skipped
samples) ride along in the same all-reduce and are reported summed over ranks."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from launch import dist
from launch.backend import Backend
from launch.flops import mfu

#: counters reported as totals over the interval, not per-step means
TOTALS = ("skipped_steps",)


class StepMeter:
    """``add`` after every optimizer step (no host sync); ``read`` at log steps (syncs)."""

    def __init__(
        self,
        backend: Backend,
        *,
        global_batch: int,
        flops_per_image: float | None,
        peak_flops: float | None,
        step: int = 0,
    ) -> None:
        self.backend, self.global_batch = backend, global_batch
        self.flops_per_image, self.peak = flops_per_image, peak_flops  # peak: all ranks together
        self._sums: dict[str, Tensor] = {}
        self._since = (step, time.perf_counter())
        self._intervals: list[tuple[int, float]] = []  # (images, seconds) per interval

    def restart(self, step: int) -> None:
        self._sums, self._since = {}, (step, time.perf_counter())

    def add(self, metrics: dict[str, Tensor], prefix: str = "") -> None:
        for name, value in metrics.items():
            self._sums[prefix + name] = self._sums.get(prefix + name, 0.0) + value

    def read(self, step: int, counts: dict[str, int] | None = None) -> dict[str, float | None]:
        """Means over the interval's steps and over ranks, plus throughput; ``counts`` (this rank's
        host numbers) come back summed over ranks. Resets the interval."""
        steps, world, counts = max(1, step - self._since[0]), dist.world_size(), counts or {}
        sums = {k: torch.as_tensor(v) for k, v in self._sums.items()}
        sums.update({k: torch.tensor(float(v), device=self.backend.device) for k, v in counts.items()})
        reduced = self.backend.all_reduce(sums, op="sum")
        per = {k: 1 if k in counts else world * (1 if k in TOTALS else steps) for k in reduced}
        metrics: dict[str, float | None] = {k: v.item() / per[k] for k, v in reduced.items()}
        seconds = time.perf_counter() - self._since[1]  # after .item(): the device work is done
        images = (step - self._since[0]) * self.global_batch
        self._intervals.append((images, seconds))
        metrics.update(self.throughput(images / seconds if seconds > 0 else float("nan")))
        self.restart(step)
        return metrics

    def throughput(self, images_per_s: float) -> dict[str, float | None]:
        flops = self.flops_per_image
        return {
            "images_per_s": images_per_s,
            "flops_per_s": images_per_s * flops if flops else None,
            "mfu": mfu(images_per_s, flops, self.peak),
        }

    def summary(self) -> dict[str, float | None]:
        """Throughput of the whole run, leaving out the first interval (compilation, warm caches)."""
        kept = self._intervals[1:] or self._intervals
        images, seconds = sum(i for i, _ in kept), sum(s for _, s in kept)
        return self.throughput(images / seconds if seconds > 0 else float("nan"))

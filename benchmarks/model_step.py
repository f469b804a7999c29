"""Timing a training step: settings, contenders, alternating timed runs, medians.

A *contender* is one model + optimizer + fixed batch behind a ``step()`` that does one
full optimizer step (forward, loss, backward, AdamW) with no host sync inside. Contenders
in one :func:`race` run in turns (A B, then B A, ...) so that slow drift of a shared
machine hits all of them alike; each reports the median over its timed runs.
Timed regions are bracketed by ``torch.cuda.synchronize`` on GPU; warmup is excluded.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from benchmarks.memory import peak_memory_mb, reset_peak_memory
from launch.backend import cpu_has_native_bf16
from launch.flops import mfu

Precision = Literal["fp32", "bf16"]


@dataclass(frozen=True)
class Settings:
    """How a step runs. ``fused_optimizer=None`` is PyTorch's default AdamW implementation."""

    precision: Precision = "fp32"
    compile: bool = False
    fused_optimizer: bool | None = None
    fused_attn: bool = True
    sync_every_step: bool = False  # read the loss on the host every step (what to avoid)
    boolean_mask_loss: bool = False  # loss via boolean indexing (dynamic shape) instead of a where-sum
    full_prediction_loss: bool = False  # predict every patch, mask the loss (mae_loss) instead of removed-only
    rng_masks: bool = False  # masks from torch.rand instead of the per-sample seeds the loader sends

    def label(self) -> str:
        parts = [self.precision, "compile" if self.compile else "eager"]
        parts += ["fused-adamw"] if self.fused_optimizer else []
        parts += [] if self.fused_attn else ["explicit-attn"]
        parts += ["sync-each-step"] if self.sync_every_step else []
        parts += ["bool-mask-loss"] if self.boolean_mask_loss else []
        parts += ["full-pred-loss"] if self.full_prediction_loss else []
        parts += ["rng-masks"] if self.rng_masks else []
        return " ".join(parts)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)


def default_settings(device: torch.device) -> Settings:
    """This project's fast settings per device, as measured by the ``levers`` section.

    CUDA: bf16 autocast, flash attention through SDPA, torch.compile, fused AdamW.
    CPU with native bf16 (AVX512-BF16 / AMX): bf16 autocast with timm's explicit attention
    (PyTorch's CPU flash-attention kernel is slower in bf16 on the short MAE sequences) and
    fused AdamW; no compile (minutes of compilation on a small CPU for a few % per step).
    Other CPUs: fp32 with SDPA and fused AdamW.
    """
    if device.type == "cuda":
        return Settings(precision="bf16", compile=True, fused_optimizer=True)
    if cpu_has_native_bf16():
        return Settings(precision="bf16", fused_optimizer=True, fused_attn=False)
    return Settings(fused_optimizer=True)


@dataclass
class Contender:
    """One thing to time. ``step()`` runs one optimizer step on a fixed batch of ``batch_size``."""

    name: str
    step: Callable[[], None]
    batch_size: int
    flops_per_image: float | None
    params: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Measurement:
    name: str
    images_per_s: float  # median over timed runs
    step_ms: float
    runs_images_per_s: list[float]
    images_per_cpu_s: float  # per second of process CPU time: steadier than wall time on a shared machine
    warmup_s: float  # includes compilation
    peak_memory_mb: float
    flops_per_image: float | None
    achieved_tflops: float | None
    mfu: float | None
    params_m: float
    info: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(
    module: nn.Module, loss_fn: Callable[[], Tensor], device: torch.device, settings: Settings
) -> Callable[[], None]:
    """One AdamW step (MAE paper hyper-parameters) on ``loss_fn()``; no host sync unless asked."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=settings.fused_optimizer)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device, settings.precision):
            loss = loss_fn()
        loss.backward()
        opt.step()
        if settings.sync_every_step:
            loss.item()  # a host sync: the pattern the trainer avoids outside log steps

    return step


def _timed(step: Callable[[], None], steps: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``steps`` steps."""
    synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu


def _warm(contender: Contender, warmup: int, device: torch.device) -> tuple[float, float]:
    """Warm up (compile, allocator, caches) and record peak memory meanwhile."""
    reset_peak_memory(device)
    seconds = _timed(contender.step, max(warmup, 1), device)[0]
    return seconds, peak_memory_mb(device)


def _turns(contenders: list[Contender], repeats: int) -> Iterator[Contender]:
    for r in range(repeats):
        yield from (contenders if r % 2 == 0 else contenders[::-1])


def race(
    contenders: list[Contender],
    *,
    warmup: int,
    steps: int,
    repeats: int,
    device: torch.device,
    peak: float | None = None,
) -> list[Measurement]:
    """Time each contender ``repeats`` times (``steps`` steps each), in alternating order."""
    warm = {c.name: _warm(c, warmup, device) for c in contenders}
    seconds: dict[str, list[tuple[float, float]]] = {c.name: [] for c in contenders}
    for contender in _turns(contenders, repeats):
        seconds[contender.name].append(_timed(contender.step, steps, device))
    return [_measure(c, seconds[c.name], steps, warm[c.name], peak) for c in contenders]


def _measure(
    c: Contender, seconds: list[tuple[float, float]], steps: int, warm: tuple[float, float], peak: float | None
) -> Measurement:
    runs = [c.batch_size * steps / wall for wall, _ in seconds]
    ips = statistics.median(runs)
    per_cpu_s = statistics.median(c.batch_size * steps / cpu for _, cpu in seconds)
    achieved = ips * c.flops_per_image / 1e12 if c.flops_per_image else None
    return Measurement(
        name=c.name,
        images_per_s=ips,
        step_ms=1e3 * c.batch_size / ips,
        runs_images_per_s=runs,
        images_per_cpu_s=per_cpu_s,
        warmup_s=warm[0],
        peak_memory_mb=warm[1],
        flops_per_image=c.flops_per_image,
        achieved_tflops=achieved,
        mfu=mfu(ips, c.flops_per_image, peak),
        params_m=c.params / 1e6,
        info=c.info,
    )


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

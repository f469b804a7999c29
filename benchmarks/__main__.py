"""``mae-bench``: train-step speed, MFU, Hugging Face comparison, visible-only speedup, levers,
loader feed and computed GPU expectations. Prints tables and writes one JSON file.
``sections=[backends]`` (on request only: it starts one torchrun per backend) trains the same
MAE with DDP, DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2 and reports speed and peak memory per rank.

    mae-bench                                   # everything but backends, on CPU, default sizes
    mae-bench --device cuda presets=[mae_vit_base,mae_vit_large] batch_size=128
    mae-bench sections=[hf] hf_preset=mae_vit_tiny repeats=7 out=hf.json
    mae-bench sections=[backends] backend_preset=mae_vit_small img_size=32 batch_size=8 out=backends.json
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from typing import Any, Literal

import torch
from pydantic import Field

from benchmarks import report
from benchmarks.memory import memory_kind
from benchmarks.model_step import Settings, default_settings, race
from benchmarks.project import Workload, project_contender
from launch.cli import config_parser, entry_point, parse_config
from launch.config import Schema
from launch.errors import ConfigError
from launch.fileio import write_atomic
from launch.flops import peak_flops

log = logging.getLogger("mae-bench")
Section = Literal["presets", "hf", "visible_only", "levers", "loader", "gpu", "backends"]
ALL_SECTIONS: list[Section] = ["presets", "hf", "visible_only", "levers", "loader", "gpu"]


class BenchConfig(Schema):
    sections: list[Section] = Field(ALL_SECTIONS, description="what to run ('backends' only when listed)")
    device: str = Field("cpu", description="cpu, cuda or cuda:N")
    presets: list[str] | None = Field(
        None, description="presets timed in 'presets'; None = tiny/small/base on CPU, base/large/huge on CUDA"
    )
    batch_size: int = Field(16, ge=1, description="images per step, every section")
    img_size: int = Field(224, ge=1, description="input side in pixels")
    precision: Literal["fp32", "bf16"] | None = Field(
        None, description="'presets' section; None = project defaults for the device"
    )
    compile: bool | None = Field(None, description="'presets' section; None = project defaults for the device")
    threads: int | None = Field(
        None, ge=1, description="torch.set_num_threads for every contender; None = PyTorch's choice"
    )
    warmup: int = Field(2, ge=1, description="untimed steps per contender (compilation happens here)")
    steps: int = Field(3, ge=1, description="steps per timed run")
    repeats: int = Field(5, ge=1, description="timed runs per contender, in alternating order; the median is reported")
    mask_ratio: float = Field(0.75, ge=0, lt=1, description="fraction of patches removed")
    norm_pix_loss: bool = Field(True, description="normalized-pixel targets")
    hf_preset: str = Field("mae_vit_tiny", description="preset compared with Hugging Face ViTMAEForPreTraining")
    hf_extra: list[Literal["fp32", "bf16"]] = Field(
        ["bf16"], description="also race both models eager at these precisions"
    )
    visible_presets: list[str] = Field(
        ["mae_vit_tiny", "mae_vit_base"], description="presets for the visible-only speedup"
    )
    lever_preset: str = Field("mae_vit_tiny", description="preset the speed levers are measured on")
    levers: list[str] | None = Field(None, description="substrings of lever names to run; None = all")
    loader_workers: list[int] = Field(
        [1, 2], description="loader worker counts measured in 'loader' (0 = main process)"
    )
    loader_images: int = Field(256, ge=1, description="JPEGs read per loader pass (real photos, ~500 x 375)")
    backends: list[Literal["ddp", "zero2", "zero3", "fsdp"]] = Field(
        ["ddp", "zero2", "zero3", "fsdp"], description="'backends' section: what to compare"
    )
    backend_preset: str = Field("mae_vit_small", description="'backends' section: the model every backend trains")
    backend_procs: int = Field(2, ge=1, description="'backends' section: torchrun processes per backend")
    model_overrides: dict[str, int] = Field({}, description="create_mae overrides for every model, e.g. {depth: 2}")
    peak_tflops: float | None = Field(
        None, gt=0, description="peak TFLOP/s for MFU; None = the GPU table (none on CPU)"
    )
    out: str = Field("bench.json", description="JSON output path")
    seed: int = Field(0, description="weights, images and masks")


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device '{name}' is not a torch device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available; use device=cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device '{name}' is not supported; use cpu or cuda")
    return device


def workload(cfg: BenchConfig, preset: str) -> Workload:
    return Workload(
        preset,
        cfg.batch_size,
        cfg.img_size,
        cfg.mask_ratio,
        cfg.norm_pix_loss,
        tuple(sorted(cfg.model_overrides.items())),
        cfg.seed,
    )


def timing(cfg: BenchConfig) -> dict[str, int]:
    return {"warmup": cfg.warmup, "steps": cfg.steps, "repeats": cfg.repeats}


def run_presets(cfg: BenchConfig, device: torch.device, peak: float | None) -> list[dict[str, Any]]:
    """Each preset alone (so its peak memory is its own) at the requested or default settings."""
    base = default_settings(device)
    settings = base.with_(
        precision=cfg.precision or base.precision, compile=base.compile if cfg.compile is None else cfg.compile
    )
    default = (
        ["mae_vit_base", "mae_vit_large", "mae_vit_huge"]
        if device.type == "cuda"
        else ["mae_vit_tiny", "mae_vit_small", "mae_vit_base"]
    )
    rows = []
    for preset in cfg.presets or default:
        contender = project_contender(workload(cfg, preset), settings, device, name=preset)
        (m,) = race([contender], device=device, peak=peak, **timing(cfg))
        rows.append({"preset": preset, "settings": settings.label(), "batch_size": cfg.batch_size, **m.as_dict()})
        del contender
    return rows


def run_section(
    section: Section, cfg: BenchConfig, device: torch.device, peak: float | None, results: dict[str, Any]
) -> Any:
    if section == "presets":
        return run_presets(cfg, device, peak)
    if section == "hf":
        from benchmarks.hf_compare import compare

        extra = tuple(Settings(precision=p) for p in cfg.hf_extra if p != "fp32")
        return compare(workload(cfg, cfg.hf_preset), device, extra=extra, peak=peak, **timing(cfg))
    if section == "visible_only":
        from benchmarks.visible_only import visible_only_speedup

        return [
            visible_only_speedup(workload(cfg, p), default_settings(device), device, **timing(cfg))
            for p in cfg.visible_presets
        ]
    if section == "levers":
        from benchmarks.levers import measure_levers

        return measure_levers(workload(cfg, cfg.lever_preset), device, only=cfg.levers, **timing(cfg))
    if section == "backends":
        from benchmarks.backends import compare_backends

        return compare_backends(
            workload(cfg, cfg.backend_preset),
            cfg.backends,
            procs=cfg.backend_procs,
            precision=cfg.precision or "fp32",
            warmup=cfg.warmup,
            steps=cfg.steps * cfg.repeats,
        )
    if section == "loader":
        from benchmarks.feed import loader_feed

        return loader_feed(
            cfg.loader_workers, cfg.loader_images, cfg.batch_size, cfg.img_size, model_rows=results.get("presets")
        )
    from benchmarks.gpu_table import expected_table

    per_worker = (results.get("loader") or {}).get("per_worker_images_per_s")
    return expected_table(per_worker)


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": str(device),
        "memory_kind": memory_kind(device),
        "loadavg_start": list(os.getloadavg()),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


def run(argv: list[str]) -> int:
    parser = config_parser("mae-bench", BenchConfig, __doc__ or "")
    parser.add_argument("--device", default=None, help="shortcut for device=...")
    parser.add_argument("--out", default=None, help="shortcut for out=...")
    cfg, args = parse_config(parser, BenchConfig, argv)
    cfg = cfg.model_copy(update={k: v for k, v in (("device", args.device), ("out", args.out)) if v})
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    precision = cfg.precision or default_settings(device).precision
    peak = peak_flops(device, precision, override=cfg.peak_tflops * 1e12 if cfg.peak_tflops else None)
    results: dict[str, Any] = {"meta": {**machine_info(device), "peak_flops": peak, "config": cfg.model_dump()}}
    for section in cfg.sections:
        log.info("running %s", section)
        results[section] = run_section(section, cfg, device, peak, results)
    results["meta"]["loadavg_end"] = list(os.getloadavg())
    write_atomic(cfg.out, json.dumps(results, indent=2))
    print(report.render(results))
    print(f"wrote {cfg.out}")
    return 0


main = entry_point("mae-bench", run)

if __name__ == "__main__":
    raise SystemExit(main())

"""Plain-text tables of a ``mae-bench`` result (the JSON written next to them holds everything)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))

    return "\n".join([f"== {title}", line(headers), line(["-" * w for w in widths]), *map(line, cells)])


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _presets(rows: list[dict[str, Any]]) -> str:
    return table(
        "train step per preset",
        ["preset", "settings", "batch", "img/s", "img/CPU-s", "ms/step", "GFLOP/img", "TFLOP/s", "MFU", "peak MiB"],
        [
            [
                r["preset"],
                r["settings"],
                r["batch_size"],
                r["images_per_s"],
                r["images_per_cpu_s"],
                r["step_ms"],
                (r["flops_per_image"] or 0) / 1e9,
                r["achieved_tflops"],
                _pct(r["mfu"]),
                r["peak_memory_mb"],
            ]
            for r in rows
        ],
    )


def _hf(res: dict[str, Any]) -> str:
    rows = table(
        f"this project vs Hugging Face ViTMAEForPreTraining ({res['preset']}, batch {res['batch_size']})",
        ["contender", "img/s", "img/CPU-s", "ms/step", "peak MiB", "params M"],
        [
            [r["name"], r["images_per_s"], r["images_per_cpu_s"], r["step_ms"], r["peak_memory_mb"], r["params_m"]]
            for r in res["rows"]
        ],
    )
    speed = table(
        "speedup project / hf",
        ["pairing", "project", "hf", "wall-clock", "CPU time"],
        [
            [k, v["project"], v["hf"], f"{v['speedup']:.2f}x", f"{v['speedup_cpu_time']:.2f}x"]
            for k, v in res["speedups"].items()
        ],
    )
    return rows + "\n\n" + speed


def _visible(results: list[dict[str, Any]]) -> str:
    return table(
        "visible-only encoder vs mask tokens in the encoder",
        ["preset", "settings", "visible img/s", "w/ [M] img/s", "wall-clock", "CPU time", "FLOPs"],
        [
            [
                r["preset"],
                r["settings"],
                r["visible_only"]["images_per_s"],
                r["mask_tokens_in_encoder"]["images_per_s"],
                f"{r['wallclock_speedup']:.2f}x",
                f"{r['cpu_time_speedup']:.2f}x",
                f"{r['flops_ratio']:.2f}x",
            ]
            for r in results
        ],
    )


def _levers(res: dict[str, Any]) -> str:
    return table(
        f"speed levers ({res['preset']}, batch {res['batch_size']}, vs eager fp32)",
        ["lever", "img/s", "wall-clock", "CPU time", "pays", "warmup s", "note"],
        [
            [
                r["lever"],
                r["images_per_s"],
                f"{r['speedup']:.2f}x",
                f"{r['speedup_cpu_time']:.2f}x",
                r["pays"],
                r["warmup_s"],
                r["note"],
            ]
            for r in res["rows"]
        ],
    )


def _loader(res: dict[str, Any]) -> str:
    rows = table(
        "data loader (pretrain transforms)",
        ["workers", "img/s", "img/s per worker"],
        [[r["workers"], r["images_per_s"], r["images_per_s_per_worker"]] for r in res["rows"]],
    )
    demand = table(
        f"loader at the default workers / model demand (target >= {res['target_ratio']})",
        ["model", "demand from", "model img/s", "workers", "loader img/s", "ratio", "workers needed"],
        [
            [
                d["preset"],
                d["where"],
                d["model_images_per_s"],
                d["default_workers"],
                d["loader_images_per_s"],
                d["ratio"],
                d["workers_needed"],
            ]
            for d in res["demand"]
        ],
    )
    return rows + "\n\n" + demand


def _gpu(rows: list[dict[str, Any]]) -> str:
    return table(
        "expected on GPU (COMPUTED from FLOPs per image and an assumed MFU, not measured)",
        ["preset", "gpu", "GFLOP/img", "assumed MFU", "act. ckpt", "img/s", "loader workers/GPU"],
        [
            [
                r["preset"],
                r["gpu"],
                r["train_gflop_per_image"],
                _pct(r["assumed_mfu"]),
                r["activation_checkpointing"],
                r["expected_images_per_s"],
                r["loader_workers_per_gpu"],
            ]
            for r in rows
        ],
    )


def _backends(res: dict[str, Any]) -> str:
    return table(
        f"backends ({res['preset']}, {res['img_size']} px, batch {res['batch_size']} per rank, "
        f"{res['procs']} processes, "
        f"{res['precision']})",
        ["backend", "img/s", "img/CPU-s", "peak MiB / rank", "params M"],
        [
            [r["backend"], r["images_per_s"], r["images_per_cpu_s"], r["peak_memory_mb"], r["params_m"]]
            for r in res["rows"]
        ],
    )


RENDERERS: dict[str, Callable[[Any], str]] = {
    "presets": _presets,
    "hf": _hf,
    "visible_only": _visible,
    "levers": _levers,
    "loader": _loader,
    "gpu": _gpu,
    "backends": _backends,
}


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    head = (
        f"mae-bench  {meta['time_utc']}  device={meta['device']}  threads={meta['torch_threads']}  "
        f"torch={meta['torch']}  loadavg start={meta['loadavg_start'][0]:.2f} end={meta['loadavg_end'][0]:.2f}"
    )
    parts = [RENDERERS[k](v) for k, v in results.items() if k in RENDERERS and v is not None]
    return "\n\n".join([head, *parts])

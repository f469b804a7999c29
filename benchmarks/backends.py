"""The ``backends`` section of ``mae-bench``: one MAE trained by DDP, DeepSpeed ZeRO-2 / ZeRO-3
and FSDP2 through the project's own :class:`launch.backend.Backend`, each in its own
``torchrun --nproc_per_node N`` launch (same model, same per-rank batch, AdamW, clipping).

Per backend: images/s (wall clock), images per CPU-second (all ranks' process CPU time: steadier
on a shared machine) and the peak memory of each rank (CUDA allocator, or process RSS on CPU,
counted from just before the model is built). Every rank writes its own JSON; the parent reads
them, so the worker needs no collective of its own.

    python -m benchmarks.backends '<spec json>' OUT_PREFIX   # one rank of one backend (torchrun)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.memory import peak_memory_mb, reset_peak_memory
from benchmarks.model_step import synchronize
from benchmarks.project import Workload

#: backend name -> TrainerConfig overrides
BACKENDS: dict[str, list[str]] = {
    "ddp": ["backend=ddp"],
    "zero2": ["backend=deepspeed", "zero_stage=2"],
    "zero3": ["backend=deepspeed", "zero_stage=3"],
    "fsdp": ["backend=fsdp"],
}


def compare_backends(
    work: Workload, names: list[str], *, procs: int, precision: str, warmup: int, steps: int
) -> dict[str, Any]:
    """One launch per backend in ``names``; rows in the same order."""
    rows = []
    for name in names:
        spec = {
            "work": {**work.__dict__, "overrides": list(work.overrides)},
            "trainer": [*BACKENDS[name], f"precision={precision}", f"batch_size={work.batch_size}"],
            "warmup": warmup,
            "steps": steps,
        }
        with tempfile.TemporaryDirectory() as tmp:
            ranks = _launch(spec, Path(tmp) / "rank", procs)
        rows.append(_row(name, ranks, work.batch_size, steps))
    return {
        "preset": work.preset,
        "img_size": work.img_size,
        "batch_size": work.batch_size,
        "procs": procs,
        "precision": precision,
        "rows": rows,
    }


def _launch(spec: dict[str, Any], prefix: Path, procs: int) -> list[dict[str, Any]]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(procs),
        "-m",
        "benchmarks.backends",
        json.dumps(spec),
        str(prefix),
    ]
    # tensors above 64 KiB in their own mappings, returned to the OS when freed: on CPU the peak
    # RSS then follows live memory (glibc keeps freed heap memory, hiding what sharding saves)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(spec['trainer'])}: torchrun failed\n{proc.stderr[-3000:]}")
    return [json.loads(Path(f"{prefix}-{r}.json").read_text()) for r in range(procs)]


def _row(name: str, ranks: list[dict[str, Any]], batch: int, steps: int) -> dict[str, Any]:
    images = batch * steps * len(ranks)
    return {
        "backend": name,
        "images_per_s": images / max(r["wall_s"] for r in ranks),
        "images_per_cpu_s": images / sum(r["cpu_s"] for r in ranks),
        "peak_memory_mb": max(r["peak_memory_mb"] for r in ranks),
        "peak_memory_mb_per_rank": [r["peak_memory_mb"] for r in ranks],
        "params_m": ranks[0]["params_m"],
        "final_loss": ranks[0]["loss"],
    }


def _worker(spec: dict[str, Any], prefix: str) -> None:
    """One rank: build, prepare with the backend, warm up, time ``steps`` optimizer steps."""
    from launch import dist
    from launch.backend import Backend
    from launch.config import TrainerConfig, load_config
    from launch.optim import build_optimizer
    from pretrain.task import MAETask

    cfg = load_config(TrainerConfig, None, ["optim.clip_grad=1.0", "optim.lr=1e-4", *spec["trainer"]])
    backend = Backend(cfg)
    work = Workload(**{**spec["work"], "overrides": tuple(tuple(o) for o in spec["work"]["overrides"])})
    reset_peak_memory(backend.device)
    task = MAETask(work.build(), work.mask_ratio, work.norm_pix_loss)
    params_m = sum(p.numel() for p in task.parameters()) / 1e6
    opt = build_optimizer(task, cfg.optim, cfg.optim.lr, fused=False)
    model, (opt,) = backend.prepare(task.to(backend.device), [opt])
    params = [p for p in backend.unwrap(model).parameters() if p.requires_grad]
    batch = {"image": Workload(**{**work.__dict__, "seed": work.seed + dist.rank()}).images(task.model, backend.device)}

    def step() -> torch.Tensor:
        with backend.micro_step(model, is_last=True):
            loss = model(batch)["loss"]
            backend.backward(loss)
        backend.clip(params)
        backend.step(opt)
        return loss.detach()

    for _ in range(spec["warmup"]):
        step()
    synchronize(backend.device)
    backend.wait()
    start, cpu = time.perf_counter(), time.process_time()
    losses = [step() for _ in range(spec["steps"])]
    synchronize(backend.device)
    backend.wait()  # the slowest rank sets the pace
    result = {
        "wall_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu,
        "peak_memory_mb": peak_memory_mb(backend.device),
        "params_m": params_m,
        "loss": float(losses[-1]),
    }
    Path(f"{prefix}-{dist.rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]), sys.argv[2])

"""Running the table's jobs: each baseline (a ``mae-baseline`` subprocess), the raw-pixel probe
(in this process), the MAE pretraining run; each job records what it cost in ``COST``."""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import yaml

from benchmarks.baselines_table import COST, PIXELS, ROOT, SWEEP
from launch.fileio import write_atomic

log = logging.getLogger("baselines_table")

MAE_PRETRAIN_CONFIG = ROOT / "configs" / "pretrain" / "mnist_tiny.yaml"


def probe_overlay(run_root: Path) -> Path:
    """A ``--config`` file holding the MAE run's probe section (same protocol for every row).
    Data is read in the training process (``workers: 0``): a table job gets one core, and
    28 x 28 digits decode faster there than they travel from a worker process."""
    probe = yaml.safe_load(MAE_PRETRAIN_CONFIG.read_text()).get("probe", {})
    path = run_root / "probe_protocol.yaml"
    write_atomic(path, yaml.safe_dump({"probe": probe, "data": {"workers": 0}}, sort_keys=False))
    return path


def run_baseline(name: str, run_root: Path, overlay: Path, rerun: bool, overrides: list[str]) -> None:
    """``mae-baseline name`` in a subprocess, unless its ``results.json`` exists (or ``rerun``)."""
    if rerun or not (run_root / name / "results.json").is_file():
        set_aside(run_root / name)
        extra = ["probe=null"] if name == SWEEP else []  # the sweep reports reconstruction only
        cmd = [
            sys.executable,
            "-m",
            "baselines",
            name,
            "--config",
            str(overlay),
            f"run_root={run_root}",
            *overrides,
            *extra,
        ]
        log.info("running %s", " ".join(cmd))
        with (run_root / f"{name}.log").open("w") as out:
            cost = measured(lambda: _run_child(cmd, out))
        write_atomic(run_root / name / COST, json.dumps(cost) + "\n")


def set_aside(run_dir: Path) -> None:
    """Move a previous run of this row to ``run_root/.previous/NAME`` (replacing an older one),
    so the new run starts from scratch instead of resuming the old run's checkpoints."""
    if run_dir.exists():
        previous = run_dir.parent / ".previous" / run_dir.name
        shutil.rmtree(previous, ignore_errors=True)
        previous.parent.mkdir(parents=True, exist_ok=True)
        run_dir.rename(previous)
        log.info("previous run moved to %s", previous)


def _run_child(cmd: list[str], out: IO[str]) -> float:
    """Run ``cmd``; its CPU seconds (user + system, including its waited-for children)."""
    child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, cmd)
    return usage.ru_utime + usage.ru_stime


def measured(work: Callable[[], float]) -> dict[str, float]:
    """Wall seconds, CPU seconds (returned by ``work``) and the 1-minute load average before / after."""
    load_start, start = os.getloadavg()[0], time.perf_counter()
    cpu = work()
    return {
        "cpu_seconds": round(cpu, 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "load_start": round(load_start, 2),
        "load_end": round(os.getloadavg()[0], 2),
    }


def run_pixels(run_root: Path, overlay: Path, rerun: bool) -> None:
    """The same linear probe on the raw pixels (in this process: no model to train)."""
    run_dir = run_root / PIXELS
    if rerun or not (run_dir / "results.json").is_file():
        set_aside(run_dir)
        from baselines.config import load_baseline_config
        from baselines.run import probe_pixels

        cfg = load_baseline_config("ae", overlay, [f"run_root={run_root}", "probe.trainer.log.progress=false"])
        cfg = cfg.model_copy(update={"name": PIXELS})

        def work() -> float:
            before = resource.getrusage(resource.RUSAGE_SELF)
            probe_pixels(cfg, run_dir)
            after = resource.getrusage(resource.RUSAGE_SELF)
            return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime

        write_atomic(run_dir / COST, json.dumps(measured(work)) + "\n")


def run_mae(run_dir: Path, overrides: list[str]) -> None:
    """``mae-pretrain`` (the shared pipeline's MNIST run) into ``run_dir``, unless its summary exists."""
    if (run_dir / "summary.json").is_file():
        return
    log.info("no %s: running mae-pretrain (the shared pipeline's MNIST run)", run_dir / "summary.json")
    with (run_dir.parent / f"{run_dir.name}.log").open("w") as out:
        subprocess.run(
            [sys.executable, "-m", "pretrain", f"run_dir={run_dir}", *overrides],
            check=True,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

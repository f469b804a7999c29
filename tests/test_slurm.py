"""launch/slurm/pretrain.sbatch run under stand-in srun / scontrol that record how they are called."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)


def test_srun_gets_the_jobs_cpus_per_task(tmp_path: Path) -> None:
    """Slurm 22.05-23.02: srun no longer inherits sbatch's --cpus-per-task, so without passing it
    torchrun and all its workers share one CPU."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir, "srun", f'echo "$@" > {tmp_path}/srun.args')
    _fake(bin_dir, "scontrol", "echo node-a")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "node-a",
        "SLURM_NNODES": "1",
        "SLURM_JOB_ID": "42",
        "SLURM_CPUS_PER_TASK": "64",
        "SLURM_GPUS_ON_NODE": "8",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "launch/slurm/pretrain.sbatch"), "--config", "x.yaml"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun.args").read_text().split()
    assert "--cpus-per-task" in args and args[args.index("--cpus-per-task") + 1] == "64"
    assert args.index("--cpus-per-task") < args.index("torchrun")  # srun's option, not torchrun's
    assert args[-3:] == ["--config", "x.yaml", "trainer.checkpoint.resume=auto"]

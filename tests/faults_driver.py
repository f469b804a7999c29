"""Fault-injection driver for the checkpoint tests: a real training process to kill.

    python tests/faults_driver.py RUN_DIR [--fault F] [--step-delay S] key=value ...
    torchrun --nproc_per_node 2 tests/faults_driver.py RUN_DIR ...

Trains :class:`MaskedTiny` (random patch masking drawn from the torch RNG, like MAE) on the
built-in ``digits`` shards through ``launch.trainer.fit`` with the real ``ShardLoader``
(2 DataLoader workers). Overrides are ``TrainerConfig`` keys, or ``data.KEY=...``. Rank 0
writes ``RUN_DIR/final.pt`` at the end; each rank writes ``RUN_DIR/pid-RANK`` at start so a
test can ``kill -9`` it, and ``RUN_DIR/attempt-A-rank-RANK`` (A: torchrun's restart count).
Faults exist only here, never in the product:

* ``kill-in-save@N``: SIGKILL inside the save of step ``N``, after every file was written and
  fsync'd, just before ``meta.json`` and the completion marker.
* ``nan@N,M,...``: rank 0's batches of optimizer steps ``N``, ``M``... are poisoned (NaN pixels).
* ``crash@N``: rank 1 SIGKILLs itself in the forward of step ``N`` of torchrun's first attempt
  (``TORCHELASTIC_RESTART_COUNT=0``), so ``--max-restarts`` restarts the group once; in later
  attempts rank 0 starts 1 s late, so rank 1 looks up rank 0's process-group address first
  (with store keys shared across attempts: the dead attempt's, fatal when rank 1 dials).
* ``--step-delay S``: sleep S seconds per forward, so a test can kill at a random step.

Options for the resume-on-another-world-size tests (not faults): ``--masks seeded`` draws the masks
from the samples' seeds (``batch["seed"]``, as ``MAETask`` does) instead of the torch RNG;
``--record-keys TAG`` appends ``{"step", "keys"}`` per optimizer step to ``RUN_DIR/keys-TAG-rank-R.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from launch import checkpoint, dist
from launch.cli import entry_point
from launch.config import TrainerConfig, load_config
from launch.task import Batch, Task
from pretrain.masking import sample_noise

PATCH = 2


class MaskedTiny(Task):
    """Reconstruct randomly masked 2x2 patches of 8x8 digits: MAE in miniature."""

    def __init__(
        self,
        poison: set[int] | None = None,
        delay: float = 0.0,
        crash: int | None = None,
        seeded: bool = False,
        record: Path | None = None,
    ) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(PATCH * PATCH + 16, 32), nn.GELU(), nn.Linear(32, 32))
        self.decoder = nn.Linear(32, PATCH * PATCH)
        self.poison, self.delay, self.crash, self.calls = poison or set(), delay, crash, 0
        self.seeded, self.record, self.keys = seeded, record, []

    def forward(self, batch: Batch, phase: str = "main") -> dict[str, Tensor]:
        self.calls += 1
        if self.calls == self.crash:
            os.kill(os.getpid(), signal.SIGKILL)
        imgs = batch["image"]  # (N, 1, 8, 8)
        if self.calls in self.poison and dist.rank() == 0:
            imgs = imgs * float("nan")
        time.sleep(self.delay)
        patches = rearrange(imgs, "n c (h p) (w q) -> n (h w) (p q c)", p=PATCH, q=PATCH)  # (N, 16, 4)
        n, length, _ = patches.shape
        noise = sample_noise(batch["seed"], length) if self.seeded else torch.rand(n, length, device=imgs.device)
        # 1 = hidden; unseeded: the RNG a resume must restore. In the batch's dtype: bf16 under DeepSpeed
        mask = (noise < 0.75).to(imgs.dtype)
        if self.training:
            self.keys += batch["key"]
        position = torch.eye(length, device=imgs.device, dtype=imgs.dtype).expand(n, -1, -1)
        pred = self.decoder(self.encoder(torch.cat([patches * (1 - mask[..., None]), position], -1)))
        loss = ((pred - patches) ** 2).mean(-1)
        return {"loss": (loss * mask).sum() / mask.sum().clamp(min=1)}

    def on_step_end(self, step: int) -> None:
        if self.record is not None:
            with open(self.record, "a") as f:
                f.write(json.dumps({"step": step, "keys": self.keys}) + "\n")
        self.keys = []


def _kill_in_save(step: int) -> None:
    publish = checkpoint.CheckpointManager._publish

    def dying_publish(self, tmp: Path, final: Path, meta: dict) -> None:
        if final.name == checkpoint.step_dir_name(step):
            checkpoint.files.fsync_tree(tmp)
            os.kill(os.getpid(), signal.SIGKILL)
        publish(self, tmp, final, meta)

    checkpoint.CheckpointManager._publish = dying_publish


def run(argv: list[str]) -> int:
    from launch.data import DataConfig
    from launch.trainer import fit

    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--fault", default="")
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--masks", choices=["rng", "seeded"], default="rng")
    parser.add_argument("--record-keys", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    (args.run_dir / f"pid-{dist.rank()}").write_text(str(os.getpid()))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    (args.run_dir / f"attempt-{attempt}-rank-{dist.rank()}").touch()
    kind, _, at = args.fault.partition("@")
    if kind == "kill-in-save":
        _kill_in_save(int(at))
    data_items = [o[len("data.") :] for o in args.overrides if o.startswith("data.")]
    data = load_config(DataConfig, None, ["source=digits", "workers=2", "hflip=0", *data_items])
    cfg = load_config(
        TrainerConfig,
        None,
        [
            "log.progress=false",
            "log.tensorboard=false",
            "eval_every_epochs=0",
            "log.images_every_epochs=0",
            *[o for o in args.overrides if not o.startswith("data.")],
        ],
    )
    torch.manual_seed(0)
    crash = int(at) if kind == "crash" and dist.rank() == 1 and attempt == "0" else None
    if kind == "crash" and dist.rank() == 0 and attempt != "0":
        time.sleep(1.0)
    record = args.run_dir / f"keys-{args.record_keys}-rank-{dist.rank()}.jsonl" if args.record_keys else None
    task = MaskedTiny(
        poison={int(n) for n in at.split(",")} if kind == "nan" else None,
        delay=args.step_delay,
        crash=crash,
        seeded=args.masks == "seeded",
        record=record,
    )
    result = fit(task, cfg, data, args.run_dir, seed=0, img_size=8)
    if dist.is_main():
        torch.save({k: v.detach().clone() for k, v in result.task.state_dict().items()}, args.run_dir / "final.pt")
    return 0


main = entry_point("faults_driver", run)

# ----------------------------------------------------------------------------- test helpers

#: a run long enough to be killed mid-epoch (94 batches of 16 per epoch) after several checkpoints
COMMON = ["max_steps=30", "batch_size=16", "checkpoint.every_steps=4", "log.every_steps=2"]


def start(
    run_dir: Path,
    *args: str,
    data_root: Path,
    nproc: int = 1,
    max_restarts: int = 0,
    torchrun_flags: list[str] | None = None,
) -> subprocess.Popen:
    """Launch this driver (under torchrun when ``nproc`` > 1); output goes to ``run_dir.log``."""
    script = [__file__, str(run_dir), *COMMON, f"data.root={data_root}", *args]
    launcher = (
        [sys.executable]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}",
            "--monitor-interval=0.5",
            *(torchrun_flags or []),
        ]
    )
    # one thread per process: identical numerics in every run, and no oversubscription of 2 cores
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(f"{run_dir}.log", "a") as log:
        return subprocess.Popen([*launcher, *script], stdout=log, stderr=subprocess.STDOUT, env=env, text=True)


def finish(proc: subprocess.Popen, run_dir: Path, timeout: float = 300) -> tuple[int, str]:
    code = proc.wait(timeout=timeout)
    return code, Path(f"{run_dir}.log").read_text()


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


def final_weights(run_dir: Path) -> dict[str, Any]:
    return torch.load(run_dir / "final.pt", weights_only=True)


def assert_same_weights(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not diff, f"weights differ from the uninterrupted run (max abs diff per tensor): {diff}"


if __name__ == "__main__":
    raise SystemExit(main())

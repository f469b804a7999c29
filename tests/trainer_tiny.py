"""A tiny task and a synthetic loader with the ShardLoader interface, for trainer tests.

Also a script: ``torchrun --nproc_per_node 2 tests/trainer_tiny.py RUN_DIR key=value ... [--then k=v ...]``
trains the tiny task with those TrainerConfig overrides (then, in the same process, resumes
it with more overrides) and writes the final weights to ``RUN_DIR/final.pt`` (rank 0; those of
the first fit also to ``RUN_DIR/first.pt`` when there is a second), so a test can compare runs
across launchers. ``{rank}`` in RUN_DIR gives each rank its own directory (a node-local run_dir).
At exit, once ``launch.dist`` has torn the process group down, each rank writes how many gloo worker
threads it still has to ``RUN_DIR/gloo-threads-at-exit-{rank}`` (see :func:`_count_gloo_threads`).

The synthetic data is a fixed sequence of samples; batch ``j`` of rank ``r`` (of ``w``,
micro-batch ``B``) holds samples ``j*B*w + r*B + [0, B)`` of the epoch's permutation, so
2 ranks x B and 1 rank x 2B (or k micro-batches of B) see exactly the same images per step.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from launch.task import Batch, Task

NUM_SAMPLES = 96
SHAPE = (1, 4, 4)


class TinyTask(Task):
    """Regress a fixed random projection of the image: deterministic, no dropout, no masks."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 1))

    def forward(self, batch: Batch, phase: str = "main") -> dict[str, Tensor]:
        x = batch["image"]  # (B, 1, 4, 4)
        pred = self.net(x).squeeze(-1) + self.cls_token.sum()
        target = x.flatten(1).sum(-1).sin()
        loss = (pred - target).pow(2).mean()
        return {"loss": loss, "abs_err": (pred - target).abs().mean().detach()}

    @torch.no_grad()
    def pictures(self, batch: Batch) -> dict[str, Tensor]:
        return {"input": batch["image"][0].expand(3, -1, -1).sigmoid()}


class TwoPhaseTask(TinyTask):
    """Two optimizers over disjoint parts (the shape of an adversarial autoencoder)."""

    phases = ("first", "second")

    def forward(self, batch: Batch, phase: str = "main") -> dict[str, Tensor]:
        out = super().forward(batch)
        return out if phase == "first" else {"loss": (self.cls_token - 1).pow(2).sum() + out["loss"]}

    def phase_module(self, phase: str) -> nn.Module:
        return self.net if phase == "first" else _Params(self.cls_token)


class _Params(nn.Module):
    def __init__(self, p: nn.Parameter) -> None:
        super().__init__()
        self.p = p


class SyntheticLoader:
    """ShardLoader stand-in: deterministic per-epoch permutation, resumable position; ``skips``:
    every batch also reports ``skips * (rank + 1)`` skipped samples (ranks differ, so sums show)."""

    def __init__(
        self,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        num: int = NUM_SAMPLES,
        poison: int | None = None,
        skips: int = 0,
        shape: tuple[int, ...] = SHAPE,
        classes: int = 0,
    ) -> None:
        gen = torch.Generator().manual_seed(1234)
        self.images = torch.randn(num, *shape, generator=gen)
        # labels 0..classes-1 in a fixed order (classes=0: unlabeled, -1)
        self.labels = torch.arange(num) % classes if classes else torch.full((num,), -1)
        self.b, self.seed, self.rank, self.world = batch_size, seed, rank, world_size
        self.epoch, self.pos, self.poison = 0, 0, poison
        self.skips, self.skipped = skips * (rank + 1), 0
        self.info = SimpleNamespace(
            splits={"train": num, "val": num}, num_classes=max(classes, 1), mean=(0.0,), std=(1.0,)
        )

    def __len__(self) -> int:
        return len(self.images) // (self.b * self.world)

    def batches_left(self) -> int:
        return len(self) - self.pos

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.pos = epoch, 0

    restart = set_epoch

    def __iter__(self):
        order = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        while self.pos < len(self):
            start = self.pos * self.b * self.world + self.rank * self.b
            idx = order[start : start + self.b]
            images = self.images[idx].clone()
            if self.poison is not None and self.pos == self.poison:
                images[0, 0, 0, 0] = float("nan")
            self.pos += 1
            self.skipped += self.skips
            yield {"image": images, "label": self.labels[idx], "key": [f"{i:06d}" for i in idx.tolist()]}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos, self.skipped = state["epoch"], state["pos"], state.get("skipped", 0)

    def corrupt_samples(self) -> int:
        return self.skipped

    def last_skip(self) -> str:
        return f"synthetic skip, rank {self.rank}" if self.skipped else ""


def synthetic_factory(**extra: Any):
    def factory(
        data: Any,
        split: str,
        *,
        preset: str,
        batch_size: int,
        img_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool | None = None,
        drop_last: bool = False,
    ) -> SyntheticLoader:
        return SyntheticLoader(batch_size, seed, rank, world_size, **extra)

    return factory


def run(
    run_dir: str,
    overrides: list[str],
    two_phase: bool = False,
    reductions: list[int] | None = None,
    data: Any = None,
    skips: int = 0,
):
    """Train TinyTask with ``overrides`` of TrainerConfig into ``run_dir``; returns the FitResult.
    ``reductions`` (DDP only) receives one entry per gradient bucket all-reduce; ``data`` goes to
    the trainer (e.g. a DataConfig for max_skipped_fraction), ``skips`` to the SyntheticLoader."""
    from launch.config import TrainerConfig, load_config
    from launch.trainer import Trainer

    cfg = load_config(TrainerConfig, None, ["log.progress=false", *overrides])
    torch.manual_seed(0)
    task = TwoPhaseTask() if two_phase else TinyTask()
    trainer = Trainer(task, cfg, data, Path(run_dir), seed=0, img_size=4, loader_factory=synthetic_factory(skips=skips))
    if reductions is not None:
        trainer.model.register_comm_hook(reductions, _counting_allreduce)
    return trainer.fit()


def _count_gloo_threads(path: Path) -> None:
    """Write how many gloo worker threads (torch names them ``pt_gloo_runloop``) this process has left.
    One that outlives the group's teardown can take the GIL during interpreter finalization and abort
    the process after a complete run ("terminate called without an active exception", exit -6)."""
    if path.parent.is_dir():  # a run that failed before creating its run dir has nothing to report
        names = [(task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
        path.write_text(str(names.count("pt_gloo_runloop")))


def _counting_allreduce(calls, bucket):  # unannotated: DDP checks the annotation object itself
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    calls.append(1)
    return allreduce_hook(None, bucket)


if __name__ == "__main__":
    import atexit
    import logging

    from launch import dist

    logging.basicConfig(level=logging.INFO)
    # "--then k=v ...": a second fit in the same process and run dir (it resumes the first)
    # "skips=N": the SyntheticLoader of rank r reports N * (r + 1) skipped samples per batch
    skips = int(next((a.split("=")[1] for a in sys.argv[2:] if a.startswith("skips=")), 0))
    args = [a for a in sys.argv[2:] if not a.startswith("skips=")]
    first, then = (args[: args.index("--then")], args[args.index("--then") + 1 :]) if "--then" in args else (args, None)
    ddp = dist.world_size() > 1 and "backend=deepspeed" not in args and "backend=fsdp" not in args
    reductions: list[int] | None = [] if ddp else None
    run_dir = sys.argv[1].format(rank=dist.rank())
    # registered before the first fit registers launch.dist's teardown: exit handlers run last in, first out
    atexit.register(_count_gloo_threads, Path(run_dir) / f"gloo-threads-at-exit-{dist.rank()}")

    def record(result, name: str) -> None:
        if dist.is_main():
            state = {k: v.detach().cpu().clone() for k, v in result.task.state_dict().items()}
            out = {
                "state": state,
                "steps": result.steps,
                "loss": result.final_loss,
                "reductions": len(reductions or []),
            }
            torch.save(out, Path(run_dir) / name)

    result = run(run_dir, first, reductions=reductions, skips=skips)
    if then is not None:
        record(result, "first.pt")
        result = run(run_dir, [*first, *then], skips=skips)
    record(result, "final.pt")

"""When the trainer saves, and which checkpoint it has: the run's side of :mod:`launch.checkpoint`.

:class:`Checkpointer` owns the run's :class:`~launch.checkpoint.CheckpointManager` and
:class:`~launch.preemption.RunControl`: every N steps / minutes, or after SIGTERM / SIGUSR1, every
rank saves after the same step; an asynchronous save (FSDP) is published once it is on disk; ``path``
is the newest complete checkpoint of the run. What a save holds is the trainer's (its ``write``
callback); where the run starts and how it resumes is :mod:`launch.resume`.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from torch import nn

from launch.checkpoint import CheckpointManager
from launch.config import TrainerConfig
from launch.preemption import EXIT_REQUEUE, Decision, Preempted, RunControl
from launch.resume import resolve_start

Write = Callable[[Path], Future | None]


class Checkpointer:
    """The run's checkpoints under ``run_dir/checkpoints``; ``start`` is the checkpoint the run resumes
    from (None: fresh, after loading ``checkpoint.weights_only`` into ``task``)."""

    def __init__(self, run_dir: Path, cfg: TrainerConfig, task: nn.Module) -> None:
        ckpt = cfg.checkpoint
        self.manager = CheckpointManager(run_dir / "checkpoints", keep=ckpt.keep)
        # stop requests and the wall clock are agreed at log steps, where the trainer syncs anyway
        self.log_every = cfg.log.every_steps
        self.control = RunControl(
            every_steps=ckpt.every_steps, every_minutes=ckpt.every_minutes, check_every=self.log_every
        )
        self.start = resolve_start(self.manager, ckpt, task)
        self.path: Path | None = None

    def decide(self, step: int) -> Decision:
        """After optimizer step ``step``, on every rank: save and / or stop (agreed by all ranks)."""
        decision = self.control.poll(step)
        if step % self.log_every == 0:  # an asynchronous save is published once on disk
            self.path = self.manager.poll() or self.path
        return decision

    def save(self, step: int, write: Write, meta: dict[str, Any], *, last: bool) -> None:
        """Every rank: ``write(tmp)`` puts its part into the manager's temporary directory. ``last``: the
        run ends here, so an asynchronous save is waited for and published before returning."""
        self.path = self.manager.poll(block=True) or self.path  # an earlier async save first
        self.path = self.manager.save(step, write, meta) or self.path
        if last:
            self.path = self.manager.poll(block=True) or self.path
        self.control.saved()

    def preempted(self, step: int) -> Preempted:
        """The error that ends a run stopped by a signal after saving at ``step`` (exit status 75: requeue)."""
        return Preempted(
            f"stopped by {self.control.received} after step {step}, saved {self.path}; "
            f"the same command continues it (trainer.checkpoint.resume=auto); exit status {EXIT_REQUEUE} = requeue"
        )

"""Decisions every rank must take together at a step boundary: skip a non-finite step,
stop for preemption, save on a step or wall-clock trigger.

* :class:`NonFiniteGuard` flags a step whose loss or gradients hold NaN / inf on *any*
  rank (one 1-element all-reduce, on device) and :func:`step_unless` skips it on every
  rank; fused optimizers skip on device through their ``found_inf`` input, others cost one
  host sync. Consecutive skips are counted on device and checked when the trainer syncs
  anyway (:meth:`NonFiniteGuard.report`); ``max_bad_steps`` in a row stops the run.
* :class:`RunControl` turns SIGTERM / SIGUSR1 into a flag and, every ``check_every`` steps,
  agrees across ranks (one all-reduce of two numbers) on "stop now" and on rank 0's
  wall-clock save trigger, so every rank saves and stops after the same step.
* After the preemption save the trainer raises :class:`Preempted`, whose exit status
  :data:`EXIT_REQUEUE` (75, ``EX_TEMPFAIL``) asks the scheduler to requeue the job;
  ``launch/slurm/pretrain.sbatch`` does that and the requeued job resumes with
  ``trainer.checkpoint.resume=auto``.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import FrameType

import torch
from torch import Tensor

from launch import dist
from launch.errors import UserError

log = logging.getLogger(__name__)

#: exit status of a run stopped by SIGTERM / SIGUSR1 after saving: "try again later"
EXIT_REQUEUE = 75


class Preempted(UserError):
    """The run saved a checkpoint and stopped because it was asked to (SIGTERM / SIGUSR1)."""

    exit_code = EXIT_REQUEUE


class NonFiniteError(UserError):
    """Too many consecutive steps with NaN / inf loss or gradients."""


# ----------------------------------------------------------------------------- non-finite steps


class NonFiniteGuard:
    """Counts skipped steps on device; ``check`` never syncs with the host."""

    def __init__(self, max_bad_steps: int, device: torch.device | str) -> None:
        self.max_bad_steps = max_bad_steps
        zero = torch.zeros((), device=device)
        self.streak, self.skipped, self.streak_start = zero.clone(), zero.clone(), zero.clone()
        self._reported = 0

    def check(self, loss: Tensor, grads: Iterable[Tensor | None], step: int) -> Tensor:
        """``bad``: a float scalar on device, 1.0 on every rank iff the loss or a gradient
        is non-finite on any rank at optimizer step ``step``. Grads: the ones about to be stepped."""
        bad = nonfinite_flag(loss, grads).to(self.streak.device)
        dist.all_reduce_max(bad)
        self.streak_start = torch.where((bad > 0) & (self.streak == 0), float(step), self.streak_start)
        self.streak = (self.streak + 1) * bad
        self.skipped = self.skipped + bad
        return bad

    def report(self) -> int:
        """Host sync: log newly skipped steps; raise :class:`NonFiniteError` after
        ``max_bad_steps`` in a row. Returns the number of steps skipped so far."""
        streak, skipped, start = (int(v) for v in torch.stack([self.streak, self.skipped, self.streak_start]).tolist())
        if skipped > self._reported:
            log.warning("skipped %d step(s) with non-finite loss or gradients (%d in total)", skipped - self._reported, skipped)
            self._reported = skipped
        if streak >= self.max_bad_steps:
            raise NonFiniteError(
                f"loss or gradients were NaN/inf for {streak} consecutive steps from step {start} "
                f"(trainer.max_bad_steps={self.max_bad_steps}); lower the learning rate, enable "
                f"trainer.optim.clip_grad, or check the data; the last checkpoint holds finite weights"
            )
        return skipped

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.report()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped.fill_(state["skipped"])
        self._reported = state["skipped"]


def nonfinite_flag(loss: Tensor, grads: Iterable[Tensor | None]) -> Tensor:
    """1.0 if ``loss`` or any gradient holds NaN / inf on this rank, else 0.0 (device scalar).
    One fused norm over all gradients: the norm is finite iff every entry is."""
    grads = [g for g in grads if g is not None]
    bad = ~torch.isfinite(loss.detach().float()).all()
    if grads:
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False)
        bad = bad | ~torch.isfinite(norm.to(bad.device))
    return bad.float()


def step_unless(optimizer: torch.optim.Optimizer, bad: Tensor) -> None:
    """``optimizer.step()`` unless ``bad`` (device scalar, 0.0 / 1.0). Optimizers with
    fused AMP support (fused AdamW/Adam/SGD) skip on device through ``found_inf``, so no
    host sync; any other optimizer costs one ``bool(bad)``."""
    if getattr(optimizer, "_step_supports_amp_scaling", False) and getattr(optimizer, "found_inf", None) is None:
        optimizer.found_inf = bad.to(torch.float32)
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bool(bad):
        optimizer.step()


# ----------------------------------------------------------------------------- stop and save triggers


@dataclass(frozen=True)
class Decision:
    save: bool = False
    stop: bool = False


class RunControl:
    """Checkpoint triggers and the preemption flag, agreed across ranks.

    Use as a context manager around the training loop (installs the signal handlers) and
    call :meth:`poll` on every rank after every optimizer step.
    """

    signals = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, *, every_steps: int | None = None, every_minutes: float | None = None,
                 check_every: int = 1) -> None:
        self.every_steps, self.every_minutes, self.check_every = every_steps, every_minutes, check_every
        self.received: str | None = None
        self._last_save = time.monotonic()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> RunControl:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # only a flag: the step in flight finishes, then every rank saves and stops together
        if self.received is None:
            self.received = signal.Signals(signum).name
            log.warning("%s received: saving a checkpoint and stopping at the next step boundary", self.received)

    def poll(self, step: int) -> Decision:
        """Every rank, after optimizer step ``step``. A collective only every ``check_every`` steps."""
        periodic = self.every_steps is not None and step % self.every_steps == 0
        if step % self.check_every != 0:
            return Decision(save=periodic)
        timed = self.every_minutes is not None and time.monotonic() - self._last_save >= 60 * self.every_minutes
        flags = torch.tensor([float(self.received is not None), float(timed and dist.is_main())], device=dist.agreement_device())
        stop, timed = (v > 0 for v in dist.all_reduce_max(flags).tolist())
        if stop and self.received is None:
            self.received = "a stop request on another rank"
        return Decision(save=periodic or timed or stop, stop=stop)

    def saved(self) -> None:
        """Restart the wall-clock trigger (after any save)."""
        self._last_save = time.monotonic()

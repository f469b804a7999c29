"""Decisions every rank must take together at a step boundary: stop for preemption, save on a
step or wall-clock trigger (skipping a non-finite step is :mod:`launch.guard`'s).

* :class:`RunControl` turns SIGTERM / SIGUSR1 into a flag (forked DataLoader workers ignore
  them, so a signal to the whole process group does not kill the step in flight) and, every ``check_every`` steps,
  agrees across ranks (one all-reduce of two numbers) on "stop now" and on rank 0's
  wall-clock save trigger, so every rank saves and stops after the same step.
* After the preemption save the trainer raises :class:`Preempted`, whose exit status
  :data:`EXIT_REQUEUE` (75, ``EX_TEMPFAIL``) asks the scheduler to requeue the job;
  ``launch/slurm/pretrain.sbatch`` does that and the requeued job resumes with
  ``trainer.checkpoint.resume=auto``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType

import torch

from launch import dist
from launch.errors import UserError

log = logging.getLogger(__name__)

#: exit status of a run stopped by SIGTERM / SIGUSR1 after saving: "try again later"
EXIT_REQUEUE = 75


class Preempted(UserError):
    """The run saved a checkpoint and stopped because it was asked to (SIGTERM / SIGUSR1)."""

    exit_code = EXIT_REQUEUE


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_shield_children = False


def _shield_forked_child() -> None:
    # torchrun and Slurm signal every process: forked DataLoader workers must outlive that
    # (torch's worker handler dies on SIGTERM), so the parent can finish its step with their
    # batches and save. The signals stay blocked and a thread takes them; only the parent's
    # own SIGTERM (its shutdown of the worker) still ends the child.
    if _shield_children:
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        threading.Thread(target=_absorb_stop_signals, args=(os.getppid(),), daemon=True).start()


def _absorb_stop_signals(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(set(_STOP_SIGNALS))
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)


os.register_at_fork(after_in_child=_shield_forked_child)


@dataclass(frozen=True)
class Decision:
    save: bool = False
    stop: bool = False


class RunControl:
    """Checkpoint triggers and the preemption flag, agreed across ranks.

    Use as a context manager around the training loop (installs the signal handlers) and
    call :meth:`poll` on every rank after every optimizer step.
    """

    signals = _STOP_SIGNALS

    def __init__(
        self, *, every_steps: int | None = None, every_minutes: float | None = None, check_every: int = 1
    ) -> None:
        self.every_steps, self.every_minutes, self.check_every = every_steps, every_minutes, check_every
        self.received: str | None = None
        self._last_save = time.monotonic()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> RunControl:
        global _shield_children
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        _shield_children = True
        return self

    def __exit__(self, *exc: object) -> None:
        global _shield_children
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        _shield_children = False

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
        flags = torch.tensor(
            [float(self.received is not None), float(timed and dist.is_main())], device=dist.agreement_device()
        )
        stop, timed = (v > 0 for v in dist.all_reduce_max(flags).tolist())
        if stop and self.received is None:
            self.received = "a stop request on another rank"
        return Decision(save=periodic or timed or stop, stop=stop)

    def saved(self) -> None:
        """Restart the wall-clock trigger (after any save)."""
        self._last_save = time.monotonic()

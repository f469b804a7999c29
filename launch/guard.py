"""The non-finite guard: skip a step whose loss or gradients hold NaN / inf on any rank, and stop
after ``trainer.max_bad_steps`` consecutive skips.

:func:`nonfinite_flag` marks a bad step on this rank (one fused norm, on device); the guard
all-reduces it (MAX) so every rank skips together. Optimizers that cannot skip on device cost
one host sync per step (:meth:`NonFiniteGuard.step_is_finite`); fused ones skip inside their
kernel (``found_inf``) and the guard counts consecutive skips on device
(:meth:`NonFiniteGuard.count_on_device`), read only at log points (:meth:`NonFiniteGuard.check`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from launch import dist
from launch.errors import UserError

log = logging.getLogger(__name__)


class NonFiniteError(UserError):
    """Too many consecutive steps with NaN / inf loss or gradients."""


def nonfinite_flag(loss: Tensor, grads: Iterable[Tensor | None]) -> Tensor:
    """1.0 if ``loss`` or any gradient holds NaN / inf on this rank, else 0.0 (device scalar).
    One fused norm over all gradients: NaN / inf entries make it non-finite (so does a
    norm overflowing fp32, a step that would diverge anyway)."""
    grads = [g for g in grads if g is not None]
    bad = ~torch.isfinite(loss.detach().float()).all()
    if grads:
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False)
        bad = bad | ~torch.isfinite(norm.to(bad.device))
    return bad.float()


class NonFiniteGuard:
    """Counts consecutive non-finite steps; ``last_checkpoint()`` names the checkpoint that still
    holds finite weights, for the error message. Its counter is checkpointed (:meth:`state_dict`)."""

    def __init__(self, max_bad_steps: int, last_checkpoint: Callable[[], Path | None]) -> None:
        self.max_bad_steps, self._last_checkpoint = max_bad_steps, last_checkpoint
        self.bad_steps = 0  # consecutive skips, host counter (optimizers that cannot skip on device)
        self._run: Tensor | None = None  # consecutive skips on device (fused optimizers)
        self._peak: Tensor | None = None  # their maximum since the last check

    @staticmethod
    def flag(loss: Tensor, grads: Iterable[Tensor | None]) -> Tensor:
        """1.0 on every rank when any rank saw a NaN / inf loss or gradient (a device scalar,
        all-reduced on device: no host sync)."""
        return dist.all_reduce_max(nonfinite_flag(loss, grads))

    def step_is_finite(self, bad: Tensor, step: int) -> bool:
        """For optimizers that cannot skip on device: one host sync per step. ``step`` is the
        optimizer step being taken (1-based)."""
        if not bool(bad):
            self.bad_steps = 0
            return True
        self.bad_steps += 1
        log.warning("step %d: non-finite loss or gradients, step skipped (%d in a row)", step, self.bad_steps)
        if self.bad_steps >= self.max_bad_steps:
            self._stop(self.bad_steps, f"up to step {step}")
        return False

    def count_on_device(self, bad: Tensor) -> None:
        """Track consecutive skips on device, without a host sync; :meth:`check` reads them."""
        run = self._run = bad.clone() if self._run is None else (self._run + bad) * bad
        self._peak = run.clone() if self._peak is None else torch.maximum(self._peak, run)

    def check(self, step: int) -> None:
        """At a log point (a host sync anyway): stop when the on-device counters saw
        ``max_bad_steps`` consecutive skips."""
        peak, self._peak = self._peak, None
        if peak is not None and int(peak) >= self.max_bad_steps:
            self._stop(int(peak), f"by step {step}")

    def _stop(self, count: int, when: str) -> None:
        raise NonFiniteError(
            f"loss or gradients were NaN/inf for {count} consecutive steps {when} "
            f"(trainer.max_bad_steps={self.max_bad_steps}): lower the lr, enable trainer.optim.clip_grad "
            f"or check the data; {self._last_checkpoint() or 'no checkpoint yet'} holds finite weights"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"bad_steps": self.bad_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bad_steps = state.get("bad_steps", 0)

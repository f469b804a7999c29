"""The contract between a stage (pretrain, probe, fine-tune, baseline) and the trainer.

A task is an ``nn.Module`` holding a model and its objective. The trainer owns
everything else: data loading, devices, distribution, precision, optimizers,
schedules, checkpoints and logging. A batch is the data stack's dict::

    {"image": FloatTensor (B, C, H, W) normalized, "label": LongTensor (B,) (-1 = none),
     "key": list[str], "seed": LongTensor (B,) (each sample's own seed; see docs/architecture.md)}

Phases let one step run several optimizers in turn (an adversarial autoencoder has
``("recon", "disc", "gen")``); each phase steps the trainable parameters of
``phase_module(phase)`` only. Frozen parts simply have ``requires_grad=False``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

Batch = dict[str, Any]


class Task(nn.Module):
    """Model + objective, as the trainer sees it. Subclasses implement ``forward``."""

    #: names of the optimizer phases run, in order, on every training step
    phases: tuple[str, ...] = ("main",)

    def forward(self, batch: Batch, phase: str = "main") -> dict[str, Tensor]:
        """Training loss for ``phase``: ``{"loss": scalar, **other scalar metrics to log}``.

        Must not call ``.item()`` or otherwise sync with the host: the trainer reads
        metrics only at log intervals.
        """
        raise NotImplementedError

    def phase_module(self, phase: str) -> nn.Module:
        """The module whose trainable parameters ``phase`` steps (default: the whole task).

        The optimizer is built from it with timm's ``create_optimizer_v2``, so its
        ``no_weight_decay()`` and ``group_matcher()`` (layer decay) are honoured.
        """
        return self

    def phase_optim(self, phase: str) -> dict[str, Any]:
        """Per-phase overrides of the run's optimizer settings (e.g. ``{"lr": 1e-4}``)."""
        return {}

    @torch.no_grad()
    def eval_step(self, batch: Batch) -> dict[str, Tensor]:
        """Validation *sums* for one batch plus ``"count"``; the trainer all-reduces them
        across ranks and reports ``sum / count`` for every other key."""
        out = self(batch)
        n = torch.tensor(float(batch["image"].shape[0]), device=out["loss"].device)
        return {"loss": out["loss"].detach() * n, "count": n}

    @torch.no_grad()
    def pictures(self, batch: Batch) -> dict[str, Tensor]:
        """Image grids to log, ``name -> (3, H, W)`` float in [0, 1]. Default: none."""
        return {}

    def on_step_end(self, step: int) -> None:
        """Called on every rank after each optimizer step (``step`` = steps done so far),
        e.g. to update an exponential moving average of the weights. Default: nothing."""

    def on_eval_end(self, metrics: dict[str, float], step: int) -> None:
        """Called on every rank after each validation with the all-reduced means (the same
        on every rank), e.g. to keep the best weights. Default: nothing."""

    def flops_per_image(self) -> float | None:
        """Training FLOPs per image (forward + backward) for the MFU estimate, if known."""
        return None

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay besides 1-D tensors (timm convention)."""
        return set()

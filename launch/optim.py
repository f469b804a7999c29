"""Optimizers and learning-rate schedules, one pair per task phase.

Recipe (MAE paper, App. A): AdamW with betas (0.9, 0.95), weight decay 0.05 that skips
norms, biases, tokens and position embeddings, ``lr = base_lr * effective_batch / 256``,
per-step linear warmup then cosine decay to ``min_lr``. Parameter groups come from timm
(``param_groups_weight_decay`` / ``param_groups_layer_decay``) and the optimizer class from
timm's ``create_optimizer_v2`` registry.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any

from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from launch.config import OptimConfig
from launch.errors import ConfigError
from launch.task import Task

log = logging.getLogger(__name__)

#: fnmatch patterns never decayed, whatever the module's own ``no_weight_decay()`` says
NO_DECAY_PATTERNS = ("*token", "*pos_embed", "*pos_embedding", "*pos_embed.*")
#: the layer after the last block (a timm ViT's final norm), which timm's group_matcher merges into the
#: last block's layer-decay group (MATCH_PREV_GROUP); the official MAE recipe trains it, like the head, at lr
FULL_LR_PATTERNS = ("norm.*",)


def phase_config(cfg: OptimConfig, overrides: dict[str, Any]) -> OptimConfig:
    """The run's optimizer settings with a phase's overrides applied (validated)."""
    try:
        return OptimConfig.model_validate({**cfg.model_dump(), **overrides})
    except Exception as err:  # pydantic ValidationError: a task bug, still one line
        raise ConfigError(f"task phase optimizer overrides {overrides} are invalid: {err}") from None


def peak_lr(cfg: OptimConfig, effective_batch: int) -> float:
    """``cfg.lr`` if set, else the linear scaling rule ``base_lr * effective_batch / 256``."""
    return cfg.lr if cfg.lr is not None else cfg.base_lr * effective_batch / 256


def no_decay_names(module: nn.Module) -> set[str]:
    """Exact names and fnmatch patterns excluded from weight decay (1-D params are excluded by timm)."""
    names = set(module.no_weight_decay()) if hasattr(module, "no_weight_decay") else set()
    return names | set(NO_DECAY_PATTERNS)


def param_groups(module: nn.Module, cfg: OptimConfig, lr: float) -> list[dict[str, Any]]:
    """Trainable parameters of ``module`` in timm's decay / no-decay (and layer-decay) groups.

    Each group gets its absolute ``lr`` (``lr * lr_scale``) so that a multiplicative
    schedule keeps layer decay intact.
    """
    skip = no_decay_names(module)
    if cfg.layer_decay is not None:
        groups = param_groups_layer_decay(
            module, cfg.weight_decay, no_weight_decay_list=skip, layer_decay=cfg.layer_decay
        )
        groups = _full_lr_split(module, groups)
    else:
        groups = param_groups_weight_decay(module, cfg.weight_decay, no_weight_decay_list=skip)
    groups = [g for g in groups if len(g["params"]) > 0]
    if not groups:
        raise ConfigError(f"{type(module).__name__} has no trainable parameters: nothing to optimize")
    for group in groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return groups


def _full_lr_split(module: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Layer-decay groups with the :data:`FULL_LR_PATTERNS` parameters moved to ``lr_scale`` 1."""
    full = {id(p) for name, p in module.named_parameters() if any(fnmatch(name, pat) for pat in FULL_LR_PATTERNS)}
    split = []
    for group in groups:
        for at_full in (False, True):
            params = [p for p in group["params"] if (id(p) in full) == at_full]
            if params:
                split.append({**group, "params": params, **({"lr_scale": 1.0} if at_full else {})})
    return split


def build_optimizer(module: nn.Module, cfg: OptimConfig, lr: float, *, fused: bool = False) -> Optimizer:
    """timm optimizer ``cfg.name`` over ``module``'s trainable parameters."""
    kwargs: dict[str, Any] = {"momentum": cfg.momentum}
    if cfg.name in ("adamw", "lamb"):
        kwargs = {"betas": tuple(cfg.betas)}
        if cfg.name == "adamw" and fused:
            kwargs["fused"] = True
    groups = param_groups(module, cfg, lr)
    if cfg.name == "lars":
        groups = lars_groups(groups)
    return create_optimizer_v2(groups, opt=cfg.name, lr=lr, weight_decay=cfg.weight_decay, **kwargs)


def lars_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each group split as the official MAE LARS treats parameters: the trust ratio adapts every
    ``ndim > 1`` tensor whatever its weight decay (timm's ``Lars`` adapts only when weight_decay != 0
    unless ``always_adapt``, and every probe recipe uses 0), never a bias or norm (``ndim <= 1``,
    which timm's groups already keep out of weight decay)."""
    split = []
    for group in groups:
        for adapt in (True, False):
            params = [p for p in group["params"] if (p.ndim > 1) == adapt]
            if params:
                split.append({**group, "params": params, "always_adapt": adapt})
    return split


@dataclass
class WarmupCosine:
    """lr multiplier for optimizer step ``t`` (0-based), as used by ``LambdaLR``.

    ``t < warmup``: ``(t + 1) / warmup`` (the last warmup step runs at the peak lr);
    then ``m + (1 - m) * (1 + cos(pi * (t - warmup) / (total - warmup))) / 2`` with
    ``m = min_lr / peak_lr``, reaching exactly ``min_lr`` after ``total`` steps.
    A dataclass, not a lambda, so ``LambdaLR.state_dict()`` captures it.
    """

    warmup: int
    total: int
    min_ratio: float
    cosine: bool = True

    def __call__(self, t: int) -> float:
        if t < self.warmup:
            return (t + 1) / self.warmup
        if not self.cosine:
            return 1.0
        progress = min(1.0, (t - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_steps(cfg: OptimConfig, steps_per_epoch: int, total: int) -> int:
    steps = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * steps_per_epoch)
    if steps > total:  # e.g. a short max_steps debug run of a long recipe
        log.warning("warmup of %d steps is longer than the run (%d steps): warming up over the whole run", steps, total)
    return min(steps, total)


def build_scheduler(optimizer: Optimizer, cfg: OptimConfig, lr: float, *, steps_per_epoch: int, total: int) -> LambdaLR:
    """Per-step warmup + cosine (or constant) schedule; step it once per optimizer step."""
    if cfg.min_lr > lr:
        raise ConfigError(f"optim.min_lr={cfg.min_lr} is above the peak lr {lr:.3g}")
    fn = WarmupCosine(warmup_steps(cfg, steps_per_epoch, total), total, cfg.min_lr / lr, cfg.schedule == "cosine")
    return LambdaLR(optimizer, fn)


def build_phases(
    task: Task, cfg: OptimConfig, *, global_batch: int, steps_per_epoch: int, total: int, fused: bool
) -> tuple[list[Optimizer], list[LambdaLR], list[str]]:
    """One optimizer and schedule per phase of ``task`` (``cfg`` under the phase's ``phase_optim``
    overrides, peak lr scaled to ``global_batch``), and the optimizers' names."""
    optimizers, schedulers, names = [], [], []
    for phase in task.phases:
        pcfg = phase_config(cfg, task.phase_optim(phase))
        lr = peak_lr(pcfg, global_batch)
        optimizers.append(build_optimizer(task.phase_module(phase), pcfg, lr, fused=fused))
        schedulers.append(build_scheduler(optimizers[-1], pcfg, lr, steps_per_epoch=steps_per_epoch, total=total))
        names.append(pcfg.name)
        log.info("phase %s: %s, peak lr %.3g (global batch %d)", phase, pcfg.name, lr, global_batch)
    return optimizers, schedulers, names


def resume_schedule(scheduler: LambdaLR, step: int) -> None:
    """Put ``scheduler`` -- this run's warmup, length and peak lr -- at optimizer step ``step``.

    Call it after the optimizer's state is loaded. A resumed run keeps the checkpoint's step and
    optimizer state but follows its own schedule, so extending a run (20 -> 40 steps) continues on
    the 40-step cosine. ``LambdaLR.load_state_dict`` cannot do that: it updates this run's lambdas
    in place with the checkpoint's (``fn.__dict__.update``), and the optimizer's loaded param groups
    carry the checkpoint's lr.
    """
    scheduler.last_epoch = step
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * fn(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]  # what get_last_lr() reports

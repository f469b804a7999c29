"""This project's MAE as a benchmark contender: ``pretrain.MAETask``, the module the trainer steps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from benchmarks.model_step import Contender, Settings, count_params, make_step
from pretrain.model import MaskedAutoencoderViT
from pretrain.objective import mae_loss, normalize_patches
from pretrain.presets import ARCH_FIELDS, create_mae, preset_args
from pretrain.task import MAETask


@dataclass(frozen=True)
class Workload:
    """What every contender of a race trains on: the same architecture, batch and masking."""

    preset: str
    batch_size: int
    img_size: int = 224
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    overrides: tuple[tuple[str, Any], ...] = ()  # extra create_mae arguments, e.g. (("depth", 2),)
    seed: int = 0

    def build(self, **extra: Any) -> MaskedAutoencoderViT:
        torch.manual_seed(self.seed)  # identical initial weights for every contender built from it
        return create_mae(self.preset, **{"img_size": self.img_size, **dict(self.overrides), **extra})

    def images(self, model: MaskedAutoencoderViT, device: torch.device) -> Tensor:
        """A fixed batch (N, C, H, W) of standard-normal pixels (what a normalized loader yields)."""
        gen = torch.Generator().manual_seed(self.seed)
        shape = (self.batch_size, model.in_chans, self.img_size, self.img_size)
        return torch.randn(shape, generator=gen).to(device)

    def arch(self) -> dict[str, Any]:
        """The architecture fields (``ARCH_FIELDS``) of the preset with this workload's overrides."""
        args = {**preset_args(self.preset), "img_size": self.img_size, **dict(self.overrides)}
        return {k: v for k, v in args.items() if k in ARCH_FIELDS}


def boolean_mask_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix_loss: bool) -> Tensor:
    """The loss written with boolean indexing: a data-dependent shape (and a host sync on GPU)."""
    pred, target = pred.float(), target.float()
    if norm_pix_loss:
        target = normalize_patches(target)[0]
    return (pred - target).pow(2).mean(dim=-1)[mask.bool()].mean()


def _objective(task: MAETask, imgs: Tensor, settings: Settings) -> Callable[[], Tensor]:
    """The training loss on the fixed batch ``imgs`` (N, C, H, W), compiled as a whole if asked
    (the trainer compiles the whole task too)."""

    # the per-sample seeds a loader batch carries (what the trainer's masks are drawn from)
    seeds = torch.arange(imgs.shape[0], device=imgs.device) * 7919 + 1

    def loss(x: Tensor) -> Tensor:
        if not (settings.boolean_mask_loss or settings.full_prediction_loss):
            return task({"image": x} if settings.rng_masks else {"image": x, "seed": seeds})["loss"]
        latent, mask, ids_restore = task.model.forward_encoder(x, task.mask_ratio)
        pred = task.model.forward_decoder(latent, ids_restore)  # every patch, visible ones too
        masked = boolean_mask_loss if settings.boolean_mask_loss else mae_loss
        return masked(pred, task.model.patchify(x), mask, task.norm_pix_loss)

    run = torch.compile(loss) if settings.compile else loss
    return lambda: run(imgs)


def project_contender(
    work: Workload, settings: Settings, device: torch.device, name: str | None = None, **model_kwargs: Any
) -> Contender:
    """``MAETask`` (the module the trainer steps) on ``work`` under ``settings``."""
    model = work.build(fused_attn=settings.fused_attn, **model_kwargs)
    task = MAETask(model, work.mask_ratio, work.norm_pix_loss).to(device)
    objective = _objective(task, work.images(model, device), settings)
    return Contender(
        name=name or f"project {settings.label()}",
        step=make_step(task, objective, device, settings),
        batch_size=work.batch_size,
        flops_per_image=task.flops_per_image(),
        params=count_params(task),
        info={"impl": "project", "settings": settings.label(), "arch": dict(model.arch)},
    )

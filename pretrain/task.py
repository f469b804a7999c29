"""``MAETask``: the MAE model and its objective as the trainer sees them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from launch.errors import ConfigError
from launch.flops import mae_flops
from launch.task import Batch, Task
from pretrain.masking import gather_tokens, removed_ids, sample_noise
from pretrain.model import MaskedAutoencoderViT
from pretrain.objective import removed_patch_loss
from pretrain.pictures import reconstruction_grid
from pretrain.presets import MAEConfig, build_model


class MAETask(Task):
    """Mask, encode the visible patches, decode all, score the removed ones.

    ``image_mean`` / ``image_std`` (the dataset normalization of the batches) only serve
    ``pictures``; without them each picture is scaled by its original's min and max.
    """

    def __init__(
        self,
        model: MaskedAutoencoderViT,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        *,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        num_pictures: int = 8,
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio {mask_ratio} is outside the allowed range [0, 1)")
        self.model = model
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.image_mean, self.image_std = image_mean, image_std
        self.num_pictures = num_pictures

    def forward(self, batch: Batch, phase: str = "main") -> dict[str, Tensor]:
        """Masks come from the samples' own seeds (``batch["seed"]``, from the loader) when present, so a
        sample is masked the same way whichever rank and batch it lands in; else from the torch RNG."""
        imgs = batch["image"]
        noise = sample_noise(batch["seed"], self.model.num_patches) if "seed" in batch else None
        return {"loss": self._loss(imgs, noise)}

    @torch.no_grad()
    def eval_step(self, batch: Batch) -> dict[str, Tensor]:
        """Loss sum on fixed masks (seed 0), so validation numbers compare across epochs and runs."""
        imgs = batch["image"]
        loss = self._loss(imgs, self._fixed_noise(imgs))
        n = torch.tensor(float(imgs.shape[0]), device=loss.device)
        return {"loss": loss * n, "count": n}

    def _loss(self, imgs: Tensor, noise: Tensor | None = None) -> Tensor:
        """imgs: (N, C, H, W) -> scalar loss on the removed patches."""
        latent, _, ids_restore = self.model.forward_encoder(imgs, self.mask_ratio, noise)
        # only the removed patches are scored: predict and compare just those (same loss as mae_loss)
        ids = removed_ids(ids_restore, latent.shape[1] - 1)
        pred = self.model.forward_decoder(latent, ids_restore, ids)  # (N, L - L_keep, p*p*C)
        return removed_patch_loss(pred, gather_tokens(self.model.patchify(imgs), ids), self.norm_pix_loss)

    def _fixed_noise(self, imgs: Tensor) -> Tensor:
        """(N, L) masking noise that is the same at every call (drawn on the CPU, seed 0)."""
        noise = torch.rand(imgs.shape[0], self.model.num_patches, generator=torch.Generator().manual_seed(0))
        return noise.to(imgs.device, non_blocking=True)

    @torch.no_grad()
    def pictures(self, batch: Batch) -> dict[str, Tensor]:
        """``{"reconstruction": (3, H', W')}``: per image, original / masked / prediction / prediction
        with the visible patches pasted back. The masks are the same at every call (seed 0)."""
        imgs = batch["image"][: self.num_pictures]
        grid = reconstruction_grid(
            self.model,
            imgs,
            self.mask_ratio,
            self.norm_pix_loss,
            mean=self.image_mean,
            std=self.image_std,
            noise=self._fixed_noise(imgs),
        )
        return {"reconstruction": grid}

    def flops_per_image(self) -> float | None:
        return mae_flops(**self.model.arch, mask_ratio=self.mask_ratio).train

    def no_weight_decay(self) -> set[str]:
        return {f"model.{name}" for name in self.model.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


def build_task(
    cfg: MAEConfig, *, image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None
) -> MAETask:
    """The model of ``cfg`` wrapped with its mask ratio and loss setting."""
    return MAETask(build_model(cfg), cfg.mask_ratio, cfg.norm_pix_loss, image_mean=image_mean, image_std=image_std)

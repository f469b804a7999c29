"""The visible-only encoder vs the same model pushing mask tokens through the encoder.

The MAE paper (Table 1c, Sec. 4.1) reports that skipping the mask tokens in the encoder
saves 3.3x FLOPs and 2.8x wall-clock for ViT-L. The *with mask tokens* variant here is
that ablation: removed patches are replaced by a learned encoder mask token, all
``1 + L`` tokens go through the encoder, and the decoder takes the encoder output as is
(no second set of mask tokens). Both variants share the same weights and loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.model_step import Contender, Settings, count_params, make_step, race
from benchmarks.project import Workload, project_contender
from launch.flops import mae_flops
from pretrain.masking import gather_tokens, random_masking, removed_ids
from pretrain.model import MaskedAutoencoderViT
from pretrain.objective import removed_patch_loss


class MaskTokensInEncoder(nn.Module):
    """``model`` run as the paper's "encoder w/ [M]" ablation."""

    def __init__(self, model: MaskedAutoencoderViT) -> None:
        super().__init__()
        self.model = model
        self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, model.arch["embed_dim"]))
        nn.init.normal_(self.encoder_mask_token, std=0.02)

    def forward(self, imgs: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor]:
        """imgs: (N, C, H, W) -> pred (N, M, p*p*C) of the M removed patches, their indices (N, M).

        Like ``MAETask``, only the removed patches are predicted, so the two variants
        differ in the encoder alone.
        """
        m = self.model
        x = m.patch_embed(imgs)  # (N, L, D)
        visible, mask, ids_restore = random_masking(x, mask_ratio)
        x = torch.where(mask.unsqueeze(-1).bool(), self.encoder_mask_token.to(x.dtype), x) + m.pos_embed[:, 1:]
        cls = (m.cls_token + m.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        for blk in m.blocks:
            x = blk(x)
        x = m.decoder_embed(m.norm(x)) + m.decoder_pos_embed
        for blk in m.decoder_blocks:
            x = blk(x)
        ids = removed_ids(ids_restore, visible.shape[1])
        return m.decoder_pred(m.decoder_norm(gather_tokens(x, ids + 1))), ids  # +1: past the cls token


def mask_tokens_contender(work: Workload, settings: Settings, device: torch.device) -> Contender:
    ablation = MaskTokensInEncoder(work.build(fused_attn=settings.fused_attn)).to(device)
    imgs = work.images(ablation.model, device)

    def objective(x: Tensor) -> Tensor:
        pred, ids = ablation(x, work.mask_ratio)
        return removed_patch_loss(pred, gather_tokens(ablation.model.patchify(x), ids), work.norm_pix_loss)

    run = torch.compile(objective) if settings.compile else objective
    flops = mae_flops(**work.arch(), mask_ratio=work.mask_ratio, visible_only=False).train
    return Contender(
        name="mask tokens in encoder",
        step=make_step(ablation, lambda: run(imgs), device, settings),
        batch_size=work.batch_size,
        flops_per_image=flops,
        params=count_params(ablation),
        info={"impl": "project", "settings": settings.label(), "variant": "encoder w/ [M]"},
    )


def visible_only_speedup(
    work: Workload, settings: Settings, device: torch.device, *, warmup: int, steps: int, repeats: int
) -> dict[str, Any]:
    """Wall-clock and FLOPs ratio of the two variants for one preset."""
    visible = project_contender(work, settings, device, name="visible only")
    full = mask_tokens_contender(work, settings, device)
    fast, slow = race([visible, full], warmup=warmup, steps=steps, repeats=repeats, device=device)
    return {
        "preset": work.preset,
        "batch_size": work.batch_size,
        "mask_ratio": work.mask_ratio,
        "settings": settings.label(),
        "visible_only": fast.as_dict(),
        "mask_tokens_in_encoder": slow.as_dict(),
        "wallclock_speedup": fast.images_per_s / slow.images_per_s,
        "cpu_time_speedup": fast.images_per_cpu_s / slow.images_per_cpu_s,
        "flops_ratio": (slow.flops_per_image or 0.0) / (fast.flops_per_image or 1.0),
    }

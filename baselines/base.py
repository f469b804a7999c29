"""What every baseline shares: the reconstruction task, the code backbone, the classifier task.

An :class:`AutoencoderTask` sees batches exactly as MAE does (normalized images), works
in [0, 1] pixel space through its :class:`~baselines.pixels.Pixels`, and exposes its
encoder as a :class:`Codes` backbone (normalized images -> flat codes) so the finetune
package's linear probe and :class:`ClassifierTask` evaluate it like the MAE encoder.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from baselines.objectives import LossKind, OutputKind, activate, pixel_metrics, recon_per_image
from baselines.pictures import code_scatter, image_grid
from baselines.pixels import Pixels
from finetune.heads import topk_sums
from launch.task import Batch, Task

#: images per row of the reconstruction grids
GRID = 10


def showcase(labels: Tensor, k: int) -> Tensor:
    """Indices of ``k`` images to draw, one per label first (shards may be sorted by class,
    and a grid of ten zeros shows little), then the rest in order."""
    firsts: dict[int, int] = {}
    for i, label in enumerate(labels.tolist()):
        firsts.setdefault(label, i)
    picked = set(firsts.values())
    order = list(firsts.values()) + [i for i in range(len(labels)) if i not in picked]
    return torch.tensor(order[:k], dtype=torch.long, device=labels.device)


class Codes(nn.Module):
    """Backbone over an encoder: normalized images (N, C, H, W) -> codes (N, num_features).

    ``width`` keeps the first ``width`` code values (a VAE's mean out of [mean, log-variance]).
    """

    def __init__(self, pixels: Pixels, encoder: nn.Module, num_features: int, width: int | None = None) -> None:
        super().__init__()
        self.pixels, self.encoder, self.width = pixels, encoder, width
        # timm's names for the feature width (the probe's head reads ``embed_dim``)
        self.num_features = self.embed_dim = num_features

    def forward(self, images: Tensor) -> Tensor:
        codes = self.encoder(self.pixels.to_unit(images)).flatten(1)
        return codes if self.width is None else codes[:, : self.width]


class AutoencoderTask(Task):
    """Deterministic autoencoder: loss = per-pixel mean reconstruction loss of the clean image."""

    def __init__(
        self,
        pixels: Pixels,
        encoder: nn.Module,
        decoder: nn.Module,
        *,
        num_features: int,
        output: OutputKind = "sigmoid",
        loss: LossKind = "mse",
    ) -> None:
        super().__init__()
        self.pixels, self.encoder, self.decoder = pixels, encoder, decoder
        self.num_features, self.output, self.loss_kind = num_features, output, loss

    def inputs(self, pixels: Tensor) -> Tensor:
        """What the encoder sees during training (a denoising AE corrupts it)."""
        return pixels

    def codes(self, pixels: Tensor) -> Tensor:
        """pixels: (N, C, H, W) in [0, 1] -> (N, num_features)."""
        return self.encoder(pixels).flatten(1)

    def reconstruct(self, pixels: Tensor) -> Tensor:
        """pixels: (N, C, H, W) in [0, 1] -> reconstruction (N, C, H, W)."""
        return activate(self.decoder(self.encoder(pixels)), self.output)

    def recon_loss(self, pre: Tensor, target: Tensor) -> Tensor:
        """Per-image loss, per-pixel mean: pre, target (N, C, H, W) -> (N,)."""
        return recon_per_image(pre, target, self.loss_kind, self.output) / target[0].numel()

    def forward(self, batch: Batch, phase: str = "main") -> dict[str, Tensor]:
        target = self.pixels.to_unit(batch["image"])
        pre = self.decoder(self.encoder(self.inputs(target)))
        return {"loss": self.recon_loss(pre, target).mean()}

    @torch.no_grad()
    def eval_step(self, batch: Batch) -> dict[str, Tensor]:
        """Clean-input reconstruction: sums of the training loss, per-pixel MSE and BCE."""
        target = self.pixels.to_unit(batch["image"])
        pre = self.decoder(self.encoder(target))
        count = torch.tensor(float(target.shape[0]), device=target.device)
        loss = self.recon_loss(pre, target).sum()
        return {"loss": loss, **pixel_metrics(activate(pre, self.output), target), "count": count}

    def picture_rows(self, pixels: Tensor) -> list[Tensor]:
        """Rows of the reconstruction grid: input, then its reconstruction."""
        return [pixels, self.reconstruct(pixels)]

    @torch.no_grad()
    def pictures(self, batch: Batch) -> dict[str, Tensor]:
        """Reconstructions of the first images; codes of the whole batch coloured by label."""
        pixels = self.pixels.to_unit(batch["image"])
        pictures = {"recon": image_grid(self.picture_rows(pixels[showcase(batch["label"], GRID)]))}
        labels = batch["label"]
        if bool((labels >= 0).all()) and pixels.shape[0] >= 10:
            pictures["codes"] = code_scatter(self.codes(pixels), labels, f"{type(self).__name__} codes")
        return pictures

    def backbone(self) -> Codes:
        """The encoder as the probe / classifier sees it."""
        return Codes(self.pixels, self.encoder, self.num_features)

    def stages(self) -> Iterator[tuple[str, Task]]:
        """The unsupervised fits that train this model: one (a stacked AE has one per layer)."""
        yield "train", self


class ClassifierTask(Task):
    """Supervised fine-tuning of a whole backbone with a (BatchNorm +) linear classifier on top."""

    def __init__(self, backbone: Codes, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(True)
        # codes can be tiny in scale (saturated sigmoid units): normalize them first, as the
        # probe's BatchNorm and ViT fine-tuning's fc_norm do, so the head learns at any code scale
        self.head = nn.Sequential(nn.BatchNorm1d(backbone.num_features), nn.Linear(backbone.num_features, num_classes))

    def forward(self, batch: Batch, phase: str = "main") -> dict[str, Tensor]:
        logits = self.head(self.backbone(batch["image"]))
        acc = (logits.argmax(1) == batch["label"]).float().mean() * 100
        return {"loss": F.cross_entropy(logits.float(), batch["label"]), "acc": acc}

    @torch.no_grad()
    def eval_step(self, batch: Batch) -> dict[str, Tensor]:
        """Summed loss, top-1 / top-5 hits in percent (the probe's and fine-tune's evaluation)."""
        return topk_sums(self.head(self.backbone(batch["image"])), batch["label"])

"""The linear probe's settings, apart from its task: ``mae-pretrain``'s ``probe:`` section and
``mae-baseline``'s read them without importing timm, torch or the probe itself."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from launch.config import LogConfig, OptimConfig, Schema, TrainerConfig, over_defaults

Pool = Literal["cls", "avg"]
# the settings a probe and a fine-tune share, each described once
NumClasses = Annotated[int | None, Field(ge=2, description="must equal the dataset manifest's; None = the manifest's")]
ImgSize = Annotated[
    int | None,
    Field(
        ge=1,
        description="train/eval size, a multiple of the patch size (position embeddings are resampled); "
        "None = the backbone's. The data is resized to it",
    ),
]


def _probe_trainer() -> TrainerConfig:
    # Paper: LARS, base lr 0.1, no weight decay, 10 warmup of 90 epochs at batch 16384 (~7k steps on
    # ImageNet; configs/pretrain/vit_base_in1k.yaml). LARS moves each weight by ~lr x 1e-3 (trust
    # coefficient) of its norm per step, which needs that many steps at that lr: on small data
    # (MNIST: a few hundred steps) it barely leaves the init (tests/test_probe.py's 60-step probe: 8 %
    # top-1, chance level; > 45 % with the update below).
    # So the default is plain SGD with momentum -- the update the MNIST figures were measured with
    # -- and on small data the step count is what matters: batch 32 at base lr 1.0 (lr 0.125)
    # gets further in 6 epochs than batch 256 at base lr 0.1 in 10.
    optim = OptimConfig(name="momentum", base_lr=1.0, weight_decay=0.0, warmup_epochs=1.0, momentum=0.9)
    # no picture grids: a probe has none, and the trainer would read an eval batch for nothing
    return TrainerConfig(epochs=6, batch_size=32, optim=optim, log=LogConfig(images_every_epochs=0))


class ProbeConfig(Schema):
    pool: Pool = Field(
        "avg", description="features: 'cls' (class token) or 'avg' (mean of patch tokens), after the final norm"
    )
    num_classes: NumClasses = None
    img_size: ImgSize = None
    train_preset: Literal["eval", "pretrain", "finetune"] = Field(
        "eval", description="data augmentation of the probe's training split"
    )
    model_args: dict[str, Any] = Field(
        default_factory=dict,
        description="architecture overrides for a timm-name backbone (e.g. {img_size: 28, in_chans: 1})",
    )
    trainer: Annotated[TrainerConfig, over_defaults(_probe_trainer)] = Field(
        default_factory=_probe_trainer,
        description="probe training (defaults: SGD + momentum, lr 1.0 x batch/256, no weight decay)",
    )

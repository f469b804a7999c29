"""``mae-pretrain`` settings: one typed tree, defaults <- YAML <- ``key=value`` overrides.

The schema defaults are the MAE paper's recipe (AdamW 0.9 / 0.95, weight decay 0.05,
base lr 1.5e-4 per 256 images, per-step warmup then cosine, mask ratio 0.75,
normalized-pixel loss). The no-argument run reads ``configs/pretrain/mnist_tiny.yaml``
(a tiny MAE on the shipped MNIST), which is where its numbers are tuned.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from finetune.config import ProbeConfig
from launch.config import OptimConfig, Schema, TrainerConfig
from launch.data import DataConfig
from pretrain.presets import MAEConfig

#: the configuration ``mae-pretrain`` runs when given no ``--config``
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "mnist_tiny.yaml"


def _mae_trainer() -> TrainerConfig:
    # MAE paper, App. A.1: AdamW (0.9, 0.95), wd 0.05, base lr 1.5e-4, 40 warmup epochs of 800
    optim = OptimConfig(name="adamw", base_lr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95), warmup_epochs=40)
    return TrainerConfig(epochs=800, batch_size=64, optim=optim)


class PretrainConfig(Schema):
    """Everything a pretraining run reads; saved resolved as ``run_dir/config.yaml``."""

    run_dir: str = Field(
        "runs/mae", description="output folder: config, metrics, TensorBoard, checkpoints, export, probe"
    )
    seed: int = Field(0, description="random seed (model init, masks; data order per rank)")
    data: DataConfig = Field(default_factory=DataConfig, description="shards to pretrain (and probe) on")
    model: MAEConfig = Field(default_factory=MAEConfig, description="MAE architecture, mask ratio, loss")
    trainer: TrainerConfig = Field(
        default_factory=_mae_trainer, description="training loop, optimizer, checkpoints, logging"
    )
    probe: ProbeConfig = Field(default_factory=ProbeConfig, description="linear probe of the pretrained encoder")
    export: bool = Field(True, description="write the encoder as a timm folder (run_dir/export/timm) and the full MAE")
    linear_probe: bool = Field(True, description="run the linear probe after pretraining (needs a labelled val split)")
    picture: bool = Field(True, description="save a reconstruction picture (run_dir/reconstruction.png)")

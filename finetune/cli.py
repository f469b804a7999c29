"""What ``mae-probe`` and ``mae-finetune`` share: parse the run config, run the stage.

The resolved config is written by the trainer once every bad-input check has passed, so a
rejected command never touches an existing run directory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import Field

from launch.cli import config_parser, parse_config
from launch.config import Schema
from launch.data import DataConfig

if TYPE_CHECKING:
    from launch.trainer import FitResult

R = TypeVar("R", bound="StageRun")


class StageRun(Schema):
    """What every downstream command takes; a stage adds its ``run_dir`` default and its section."""

    backbone: str = Field(
        ..., description="export folder, pretraining run/checkpoint, official MAE .pth, or timm model name"
    )
    run_dir: str = Field(..., description="output folder")
    seed: int = Field(0, description="random seed")
    data: DataConfig = Field(default_factory=DataConfig)


def run_stage(
    prog: str, schema: type[R], description: str, argv: list[str], section: str, stage: Callable[..., FitResult]
) -> tuple[R, FitResult]:
    """Parse ``argv`` into ``schema`` (fields: backbone, run_dir, seed, data, ``section``), run
    ``stage(cfg.<section>, backbone=..., data=..., run_dir=..., seed=..., config=...)``."""
    cfg, _ = parse_config(config_parser(prog, schema, description), schema, argv)
    result = stage(
        getattr(cfg, section),
        backbone=cfg.backbone,
        data=cfg.data,
        run_dir=Path(cfg.run_dir),
        seed=cfg.seed,
        config=cfg.model_dump(mode="json"),
    )
    return cfg, result


def percent(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    return "n/a" if value is None else f"{value:.2f}%"

"""Config of a baseline run: ``mae-baseline NAME [--config FILE] [key=value ...]``.

Layers, later wins: the baseline defaults below <- the recipe ``configs/baselines/NAME.yaml``
(or just ``model.family: NAME``) <- ``--config FILE`` <- ``key=value`` overrides. The merge
happens on plain dicts before validation, so a partial ``trainer:`` section keeps the
baseline defaults of the keys it does not name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator

from baselines.families import FAMILIES, ModelConfig, check_img_size
from finetune.config import ProbeConfig
from launch.config import Schema, TrainerConfig, describe_error, load_config, merge, over_defaults, read_yaml
from launch.data.config import DataConfig
from launch.errors import ConfigError

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "baselines"

#: the classic recipe: Adam at 1e-3, no weight decay, no augmentation of the 28 x 28 digits
DEFAULTS: dict[str, Any] = {
    "data": {"hflip": 0.0, "eval_crop_pct": 1.0},
    "trainer": {
        "epochs": 10,
        "batch_size": 32,
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999], "schedule": "cosine"},
        "log": {"every_steps": 10, "images_every_epochs": 5, "progress": False},
        "checkpoint": {"keep": 1},
    },
}


class BaselineConfig(Schema):
    name: str = Field("", description="recipe name (set by the command line)")
    model: ModelConfig = Field(..., description="the family and its settings (model.family selects the schema)")
    data: DataConfig = DataConfig()
    trainer: TrainerConfig = TrainerConfig()
    img_size: int = Field(28, ge=4, le=1024, description="side of the (square) training images")
    seed: int = Field(0, ge=0, description="random seed of the run")
    train_preset: Literal["pretrain", "eval", "finetune"] = Field(
        "eval", description="loader preset of the training split (eval = no augmentation)"
    )
    run_root: str = Field("runs/baselines", description="results go to run_root/<name>")
    latent_sweep: list[int] = Field(
        [], description="train once per latent size (e.g. [5, 10, 16, 20, 32]) and plot the error curve"
    )
    probe: ProbeConfig | None = Field(
        default_factory=ProbeConfig, description="linear probe of the codes, the MAE probe's protocol (null = skip)"
    )
    finetune: Annotated[TrainerConfig | None, over_defaults(lambda: DEFAULTS["trainer"])] = Field(
        None, description="supervised fine-tuning of encoder + linear head (None = skip)"
    )

    @model_validator(mode="after")
    def _sweep_needs_latent(self) -> BaselineConfig:
        if self.latent_sweep and not hasattr(self.model, "latent_dim"):
            with_latent = [f for f, (schema, _) in FAMILIES.items() if "latent_dim" in schema.model_fields]
            raise ValueError(
                f"latent_sweep needs a family with latent_dim ({', '.join(with_latent)}), got {self.model.family}"
            )
        for size in self.latent_sweep:
            try:
                type(self.model).model_validate(self.model.model_dump() | {"latent_dim": size})
            except ValidationError as err:
                raise ValueError(f"latent_sweep size {size}: {describe_error(type(self.model), err)}") from None
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root) / self.name


def recipe_names() -> list[str]:
    """Every accepted NAME: the shipped recipes plus the bare family names."""
    files = {p.stem for p in RECIPES.glob("*.yaml")} if RECIPES.is_dir() else set()
    return sorted(files | set(FAMILIES))


def recipe(name: str) -> dict[str, Any]:
    """The recipe's YAML, or ``{"model": {"family": name}}`` for a bare family name."""
    path = RECIPES / f"{name}.yaml"
    if path.is_file():
        return read_yaml(path)
    if name in FAMILIES:
        return {"model": {"family": name}}
    raise ConfigError(f"unknown baseline '{name}'; allowed: {', '.join(recipe_names())}")


def load_baseline_config(
    name: str, path: str | Path | None = None, overrides: list[str] | None = None
) -> BaselineConfig:
    """Defaults <- recipe ``name`` <- file ``path`` <- ``overrides``; validated, one-line errors."""
    cfg = load_config(BaselineConfig, path, overrides, defaults=merge(DEFAULTS, recipe(name)))
    cfg.name = name
    check_img_size(cfg.model, cfg.img_size)
    return cfg

"""The model families: name -> (config schema, task builder). One module per family."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from pydantic import Field

from baselines import aae, ae, cae, dae, stacked, vae
from baselines.nets import check_conv_size
from baselines.pixels import Pixels
from launch.task import Task

FAMILIES: dict[str, tuple[type, Callable[..., Task]]] = {
    "ae": (ae.AEConfig, ae.build),
    "dae": (dae.DAEConfig, dae.build),
    "sdae": (stacked.SDAEConfig, stacked.build),
    "cae": (cae.CAEConfig, cae.build),
    "vae": (vae.VAEConfig, vae.build),
    "aae": (aae.AAEConfig, aae.build),
}

#: a model config; its ``family`` key selects the schema (unknown keys of that family fail)
ModelConfig = Annotated[
    ae.AEConfig | dae.DAEConfig | stacked.SDAEConfig | cae.CAEConfig | vae.VAEConfig | aae.AAEConfig,
    Field(discriminator="family"),
]


def check_img_size(cfg: ModelConfig, img_size: int) -> None:
    """Conv models need a side their MaxPool / Upsample pairs invert exactly (checked before any data is read)."""
    if cfg.family in ("cae", "dae") or getattr(cfg, "arch", "mlp") == "conv":
        check_conv_size(cfg.family, img_size, len(cfg.widths))


def build_task(cfg: ModelConfig, pixels: Pixels, img_size: int) -> Task:
    """The task of ``cfg.family`` for images of ``pixels.channels`` x ``img_size`` x ``img_size``."""
    return FAMILIES[cfg.family][1](cfg, pixels, img_size)

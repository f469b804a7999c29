"""What the launcher asked for, reconciled with the run config: the environment `accelerate launch`
set, and the DeepSpeed JSON (the run config fills every batch / precision / ZeRO key; a user
file may add others but must not contradict it). A contradiction is refused, never silently
overridden either way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from launch.config import TrainerConfig, merge
from launch.errors import ConfigError

#: trainer.precision -> Accelerate's mixed_precision
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def deepspeed_config(cfg: TrainerConfig, world: int) -> dict[str, Any]:
    """The DeepSpeed JSON for this run: ``cfg`` fills every batch / precision / ZeRO key;
    a user file (``cfg.deepspeed_config``) may add other keys but must not contradict."""
    ours: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.accum_steps,
        "train_batch_size": cfg.batch_size * cfg.accum_steps * world,
        "zero_optimization": {"stage": cfg.zero_stage},
        "gradient_clipping": cfg.optim.clip_grad or 0.0,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    # `accelerate launch` with a DeepSpeed config file passes it through the environment
    path = cfg.deepspeed_config or LAUNCH_ENV.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path:
        return ours
    user = _read_json(Path(path))
    for section in ("optimizer", "scheduler"):
        if section in user:
            raise ConfigError(
                f"DeepSpeed config {path} has an '{section}' section: remove it, the {section} comes from trainer.optim"
            )
    _check_agrees(user, ours, path)
    return merge(user, ours)


#: the launcher's settings as the process started: Accelerate writes some of these variables
#: itself when it builds a DeepSpeed run, which must not leak into the next fit (e.g. the probe)
_LAUNCH_KEYS = (
    "ACCELERATE_USE_DEEPSPEED",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE",
    "ACCELERATE_MIXED_PRECISION",
    "ACCELERATE_DEEPSPEED_CONFIG_FILE",
)
LAUNCH_ENV = {k: os.environ[k] for k in _LAUNCH_KEYS if k in os.environ}


def restore_env(*, deepspeed: bool) -> None:
    """Put the launcher's variables back as the process started (Accelerate reads them in
    ``Accelerator.__init__``); a fit without DeepSpeed gets none of the DeepSpeed ones, from
    which Accelerate would build DeepSpeed (a DDP probe after a DeepSpeed pretraining)."""
    for key in _LAUNCH_KEYS:
        os.environ.pop(key, None)
    os.environ.update({k: v for k, v in LAUNCH_ENV.items() if deepspeed or "DEEPSPEED" not in k})


def check_launcher(cfg: TrainerConfig, env: dict[str, str] | None = None) -> None:
    """The run config decides precision and backend; an `accelerate launch` config file that
    asks for something else is refused rather than silently overridden either way."""
    env = LAUNCH_ENV if env is None else env
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and cfg.backend != "deepspeed":
        raise ConfigError(
            f"launched with a DeepSpeed Accelerate config but trainer.backend={cfg.backend}: "
            "add trainer.backend=deepspeed trainer.zero_stage=N"
        )
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if cfg.backend == "deepspeed" and stage and int(stage) != cfg.zero_stage:
        raise ConfigError(
            f"the launcher asks for ZeRO stage {stage} but trainer.zero_stage={cfg.zero_stage}: make them agree"
        )
    launcher = env.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher not in ("no", MIXED_PRECISION[cfg.precision]):
        raise ConfigError(
            f"the launcher asks mixed_precision={launcher} but trainer.precision={cfg.precision}: "
            "set trainer.precision (and mixed_precision: 'no' in the Accelerate config)"
        )


_SETTING = {
    "train_micro_batch_size_per_gpu": "trainer.batch_size",
    "gradient_accumulation_steps": "trainer.accum_steps",
    "train_batch_size": "trainer.batch_size * trainer.accum_steps * world size",
    "zero_optimization.stage": "trainer.zero_stage",
    "gradient_clipping": "trainer.optim.clip_grad",
    "bf16.enabled": "trainer.precision",
    "fp16.enabled": "trainer.precision",
}


def _check_agrees(user: dict[str, Any], ours: dict[str, Any], path: str) -> None:
    for dotted, setting in _SETTING.items():
        node: Any = user
        for part in dotted.split("."):
            node = node.get(part, "auto") if isinstance(node, dict) else "auto"
        want: Any = ours
        for part in dotted.split("."):
            want = want[part]
        if node != "auto" and node != want and not (dotted == "gradient_clipping" and not node and not want):
            raise ConfigError(
                f"DeepSpeed config {path} sets {dotted}={node} but the run config gives {want} ({setting})"
            )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"trainer.deepspeed_config: file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"trainer.deepspeed_config {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"trainer.deepspeed_config {path} must hold a JSON object")
    return data

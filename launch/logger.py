"""Run logging: progress bar, JSONL metrics, TensorBoard scalars + image grids, optional W&B.

Only global rank 0 writes (``enabled=False`` elsewhere makes every method a no-op), so
a multi-node run produces one set of files. Values arrive as Python floats: the trainer
reads device tensors only at log intervals.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm

from launch.config import LogConfig
from launch.errors import ConfigError

log = logging.getLogger(__name__)


class RunLogger:
    """Writes ``run_dir/metrics.jsonl``, ``run_dir/tensorboard/`` and the console bar."""

    def __init__(
        self,
        run_dir: Path,
        cfg: LogConfig,
        *,
        total_steps: int,
        enabled: bool,
        config: dict[str, Any] | None = None,
        initial_step: int = 0,
    ) -> None:
        self.enabled = enabled
        self.start = time.monotonic()
        self.bar = self.tb = self.wandb = self.jsonl = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = (run_dir / "metrics.jsonl").open("a", buffering=1)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if cfg.wandb:
            self.wandb = _start_wandb(run_dir, cfg, config or {})
        if cfg.progress:
            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True, leave=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def scalars(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        """One JSONL record + TensorBoard scalars ``prefix/name`` (+ progress-bar postfix)."""
        if not self.enabled:
            return
        record = {"step": step, "split": prefix, "time": round(time.monotonic() - self.start, 3), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for name, value in metrics.items():
                self.tb.add_scalar(f"{prefix}/{name}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)
        if self.bar is not None and prefix == "train":
            shown = {k: metrics[k] for k in ("loss", "lr", "images_per_s") if k in metrics}
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
        elif prefix != "train":
            log.info("step %d %s: %s", step, prefix, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def images(self, step: int, pictures: dict[str, Tensor]) -> None:
        """Image grids ``name -> (3, H, W)`` float in [0, 1]."""
        if not self.enabled:
            return
        for name, img in pictures.items():
            if self.tb is not None:
                self.tb.add_image(f"images/{name}", img.detach().float().clamp(0, 1).cpu(), step)
            if self.wandb is not None:
                import wandb

                self.wandb.log({f"images/{name}": wandb.Image(img.permute(1, 2, 0).float().cpu().numpy())}, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


def check_available(cfg: LogConfig) -> None:
    """Fail before the run writes anything when an asked-for backend is not installed."""
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("trainer.log.wandb=true needs wandb: pip install 'mae-pipeline[wandb]'")


def _start_wandb(run_dir: Path, cfg: LogConfig, config: dict[str, Any]) -> Any:
    import wandb

    return wandb.init(dir=str(run_dir), mode=cfg.wandb_mode, config=config, name=run_dir.name, resume="allow")

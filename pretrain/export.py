"""``mae-export``: a pretraining checkpoint -> a timm model folder + the full official-named MAE.

Layout written under ``--out DIR``::

    DIR/timm/config.json         timm hub config: architecture, model_args, num_classes, pretrained_cfg
    DIR/timm/model.safetensors   the encoder under timm ``VisionTransformer`` keys, no decoder
    DIR/timm/README.md           Hub model card: what the model is, its recipe, steps, losses (launch/card.py)
    DIR/full/config.json         {"architecture": "mae", "model_args": <MaskedAutoencoderViT kwargs>, ...}
    DIR/full/model.safetensors   encoder + decoder under the official MAE names

``timm.create_model("local-dir:DIR/timm", pretrained=True)`` loads the first with no project
code (the folder can be pushed to the Hugging Face hub as is); :func:`load_full` rebuilds the
second for visualization or continued pretraining. ``mae-export RUN_DIR`` reads the newest
complete checkpoint of a pretraining run (or the ``step-*`` directory given) and its
resolved ``config.yaml``::

    mae-export runs/mae-mnist                       # -> runs/mae-mnist/export/{timm,full}
    mae-export runs/mae-mnist/checkpoints/step-00000300 --out /tmp/mae-step300

The timm folder is written by ``launch/export.py`` (shared with fine-tuned classifiers). Every
folder is written next to its final place and renamed at the end, so an interrupted export
never looks complete.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import Tensor, nn

from launch.card import write_card
from launch.checkpoint import TRAINER_FILE, checkpoint_model, load_checked, load_file, resolve
from launch.cli import entry_point
from launch.config import load_config
from launch.data import dataset_info
from launch.errors import CheckpointError
from launch.export import export_timm, read_export_config, write_atomically
from pretrain.card import checkpoint_card
from pretrain.config import PretrainConfig
from pretrain.model import MaskedAutoencoderViT
from pretrain.task import build_task

FULL_ARCHITECTURE = "mae"


def export_full(
    model: nn.Module,
    out_dir: str | Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the whole MAE (encoder + decoder, official names) as ``model.safetensors`` plus a
    ``config.json`` holding its constructor arguments, the normalization and ``extra``
    (e.g. ``{"norm_pix_loss": true, "mask_ratio": 0.75}``)."""
    if not hasattr(model, "arch") or not hasattr(model, "encoder_state_dict"):
        raise CheckpointError(f"{type(model).__name__} is not a MaskedAutoencoderViT: nothing to export in full")
    config = {
        "architecture": FULL_ARCHITECTURE,
        "model_args": dict(model.arch),
        "pretrained_cfg": {
            "input_size": [model.in_chans, model.img_size, model.img_size],
            "mean": list(map(float, mean)),
            "std": list(map(float, std)),
        },
        **(extra or {}),
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        safetensors.torch.save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))

    return write_atomically(Path(out_dir), write, overwrite)


def load_full(path: str | Path) -> tuple[MaskedAutoencoderViT, dict[str, Any]]:
    """Rebuild a :func:`export_full` folder: ``(MaskedAutoencoderViT in eval mode, config)``."""
    path = Path(path)
    config = read_export_config(path)
    if config.get("architecture") != FULL_ARCHITECTURE:
        raise CheckpointError(
            f"{path} holds a '{config.get('architecture')}' export, not a full MAE; use its full/ folder"
        )
    model = MaskedAutoencoderViT(**config["model_args"])
    load_checked(model, safetensors.torch.load_file(str(path / "model.safetensors")), what=f"{path}/model.safetensors")
    return model.eval(), config


def load_pretraining_mae(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The MAE of a pretraining run: ``path`` is its run directory (newest complete checkpoint)
    or a ``step-*`` checkpoint. Returns ``(model in eval mode, {"config", "checkpoint", "mean", "std"})``."""
    ckpt = _resolve_checkpoint(Path(path))
    cfg_file = ckpt.parent.parent / "config.yaml"
    if not cfg_file.is_file():
        raise CheckpointError(
            f"{cfg_file} is missing: cannot tell the architecture of {ckpt} (not a mae-pretrain run?)"
        )
    cfg = load_config(PretrainConfig, cfg_file)
    task = build_task(cfg.model)
    state = _task_state(ckpt, like=task.state_dict())
    if not any(k.startswith("model.") for k in state):
        raise CheckpointError(f"{ckpt} holds no MAE encoder (no 'model.*' weights): not a pretraining checkpoint")
    load_checked(task, state, what=f"checkpoint {ckpt}")
    meta = {"config": cfg, "checkpoint": ckpt, "mean": cfg.data.mean, "std": cfg.data.std}
    return task.model.eval(), meta


def _resolve_checkpoint(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist: give a pretraining run directory or a checkpoints/step-* directory"
        )
    try:
        ckpt = resolve(path)
    except CheckpointError:
        ckpt = None
    if ckpt is None or not (ckpt / TRAINER_FILE).is_file():
        raise CheckpointError(
            f"no complete checkpoint in {path}: give a run directory with checkpoints/step-* or one of them"
        )
    return ckpt


def _task_state(ckpt: Path, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """The task's weights: the trainer's file, FSDP's shards (read in this one process, whatever
    world size wrote them; ``like`` names the tensors) or DeepSpeed's engine files consolidated to fp32."""
    state = checkpoint_model(ckpt, like)
    if state is not None:
        return state
    if not (ckpt / "engine").is_dir():
        raise CheckpointError(
            f"{ckpt} holds no model weights (neither 'model' in {TRAINER_FILE}, FSDP shards nor a DeepSpeed engine)"
        )
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # below ZeRO stage 2 DeepSpeed's consolidation omits frozen parameters (pos_embed): the trainer saves them
    frozen = load_file(ckpt / TRAINER_FILE).get("frozen", {})
    return {**frozen, **get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="engine")}


def _normalization(meta: dict[str, Any], args: argparse.Namespace) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``--mean/--std``, else the run's data config, else the dataset manifest's measured values."""
    mean, std = args.mean or meta["mean"], args.std or meta["std"]
    if mean is None or std is None:
        info = dataset_info(meta["config"].data)
        mean, std = mean or info.mean, std or info.std
    return tuple(mean), tuple(std)


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mae-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="pretraining run directory or checkpoints/step-* directory")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <run_dir>/export)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing export folders")
    parser.add_argument(
        "--mean", type=float, nargs="+", default=None, help="normalization mean per channel (default: the run's)"
    )
    parser.add_argument(
        "--std", type=float, nargs="+", default=None, help="normalization std per channel (default: the run's)"
    )
    parser.add_argument("--license", default="unknown", help="Hub license id for the model card (default: unknown)")
    args = parser.parse_args(argv)
    model, meta = load_pretraining_mae(args.source)
    mean, std = _normalization(meta, args)
    out = args.out or meta["checkpoint"].parent.parent / "export"
    cfg = meta["config"]
    extra = {
        "mask_ratio": cfg.model.mask_ratio,
        "norm_pix_loss": cfg.model.norm_pix_loss,
        "checkpoint": str(meta["checkpoint"]),
    }
    timm_dir = export_timm(model, out / "timm", mean=mean, std=std, overwrite=args.overwrite)
    facts = checkpoint_card(cfg, meta["checkpoint"])
    facts.license = args.license
    write_card(timm_dir, facts)
    full_dir = export_full(model, out / "full", mean=mean, std=std, extra=extra, overwrite=args.overwrite)
    print(
        f"mae-export: {meta['checkpoint']} -> {timm_dir} "
        f"(timm.create_model('local-dir:{timm_dir}', pretrained=True)) and {full_dir}"
    )
    return 0


main = entry_point("mae-export", run)

"""Every kind of task trained under DeepSpeed, as a torchrun script:

    torchrun --standalone --nproc_per_node 2 tests/deepspeed_tasks.py OUT STAGE PRECISION KIND[,KIND...]

KIND is mae, probe, finetune (mixup + cutmix on) or a baseline family (ae, dae, cae, vae, sdae:
every greedy stage of the stack). Each trains 8 steps on synthetic 1 x 8 x 8 images with
ZeRO-3's ``stage3_param_persistence_threshold`` 0 (every parameter partitioned, as at ViT-L
scale), evaluating and drawing pictures at the end of epoch 1 (step 6, then training goes on)
and at the end. Rank 0 writes ``OUT/results.json``: per kind the train
and eval losses and what ``fit`` handed back (fp32, whole, DeepSpeed's attributes gone).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from timm.data import Mixup
from timm.models.vision_transformer import VisionTransformer
from trainer_tiny import synthetic_factory

from launch import dist
from launch.config import TrainerConfig, load_config
from launch.task import Task
from launch.trainer import fit

CLASSES = 4
VIT = {"img_size": 8, "patch_size": 4, "in_chans": 1, "embed_dim": 16, "depth": 1, "num_heads": 2}


def build(kind: str) -> Task:
    from baselines import cae, dae, stacked, vae
    from baselines.ae import AEConfig
    from baselines.families import build_task
    from baselines.pixels import Pixels
    from finetune.finetune import FinetuneTask
    from finetune.probe import ProbeTask
    from pretrain.presets import create_mae
    from pretrain.task import MAETask

    if kind == "mae":
        mae = create_mae("mae_vit_mnist_p4", **VIT, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
        return MAETask(mae, image_mean=(0.0,), image_std=(1.0,))
    if kind == "probe":
        return ProbeTask(VisionTransformer(**VIT, num_classes=0), CLASSES)
    if kind == "finetune":
        mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=CLASSES)
        return FinetuneTask(VisionTransformer(**VIT, num_classes=CLASSES), mixup=mixup, smoothing=0.1)
    configs = {
        "ae": AEConfig(latent_dim=4, hidden=[16]),
        "dae": dae.DAEConfig(widths=[4]),
        "cae": cae.CAEConfig(widths=[4]),
        "vae": vae.VAEConfig(hidden=[16]),
        "sdae": stacked.SDAEConfig(layers=[16, 8]),
    }
    return build_task(configs[kind], Pixels((0.0,), (1.0,)), 8)


def train(kind: str, out: Path, cfg: TrainerConfig) -> dict[str, Any]:
    task = build(kind)
    sizes = {k: v.numel() for k, v in task.state_dict().items()}
    stages = task.stages() if hasattr(task, "stages") else [("train", task)]
    record: dict[str, Any] = {}
    for name, stage in stages:
        torch.manual_seed(0)
        result = fit(
            stage,
            cfg,
            None,
            out / kind / name,
            seed=0,
            img_size=8,
            loader_factory=synthetic_factory(shape=(1, 8, 8), classes=CLASSES),
        )
        record[name] = {
            "loss": result.final_loss,
            "eval": result.eval,
            "same_task": result.task is stage,
            "checkpoint": str(result.checkpoint),
        }
    state = task.state_dict()
    leftovers = sorted(
        {k for m in task.modules() for k in vars(m) if k.startswith("ds_")}
        | {n for n, p in task.named_parameters() if hasattr(p, "ds_id")}
    )
    record["whole"] = all(state[k].numel() == n for k, n in sizes.items())
    record["dtypes"] = sorted({str(v.dtype) for v in state.values() if v.is_floating_point()})
    record["deepspeed_leftovers"] = leftovers
    if kind == "mae":  # the trained weights are DeepSpeed's fp32 masters, not the bf16 module copy
        record["state"] = {k: v.cpu() for k, v in state.items()}
    return record


def main(out: Path, stage: str, precision: str, kinds: list[str]) -> None:
    ds_json = out / "ds.json"
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        ds_json.write_text(
            json.dumps({"zero_optimization": {"stage": int(stage), "stage3_param_persistence_threshold": 0}})
        )
    dist.barrier()
    cfg = load_config(
        TrainerConfig,
        None,
        [
            "backend=deepspeed",
            f"zero_stage={stage}",
            f"precision={precision}",
            f"deepspeed_config={ds_json}",
            "max_steps=8",
            "batch_size=8",
            "eval_batches=1",
            "log.every_steps=1",
            "log.progress=false",
            "log.images_every_epochs=1",
            "optim.warmup_steps=0",
            "optim.base_lr=0.01",
        ],
    )
    results = {kind: train(kind, out, cfg) for kind in kinds}
    if dist.is_main():
        states = {kind: r.pop("state") for kind, r in results.items() if "state" in r}
        torch.save(states, out / "states.pt")
        (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    dist.init_process_group()
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4].split(","))

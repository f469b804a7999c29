"""Baselines learn on the real MNIST shards: every model's loss drops clearly in a short run,
the AAE's discriminator leaves chance while its codes approach the prior, and the stacked
AE's greedy stage (through the shared trainer) leaves the lower layers bit-identical; the
raw-pixel probe (the comparison table's floor row) runs through the same trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from baselines import aae, ae, cae, dae, stacked, vae
from baselines.config import load_baseline_config
from baselines.families import build_task
from baselines.pixels import Pixels
from baselines.run import probe_pixels
from launch.config import TrainerConfig
from launch.data import DataConfig, build_loader, dataset_info
from launch.task import Task
from launch.trainer import fit


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    cfg = DataConfig(root=str(tmp_path_factory.mktemp("data")), workers=0, hflip=0.0, eval_crop_pct=1.0)
    dataset_info(cfg)  # prepares the shipped MNIST shards once
    return cfg


@pytest.fixture(scope="module")
def mnist(data: DataConfig) -> tuple[dict, dict, Pixels]:
    """The real val shards in memory: 800 images to train on, 200 held out for the checks."""
    loader = build_loader(data, "val", preset="eval", batch_size=1000, img_size=28, seed=0)
    batch = next(iter(loader))
    train = {"image": batch["image"][:800], "label": batch["label"][:800]}
    held = {"image": batch["image"][800:], "label": batch["label"][800:]}
    info = loader.info
    return train, held, Pixels(info.mean, info.std)


def train_steps(task: Task, train: dict, steps: int, lr: float = 2e-3, batch: int = 50) -> None:
    """Plain Adam over the task's phases, as the trainer would step them."""
    opts = {
        p: torch.optim.Adam([q for q in task.phase_module(p).parameters() if q.requires_grad], lr=lr)
        for p in task.phases
    }
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, train["image"].shape[0], (batch,), generator=gen)
        mb = {"image": train["image"][idx], "label": train["label"][idx]}
        for phase in task.phases:
            task.zero_grad(set_to_none=True)
            task(mb, phase)["loss"].backward()
            opts[phase].step()


def held_loss(task: Task, held: dict) -> float:
    torch.manual_seed(1)  # the same noise / reparameterization draws before and after
    sums = task.eval_step(held)
    return (sums["loss"] / sums["count"]).item()


MODELS = {
    "ae": ae.AEConfig(hidden=[128], latent_dim=16),
    "ae_relu": ae.AEConfig(hidden=[128], latent_dim=16, output="relu"),
    "dae": dae.DAEConfig(widths=[8, 8], loss="bce"),
    "dae_mask": dae.DAEConfig(widths=[8, 8], noise="mask", noise_level=0.3),
    "sdae": stacked.SDAEConfig(layers=[128, 32]),
    "cae": cae.CAEConfig(widths=[8, 8]),
    "vae": vae.VAEConfig(hidden=[128], latent_dim=8),
    "vae_conv": vae.VAEConfig(arch="conv", widths=[8, 8], latent_dim=8),
    "aae": aae.AAEConfig(hidden=[128], latent_dim=4, disc_hidden=[64]),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_loss_drops_clearly_on_real_mnist(name: str, mnist) -> None:
    train, held, pixels = mnist
    torch.manual_seed(0)
    task = build_task(MODELS[name], pixels, 28)
    if name == "sdae":
        task = next(iter(task.stages()))[1]  # the bottom layer's greedy task: a DAE on the pixels
    before = held_loss(task, held)
    train_steps(task, train, steps=30, lr=3e-3, batch=32)
    after = held_loss(task, held)
    assert after < 0.8 * before, f"{name}: held-out loss {before:.4f} -> {after:.4f}"


def prior_distance(codes: torch.Tensor) -> float:
    """Moment mismatch with N(0, I): |mean|^2 + |std - 1|^2 over the code dimensions."""
    return (codes.mean(0).pow(2).sum() + (codes.std(0) - 1).pow(2).sum()).item()


def test_aae_discriminator_learns_and_codes_approach_the_prior(mnist) -> None:
    train, held, pixels = mnist
    cfg = aae.AAEConfig(hidden=[64], latent_dim=2, disc_hidden=[32])
    torch.manual_seed(0)
    task = build_task(cfg, pixels, 28)
    torch.manual_seed(0)
    recon_only = build_task(cfg, pixels, 28)
    recon_only.phases = ("recon",)  # the same autoencoder without the adversarial phases

    codes = lambda t: t.codes(t.pixels.to_unit(held["image"])).detach()  # noqa: E731
    train_steps(task, train, steps=100, lr=1e-3, batch=32)
    train_steps(recon_only, train, steps=100, lr=1e-3, batch=32)

    torch.manual_seed(0)
    sums = task.eval_step(held)
    accuracy = (sums["disc_acc"] / sums["count"]).item()
    assert accuracy > 0.55, f"discriminator accuracy {accuracy:.3f} is still at chance"
    adversarial, plain = prior_distance(codes(task)), prior_distance(codes(recon_only))
    # a plain AE's codes drift far from N(0, I); the adversarial phases pull them back toward it
    assert adversarial < 0.5 * plain, f"code/prior moment mismatch {adversarial:.2f} (AAE) vs {plain:.2f} (recon only)"


def test_greedy_stage_keeps_lower_layers_bit_identical(data: DataConfig, mnist, tmp_path: Path) -> None:
    """Through the shared trainer: layer 1's fit must not move layer 0 by a single bit."""
    _, _, pixels = mnist
    task = build_task(stacked.SDAEConfig(layers=[64, 16]), pixels, 28)
    trainer = TrainerConfig(
        max_steps=4,
        batch_size=32,
        eval_every_epochs=0,
        optim={"lr": 1e-2, "weight_decay": 0.0},
        log={"progress": False, "tensorboard": False},
    )
    stages = task.stages()
    layers = task.stack.layers
    for i, (name, stage) in enumerate(stages):
        before = {k: v.clone() for k, v in task.stack.state_dict().items()}
        fit(stage, trainer, data, tmp_path / name, seed=0, img_size=28, train_preset="eval")
        after = task.stack.state_dict()
        lower = [k for k in before if k.startswith(tuple(f"layers.{j}." for j in range(i)))]
        own = [k for k in before if k.startswith(f"layers.{i}.")]
        upper = [k for k in before if k.startswith(tuple(f"layers.{j}." for j in range(i + 1, len(layers))))]
        assert all(torch.equal(before[k], after[k]) for k in lower + upper), f"{name} moved a frozen layer"
        assert all(not torch.equal(before[k], after[k]) for k in own), f"{name} did not train its own layer"
        assert [p.requires_grad for p in layers[i].parameters()] == [True] * 4


def test_probe_pixels_probes_the_flat_pixels_through_the_trainer(data: DataConfig, tmp_path: Path) -> None:
    """The table's floor row: the codes' linear probe with the raw pixels as the code."""
    overrides = [
        f"run_root={tmp_path}",
        f"data.root={data.root}",
        "data.workers=0",
        "probe.trainer.max_steps=6",
        "probe.trainer.eval_every_epochs=0",
        "probe.trainer.log.progress=false",
    ]
    cfg = load_baseline_config("ae", None, overrides).model_copy(update={"name": "pixels"})
    results = probe_pixels(cfg, tmp_path / "pixels")
    saved = json.loads((tmp_path / "pixels" / "results.json").read_text())
    assert saved == results and saved["params"] == 0 and saved["probe"]["steps"] == 6
    assert 0 <= saved["probe"]["top1"] <= 100
    assert (
        yaml.safe_load((tmp_path / "pixels" / "config.yaml").read_text())["probe"]["trainer"]["optim"]["name"]
        == "momentum"
    )

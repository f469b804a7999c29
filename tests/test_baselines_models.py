"""Baseline models on tensors: shapes both ways for 1 and 3 channels, pixel space, noise,
the VAE's KL against the closed form, prior samples, priors, conv size checks."""

from __future__ import annotations

import math

import pytest
import torch

from baselines import aae, ae, cae, dae, stacked, vae
from baselines.families import build_task
from baselines.objectives import kl_standard_normal
from baselines.pixels import Pixels, corrupt
from baselines.priors import GaussianPrior, MixturePrior
from launch.errors import ConfigError

SIZE = 16
MODELS = {
    "ae": ae.AEConfig(hidden=[32], latent_dim=8),
    "ae_relu": ae.AEConfig(hidden=[32], latent_dim=8, output="relu"),
    "dae": dae.DAEConfig(widths=[8, 8]),
    "dae_mask": dae.DAEConfig(widths=[8, 8], noise="mask", noise_level=0.3),
    "sdae": stacked.SDAEConfig(layers=[32, 8]),
    "cae": cae.CAEConfig(widths=[8, 4]),
    "vae": vae.VAEConfig(hidden=[32], latent_dim=2),
    "vae_conv": vae.VAEConfig(arch="conv", widths=[8, 8], latent_dim=4),
    "aae": aae.AAEConfig(hidden=[32], latent_dim=2, disc_hidden=[16]),
    "aae_conv_mog": aae.AAEConfig(arch="conv", widths=[8, 8], latent_dim=3, prior="mog", disc_hidden=[16]),
}


def make_batch(channels: int, n: int = 12) -> dict:
    return {
        "image": torch.randn(n, channels, SIZE, SIZE),
        "label": torch.arange(n) % 10,
        "key": [str(i) for i in range(n)],
    }


def pixels_for(channels: int) -> Pixels:
    return Pixels([0.2] * channels, [0.3] * channels)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", list(MODELS))
def test_forward_backward_shapes(name: str, channels: int) -> None:
    task = build_task(MODELS[name], pixels_for(channels), SIZE)
    batch = make_batch(channels)
    for phase in task.phases:
        task.zero_grad(set_to_none=True)
        out = task(batch, phase)
        assert out["loss"].shape == () and torch.isfinite(out["loss"])
        out["loss"].backward()
        stepped = [p for p in task.phase_module(phase).parameters() if p.requires_grad]
        assert stepped and all(p.grad is not None for p in stepped), (
            f"{name}/{phase}: a stepped parameter got no gradient"
        )
    codes = task.backbone()(batch["image"])
    assert codes.shape == (12, task.backbone().num_features)
    sums = task.eval_step(batch)
    assert sums["count"].item() == 12 and 0 <= sums["mse"].item() / 12 <= 1
    if channels == 3:  # drawing is the slow part; the grids only differ by the channel expansion
        for picture in task.pictures(batch).values():
            assert picture.shape[0] == 3 and 0 <= picture.min() and picture.max() <= 1


@pytest.mark.parametrize("name", ["ae", "dae", "cae", "vae_conv", "aae"])
def test_reconstruction_is_image_shaped(name: str) -> None:
    task = build_task(MODELS[name], pixels_for(3), SIZE)
    pixels = task.pixels.to_unit(make_batch(3)["image"])
    recon = task.reconstruct(pixels)
    assert recon.shape == pixels.shape and recon.min() >= 0 and recon.max() <= 1


def test_pixels_round_trip_and_range() -> None:
    pixels = Pixels([0.1307, 0.5, 0.2], [0.3081, 0.25, 0.1])
    unit = torch.rand(4, 3, 8, 8)
    assert torch.allclose(pixels.to_unit(pixels.from_unit(unit)), unit, atol=1e-6)
    assert pixels.to_unit(torch.full((1, 3, 2, 2), 100.0)).max() == 1.0  # resize overshoot is clamped
    assert "mean" not in pixels.state_dict()  # dataset facts, not model weights


def test_noise_stays_valid_and_masks_the_requested_fraction() -> None:
    torch.manual_seed(0)
    clean = torch.rand(64, 1, 28, 28)
    noisy = corrupt(clean, "gaussian", 0.5)
    assert noisy.min() >= 0 and noisy.max() <= 1 and (noisy - clean).abs().mean() > 0.2
    masked = corrupt(torch.ones(64, 1, 28, 28), "mask", 0.3)
    assert set(masked.unique().tolist()) == {0.0, 1.0}
    assert abs((masked == 0).float().mean().item() - 0.3) < 0.01


def test_kl_matches_the_closed_form_on_a_hand_example() -> None:
    mu = torch.tensor([[1.0, -2.0]])
    sigma = torch.tensor([[0.5, 2.0]])
    # 0.5 * sum(mu^2 + sigma^2 - ln sigma^2 - 1), written out per dimension
    expected = 0.5 * ((1 + 0.25 - math.log(0.25) - 1) + (4 + 4 - math.log(4) - 1))
    assert kl_standard_normal(mu, sigma.pow(2).log()).item() == pytest.approx(expected, rel=1e-6)
    assert kl_standard_normal(torch.zeros(3, 5), torch.zeros(3, 5)).abs().max() == 0  # posterior == prior
    # against torch.distributions on random posteriors
    mu, logvar = torch.randn(6, 4), torch.randn(6, 4)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    reference = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1)
    assert torch.allclose(kl_standard_normal(mu, logvar), reference, atol=1e-5)


@pytest.mark.parametrize("name", ["vae", "vae_conv", "aae", "aae_conv_mog"])
def test_prior_samples_decode_to_valid_images(name: str) -> None:
    task = build_task(MODELS[name], pixels_for(1), SIZE)
    images = task.decode(task.prior.sample(9))
    assert images.shape == (9, 1, SIZE, SIZE)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_mixture_prior_places_its_modes_on_a_circle() -> None:
    torch.manual_seed(0)
    prior = MixturePrior(dim=3, components=8, radius=4.0, std=0.5)
    draws = prior.sample(4000)
    assert draws.shape == (4000, 3)
    assert draws[:, :2].norm(dim=1).mean().item() == pytest.approx(4.0, abs=0.2)
    assert draws[:, 2].std().item() == pytest.approx(0.5, abs=0.05)
    assert GaussianPrior(2).grid(5).shape == (25, 2) and prior.grid(5).abs().max() == pytest.approx(5.0)


@pytest.mark.parametrize(
    "family, config",
    [
        ("cae", cae.CAEConfig(widths=[8, 8, 8])),
        ("dae", dae.DAEConfig(widths=[8, 8])),
        ("vae", vae.VAEConfig(arch="conv", widths=[8, 8])),
    ],
)
def test_conv_models_reject_sizes_their_poolings_cannot_invert(family: str, config) -> None:
    with pytest.raises(ConfigError) as err:
        build_task(config, pixels_for(1), 30)
    message = str(err.value)
    assert message.startswith(f"{family}: image size 30") and "allowed: multiples of" in message and "\n" not in message


def test_stacked_decode_inverts_encode_shapes() -> None:
    stack = stacked.Stack(SIZE * SIZE, [32, 8])
    pixels = torch.rand(5, 1, SIZE, SIZE)
    assert stack.encode(pixels, 2).shape == (5, 8)
    assert stack.decode(stack.encode(pixels, 2), 2).shape == (5, SIZE * SIZE)

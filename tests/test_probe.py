"""Linear probe: frozen encoder (bit-identical after training), BatchNorm without affine,
a short probe on the real MNIST shards far above chance, and one-line errors on bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from finetune.backbone import build_vit, resolve_backbone
from finetune.probe import ProbeConfig, ProbeTask, main, run_probe
from launch.data import DataConfig
from launch.errors import DataError
from pretrain.presets import create_mae

QUIET = {"log": {"progress": False, "tensorboard": False}}


@pytest.fixture(scope="module")
def mnist(tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    """The shipped MNIST (4,000 train / 1,000 val), prepared once for this module."""
    return DataConfig(root=str(tmp_path_factory.mktemp("data")), workers=0, hflip=0.0)


@pytest.fixture(scope="module")
def mae() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_mae("mae_vit_mnist_p4", depth=1)


@pytest.fixture(scope="module")
def probed(mnist, mae, tmp_path_factory):
    trainer = {"max_steps": 60, "batch_size": 128, "eval_every_epochs": 0, "optim": {"base_lr": 0.4}, **QUIET}
    cfg = ProbeConfig.model_validate({"trainer": trainer})
    return run_probe(cfg, backbone=mae, data=mnist, run_dir=tmp_path_factory.mktemp("probe"), seed=0)


def test_short_probe_on_mnist_beats_chance_widely(probed) -> None:
    assert probed.eval["top1"] > 45.0, probed.eval  # chance is 10 %; fully converged ~80 % (random encoder)
    assert probed.eval["top5"] >= probed.eval["top1"]


def test_encoder_is_bit_identical_after_probing(probed, mae) -> None:
    after = probed.task.encoder.state_dict()
    before = mae.encoder_state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not probed.task.encoder.training and not any(p.requires_grad for p in probed.task.encoder.parameters())


def test_batchnorm_has_no_affine_and_only_the_head_trains(mae) -> None:
    task = ProbeTask(build_vit(resolve_backbone(mae), num_classes=0), num_classes=10, pool="cls").train()
    bn = task.head[0]
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.weight is None and bn.bias is None
    assert {n for n, p in task.named_parameters() if p.requires_grad} == {"head.1.weight", "head.1.bias"}
    assert not task.encoder.training  # train() keeps the encoder in eval mode
    batch = {"image": torch.randn(8, 1, 28, 28), "label": torch.arange(8) % 10}
    task(batch)["loss"].backward()
    assert task.head[1].weight.grad is not None
    assert all(p.grad is None for p in task.encoder.parameters())


def test_a_batch_shrunk_to_one_sample_trains_on_the_running_statistics(mae) -> None:
    """Corrupt samples can leave a training batch of one (the rehearsal's photos did): BatchNorm
    raised 'Expected more than 1 value per channel'; that batch now uses the running statistics."""
    task = ProbeTask(build_vit(resolve_backbone(mae), num_classes=0), num_classes=10, pool="avg").train()
    task(batch={"image": torch.randn(8, 1, 28, 28), "label": torch.arange(8) % 10})  # running stats move
    norm = task.head[0]
    seen = norm.running_mean.clone(), norm.running_var.clone()
    one = {"image": torch.randn(1, 1, 28, 28), "label": torch.tensor([3])}
    out = task(one)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and task.head[1].weight.grad is not None
    assert torch.equal(norm.running_mean, seen[0]) and torch.equal(norm.running_var, seen[1])
    expected = task.head[1](F.batch_norm(task.features(one["image"]), *seen, eps=norm.eps))
    torch.testing.assert_close(task.logits(one["image"]), expected)


def test_class_count_and_channel_mismatches_are_one_line_errors(mnist, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"probe.num_classes=5 but the dataset manifest lists 10 classes"):
        run_probe(ProbeConfig(num_classes=5), backbone="vit_tiny_patch16_224", data=mnist, run_dir=tmp_path, seed=0)
    rgb = ProbeConfig(model_args={"img_size": 28, "patch_size": 4, "in_chans": 3, "depth": 1})
    with pytest.raises(DataError, match=r"takes 3-channel images but the data has 1: set data.channels=3"):
        run_probe(rgb, backbone="vit_tiny_patch16_224", data=mnist, run_dir=tmp_path, seed=0)


def test_cli_unknown_backbone_exits_2(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([f"run_dir={tmp_path}", "backbone=no_such_vit"])
    assert exit_info.value.code == 2
    assert "mae-probe: error: backbone 'no_such_vit' is neither" in capsys.readouterr().err

"""Optimizer groups and the warmup + cosine schedule against the MAE recipe's formulas."""

from __future__ import annotations

import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from launch.config import OptimConfig
from launch.errors import ConfigError
from launch.optim import build_optimizer, build_scheduler, peak_lr, phase_config
from pretrain.presets import MAEConfig
from pretrain.task import build_task


def _decay_of(optimizer: torch.optim.Optimizer, module: nn.Module) -> dict[str, float]:
    by_id = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in module.named_parameters() if id(p) in by_id}


def test_mae_recipe_adamw_and_no_decay_groups():
    task = build_task(MAEConfig(preset="mae_vit_mnist_p7"))
    opt = build_optimizer(task, OptimConfig(), lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)
    decay = _decay_of(opt, task)
    assert decay and set(decay) == {n for n, p in task.named_parameters() if p.requires_grad}
    for name, wd in decay.items():
        leaf = name.rsplit(".", 1)[-1]
        skip = leaf in ("bias", "cls_token", "mask_token", "pos_embed", "decoder_pos_embed") or "norm" in name
        assert wd == (0.0 if skip else 0.05), name


def test_frozen_parameters_are_left_out():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    opt = build_optimizer(model, OptimConfig(), lr=0.1)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in [*model[1].parameters(), *model[2].parameters()]}
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(model.requires_grad_(False), OptimConfig(), lr=0.1)


def test_layer_decay_scales_lr_by_depth():
    vit = VisionTransformer(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=3, num_heads=2, num_classes=10)
    opt = build_optimizer(vit, OptimConfig(layer_decay=0.5), lr=1.0)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(vit.head.weight)] == pytest.approx(1.0)  # last group: scale 1
    assert lr_of[id(vit.blocks[2].mlp.fc1.weight)] == pytest.approx(0.5)
    assert lr_of[id(vit.blocks[0].mlp.fc1.weight)] == pytest.approx(0.125)
    assert lr_of[id(vit.patch_embed.proj.weight)] == pytest.approx(0.0625)  # embeddings: deepest decay


def test_linear_scaling_rule_and_phase_overrides():
    cfg = OptimConfig(base_lr=1.5e-4)
    assert peak_lr(cfg, effective_batch=4096) == pytest.approx(1.5e-4 * 16)
    assert peak_lr(cfg.model_copy(update={"lr": 0.3}), effective_batch=4096) == 0.3
    phase = phase_config(cfg, {"name": "sgd", "base_lr": 0.1})
    assert (phase.name, phase.base_lr, phase.betas) == ("sgd", 0.1, (0.9, 0.95))
    with pytest.raises(ConfigError, match="phase optimizer overrides"):
        phase_config(cfg, {"base_lr": -1})


def _lrs(cfg: OptimConfig, peak: float, steps_per_epoch: int, total: int) -> list[float]:
    """lr used by every optimizer step 0..total-1, then the lr after the last step."""
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=peak)
    sched = build_scheduler(opt, cfg, peak, steps_per_epoch=steps_per_epoch, total=total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out + [opt.param_groups[0]["lr"]]


def test_warmup_then_cosine_matches_the_formula():
    peak, min_lr, warmup, total = 0.01, 1e-4, 6, 30  # warmup_epochs=2 of 3 steps
    lrs = _lrs(OptimConfig(warmup_epochs=2, min_lr=min_lr), peak, steps_per_epoch=3, total=total)
    assert lrs[0] == pytest.approx(peak / warmup)
    assert lrs[warmup - 1] == pytest.approx(peak)  # warmup end: the peak
    assert lrs[warmup] == pytest.approx(peak)  # cosine starts at the peak
    t = 17
    expected = min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))
    assert lrs[t] == pytest.approx(expected)
    assert lrs[-1] == pytest.approx(min_lr)  # after the last step: the floor
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))


def test_constant_schedule_and_warmup_steps_override():
    lrs = _lrs(OptimConfig(warmup_epochs=100, warmup_steps=4, schedule="constant"), 0.5, steps_per_epoch=10, total=10)
    assert lrs[:4] == pytest.approx([0.125, 0.25, 0.375, 0.5])
    assert lrs[4:] == pytest.approx([0.5] * 7)


def test_warmup_longer_than_the_run_is_clamped_and_impossible_floor_fails():
    lrs = _lrs(OptimConfig(warmup_epochs=5), 0.1, steps_per_epoch=10, total=20)
    assert lrs[19] == pytest.approx(0.1) and lrs[0] == pytest.approx(0.1 / 20)
    with pytest.raises(ConfigError, match="min_lr"):
        _lrs(OptimConfig(min_lr=1.0), 0.1, steps_per_epoch=10, total=20)


def test_scheduler_state_round_trip():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = build_scheduler(opt, OptimConfig(warmup_steps=3), 1.0, steps_per_epoch=5, total=20)
    for _ in range(7):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = build_scheduler(opt2, OptimConfig(warmup_steps=3), 1.0, steps_per_epoch=5, total=20)
    sched2.load_state_dict(sched.state_dict())
    opt2.load_state_dict(opt.state_dict())
    sched.step(), sched2.step()
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_lars_adapts_weights_without_weight_decay_and_leaves_biases_alone():
    """Official MAE LARS: the trust ratio scales every ndim > 1 update, also at weight_decay 0 (every
    probe recipe); biases / norms take the plain momentum-SGD step."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    opt = build_optimizer(model, OptimConfig(name="lars", weight_decay=0.0, momentum=0.0), lr=0.5)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    model.weight.grad, model.bias.grad = torch.randn(3, 6), torch.randn(3)
    opt.step()
    trust = 0.001 * w0.norm() / model.weight.grad.norm()
    torch.testing.assert_close(model.weight.detach(), w0 - 0.5 * trust * model.weight.grad)
    torch.testing.assert_close(model.bias.detach(), b0 - 0.5 * model.bias.grad)

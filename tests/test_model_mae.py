"""MaskedAutoencoderViT invariants: visible-only encoder, decoder unshuffle, timm parity, init, bad input."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from launch.config import load_config
from launch.errors import ConfigError
from pretrain.masking import gather_tokens, sample_noise
from pretrain.objective import mae_loss
from pretrain.pos_embed import sincos_2d_pos_embed
from pretrain.presets import PRESETS, MAEConfig, build_model, create_mae
from pretrain.task import MAETask

SMALL = dict(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=2, decoder_num_heads=2)


def small(preset: str = "mae_vit_mnist_p4", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_mae(preset, **{**SMALL, **kw}).eval()


def test_encoder_sees_only_visible_tokens_and_ignores_masked_pixels() -> None:
    model = small()
    imgs, noise = torch.randn(3, 1, 28, 28), torch.rand(3, 49)
    latent, mask, ids_restore = model.forward_encoder(imgs, 0.75, noise)
    keep = int(49 * 0.25)
    assert latent.shape == (3, 1 + keep, 32) and mask.shape == ids_restore.shape == (3, 49)
    # scramble every removed patch's pixels: the encoder output must not move at all
    removed = model.unpatchify(mask[..., None].expand(-1, -1, 16)) > 0
    scrambled = torch.where(removed, torch.randn_like(imgs) * 50, imgs)
    assert not torch.equal(scrambled, imgs)
    assert torch.equal(model.forward_encoder(scrambled, 0.75, noise)[0], latent)
    # ... while changing a visible patch does move it
    visible = ~removed
    nudged = torch.where(visible, imgs + 1.0, imgs)
    assert not torch.allclose(model.forward_encoder(nudged, 0.75, noise)[0], latent)


def test_blocks_run_on_one_plus_visible_tokens() -> None:
    model = small()
    seen = []
    model.blocks[0].register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    model.forward_encoder(torch.randn(2, 1, 28, 28), 0.75)
    assert seen == [1 + int(49 * 0.25)]


def test_decoder_unshuffles_into_original_patch_order() -> None:
    # without decoder blocks every output row depends on its own token only, so the
    # unshuffle can be checked against a per-position hand computation
    model = small(decoder_depth=0)
    imgs, noise = torch.randn(2, 1, 28, 28), torch.rand(2, 49)
    latent, mask, ids_restore = model.forward_encoder(imgs, 0.75, noise)
    pred = model.forward_decoder(latent, ids_restore)
    head = lambda t: model.decoder_pred(model.decoder_norm(t))  # noqa: E731
    dpos = model.decoder_pos_embed[0, 1:]
    for n in range(2):
        for i in range(49):
            rank = int(ids_restore[n, i])
            token = model.decoder_embed(latent[n, 1 + rank]) if mask[n, i] == 0 else model.mask_token[0, 0]
            torch.testing.assert_close(pred[n, i], head(token + dpos[i]), rtol=1e-5, atol=1e-6)
    # predicting only chosen patches (the loss's removed ones) gives those rows of the full prediction
    ids = torch.tensor([[3, 0, 48], [7, 7, 1]])
    torch.testing.assert_close(model.forward_decoder(latent, ids_restore, ids), gather_tokens(pred, ids))


def test_forward_features_match_timm_vit_and_unmasked_encoder() -> None:
    model = small()
    vit = VisionTransformer(**model.timm_model_args(), num_classes=0).eval()
    vit.load_state_dict(model.encoder_state_dict(), strict=True)
    imgs = torch.randn(3, 1, 28, 28)
    feats = model.forward_features(imgs)
    assert feats.shape == (3, 50, 32)
    torch.testing.assert_close(feats, vit.forward_features(imgs), rtol=0, atol=0)
    # mask ratio 0: the same tokens, in the noise's shuffled order
    latent, mask, ids_restore = model.forward_encoder(imgs, 0.0)
    assert mask.sum() == 0
    unshuffled = torch.gather(latent[:, 1:], 1, ids_restore[..., None].expand(-1, -1, 32))
    torch.testing.assert_close(unshuffled, feats[:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(latent[:, 0], feats[:, 0], rtol=1e-5, atol=1e-5)


def test_tiny_preset_loads_strictly_into_timm_create_model() -> None:
    model = create_mae("mae_vit_tiny", img_size=64).eval()  # 64 px keeps the check quick
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64).eval()
    vit.load_state_dict(model.encoder_state_dict(), strict=True)
    imgs = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model.forward_features(imgs), vit.forward_features(imgs), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("preset", "timm_name"),
    [
        ("mae_vit_small", "vit_small_patch16_224"),
        ("mae_vit_base", "vit_base_patch16_224"),
        ("mae_vit_large", "vit_large_patch16_224"),
        ("mae_vit_huge", "vit_huge_patch14_224"),
    ],
)
def test_paper_presets_have_timm_encoder_shapes_and_paper_decoder(preset: str, timm_name: str) -> None:
    with torch.device("meta"):  # no memory, no compute: shapes only
        model = create_mae(preset)
        vit = timm.create_model(timm_name, num_classes=0)
    ours = {k: tuple(v.shape) for k, v in model.encoder_state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    if preset != "mae_vit_small":
        assert (model.arch["decoder_embed_dim"], model.arch["decoder_depth"], model.arch["decoder_num_heads"]) == (
            512,
            8,
            16,
        )


def test_fused_attention_equals_explicit_softmax() -> None:
    model = small()
    imgs, noise = torch.randn(4, 1, 28, 28), torch.rand(4, 49)
    with mock.patch.object(F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention) as sdpa:
        fused = model(imgs, 0.75, noise)[0]
    assert sdpa.call_count == 4  # 2 encoder + 2 decoder blocks
    model.set_fused_attn(False)
    with mock.patch.object(F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention) as sdpa:
        explicit = model(imgs, 0.75, noise)[0]
    assert sdpa.call_count == 0
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)


def test_every_trainable_parameter_gets_a_gradient_and_tables_stay_fixed() -> None:
    model = small().train()
    imgs = torch.randn(4, 1, 28, 28)
    pred, mask = model(imgs, 0.75)
    mae_loss(pred, model.patchify(imgs), mask).backward()
    for name, param in model.named_parameters():
        if name in ("pos_embed", "decoder_pos_embed"):
            assert not param.requires_grad and param.grad is None
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    imgs, noise = torch.randn(4, 1, 28, 28), torch.rand(4, 49)
    grads = []
    for ckpt in (False, True):
        model = small().train()
        model.set_grad_checkpointing(ckpt)
        pred, mask = model(imgs, 0.75, noise)
        mae_loss(pred, model.patchify(imgs), mask).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


def test_bf16_autocast_keeps_the_loss_in_fp32() -> None:
    model = small()
    imgs, noise = torch.randn(4, 1, 28, 28), torch.rand(4, 49)
    pred, mask = model(imgs, 0.75, noise)
    ref = mae_loss(pred, model.patchify(imgs), mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred16, mask16 = model(imgs, 0.75, noise)
        loss = mae_loss(pred16, model.patchify(imgs), mask16)
    assert pred16.dtype == torch.bfloat16 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=5e-2, atol=0)


def test_official_initialisation() -> None:
    model = create_mae("mae_vit_mnist_p4")
    assert torch.equal(model.pos_embed[0], sincos_2d_pos_embed(128, 7))
    assert torch.equal(model.decoder_pos_embed[0], sincos_2d_pos_embed(64, 7))
    for token in (model.cls_token, model.mask_token):
        assert 0.01 < token.std().item() < 0.03
    proj = model.patch_embed.proj.weight  # xavier over (out, in*p*p), as a linear layer
    bound = math.sqrt(6 / (proj.shape[0] + proj[0].numel()))
    assert proj.abs().max() <= bound and proj.abs().max() > 0.9 * bound
    fc1 = model.blocks[0].mlp.fc1
    assert fc1.weight.abs().max() <= math.sqrt(6 / sum(fc1.weight.shape)) and not fc1.bias.any()
    assert torch.equal(model.norm.weight, torch.ones(128)) and not model.norm.bias.any()


def test_presets_are_registered_and_config_overrides_apply() -> None:
    assert {
        "mae_vit_tiny",
        "mae_vit_small",
        "mae_vit_base",
        "mae_vit_large",
        "mae_vit_huge",
        "mae_vit_mnist_p4",
        "mae_vit_mnist_p7",
    } <= set(PRESETS)
    cfg = MAEConfig(preset="mae_vit_mnist_p7", depth=3, drop_path=0.1)
    model = build_model(cfg)
    assert model.arch["depth"] == 3 and model.arch["patch_size"] == 7 and model.num_patches == 16
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert model.no_weight_decay() == {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed"}


def test_bad_architecture_and_input_give_one_line_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="image size 30 is not divisible by patch size 4"):
        create_mae("mae_vit_mnist_p4", img_size=30)
    with pytest.raises(ConfigError, match=r"unknown model preset 'mae_vit_bse' \(did you mean 'mae_vit_base'\?\)"):
        create_mae("mae_vit_bse")
    with pytest.raises(ConfigError, match="unknown model argument 'depht'"):
        create_mae("mae_vit_base", depht=3)
    with pytest.raises(ConfigError, match="embed_dim 30 is not divisible by its number of heads 4"):
        create_mae("mae_vit_mnist_p4", embed_dim=30)
    model = small()
    with pytest.raises(
        ValueError, match=r"images of shape \(2, 3, 28, 28\) do not fit the model; expected \(N, 1, 28, 28\)"
    ):
        model.forward_encoder(torch.randn(2, 3, 28, 28), 0.75)
    with pytest.raises(ValueError, match=r"expected \(N, 1, 28, 28\)"):
        model.forward_features(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="mask_ratio 1.0 is outside"):
        model.forward_encoder(torch.randn(2, 1, 28, 28), 1.0)
    with pytest.raises(ConfigError, match="mask_ratio -0.5 is outside"):
        MAETask(model, mask_ratio=-0.5)
    cfg_file = tmp_path / "model.yaml"
    cfg_file.write_text("preset: mae_vit_mnist_p4\nmask_ratio: 1.0\n")
    with pytest.raises(ConfigError, match="config key 'mask_ratio'.*less than 1"):
        load_config(MAEConfig, cfg_file)
    with pytest.raises(ConfigError, match="config key 'preset'.*unknown preset.*available: mae_vit_tiny"):
        load_config(MAEConfig, None, ["preset=vit_base"])


@pytest.mark.slow
def test_compiled_step_matches_eager() -> None:
    model = small().train()
    imgs, noise = torch.randn(4, 1, 28, 28), torch.rand(4, 49)

    def step(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        pred, mask = model(x, 0.75, n)
        return mae_loss(pred, model.patchify(x), mask)

    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(imgs, noise), step(imgs, noise), rtol=1e-5, atol=1e-6)


def test_task_masks_follow_the_sample_seeds_in_the_batch() -> None:
    """With the loader's per-sample "seed", the loss does not depend on the torch RNG, and each
    sample's mask is its own: the batch [a, b] scores the same as a and b apart."""
    task = MAETask(small(), 0.75, norm_pix_loss=True)
    imgs, seeds = torch.randn(2, 1, 28, 28), torch.tensor([11, 2**40 + 3])
    torch.manual_seed(1)
    both = task({"image": imgs, "seed": seeds})["loss"]
    torch.manual_seed(2)
    assert torch.equal(task({"image": imgs, "seed": seeds})["loss"], both)
    apart = [task({"image": imgs[i : i + 1], "seed": seeds[i : i + 1]})["loss"] for i in range(2)]
    torch.testing.assert_close(both, (apart[0] + apart[1]) / 2)  # same masks: 37 removed patches each
    pred, mask = task.model(imgs, 0.75, sample_noise(seeds, 49))
    torch.testing.assert_close(both, mae_loss(pred, task.model.patchify(imgs), mask))


def test_task_loss_eval_and_pictures() -> None:
    task = MAETask(small(), 0.75, norm_pix_loss=True, image_mean=(0.5,), image_std=(0.5,))
    batch = {"image": torch.randn(6, 1, 28, 28), "label": torch.zeros(6, dtype=torch.long), "key": list("abcdef")}
    first, second = task(batch)["loss"], task(batch)["loss"]
    assert first.ndim == 0 and first.dtype == torch.float32 and first != second  # fresh masks per step
    evals = [task.eval_step(batch) for _ in range(2)]
    assert torch.equal(evals[0]["loss"], evals[1]["loss"]) and evals[0]["count"] == 6  # fixed eval masks
    noise = torch.rand(6, 49, generator=torch.Generator().manual_seed(0))
    pred, mask = task.model(batch["image"], 0.75, noise)
    torch.testing.assert_close(evals[0]["loss"] / 6, mae_loss(pred, task.model.patchify(batch["image"]), mask))
    grid = task.pictures(batch)["reconstruction"]
    assert grid.shape == (3, 6 * 114 + 2, 4 * 114 + 2) and 0 <= grid.min() and grid.max() <= 1
    assert task.no_weight_decay() == {
        "model.cls_token",
        "model.pos_embed",
        "model.mask_token",
        "model.decoder_pos_embed",
    }
    with torch.device("meta"):  # ViT-B/16 MAE, paper decoder, mask 0.75: 58.7 GFLOP per training image
        assert MAETask(create_mae("mae_vit_base")).flops_per_image() == pytest.approx(58.7e9, rel=2e-3)

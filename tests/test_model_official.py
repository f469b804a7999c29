"""Official MAE naming and the one-call loader, on state_dicts built in the official format."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file

from launch.errors import CheckpointError
from pretrain.official import infer_arch, load_official, read_state_dict
from pretrain.presets import create_mae

_BLOCK = [
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
]
# the state_dict keys of the official models_mae.MaskedAutoencoderViT with one block on each side
OFFICIAL_KEYS = {
    "cls_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "norm.weight",
    "norm.bias",
    "mask_token",
    "decoder_pos_embed",
    "decoder_embed.weight",
    "decoder_embed.bias",
    "decoder_norm.weight",
    "decoder_norm.bias",
    "decoder_pred.weight",
    "decoder_pred.bias",
    *(f"blocks.0.{k}" for k in _BLOCK),
    *(f"decoder_blocks.0.{k}" for k in _BLOCK),
}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_mae("mae_vit_mnist_p7").eval()


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, img_size: int = 28) -> None:
    imgs, noise = torch.randn(2, a.in_chans, img_size, img_size), torch.rand(2, a.num_patches)
    torch.testing.assert_close(a(imgs, 0.75, noise)[0], b.eval()(imgs, 0.75, noise)[0], rtol=0, atol=0)


def test_state_dict_uses_the_official_names() -> None:
    one_block = create_mae("mae_vit_mnist_p4", depth=1, decoder_depth=1)
    assert set(one_block.state_dict()) == OFFICIAL_KEYS
    assert set(one_block.encoder_state_dict()) == {k for k in OFFICIAL_KEYS if not k.startswith(("decoder", "mask"))}


def test_full_official_training_checkpoint_round_trips(model, tmp_path) -> None:
    # the official main_pretrain.py saves {"model", "optimizer", "epoch", "scaler", "args"}
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": model.state_dict(), "epoch": 799, "args": argparse.Namespace(norm_pix_loss=True)}, path)
    loaded = load_official(path)
    assert loaded.arch == model.arch  # architecture read back from the shapes + matching preset
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    _same_outputs(model, loaded)


def test_safetensors_and_ddp_prefix(model, tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    _same_outputs(model, load_official(path))
    ddp = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ddp)
    _same_outputs(model, load_official(ddp))


def test_encoder_only_checkpoint_gives_fresh_decoder_and_equal_features(model, tmp_path) -> None:
    path = tmp_path / "mae_pretrain_vit_mnist.pth"
    torch.save({"model": model.encoder_state_dict()}, path)
    loaded = load_official(path).eval()
    imgs = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded.forward_features(imgs), model.forward_features(imgs), rtol=0, atol=0)
    assert not torch.equal(loaded.decoder_embed.weight, model.decoder_embed.weight)
    assert loaded.arch["decoder_embed_dim"] == model.arch["decoder_embed_dim"]  # taken from the preset


def test_unmatched_architecture_takes_heads_from_overrides(tmp_path) -> None:
    torch.manual_seed(1)
    custom = create_mae(
        "mae_vit_mnist_p4",
        embed_dim=48,
        depth=2,
        num_heads=3,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=4,
    ).eval()
    arch = infer_arch(custom.state_dict())
    assert (arch["embed_dim"], arch["depth"], arch["decoder_embed_dim"], arch["decoder_depth"]) == (48, 2, 32, 1)
    _same_outputs(custom, load_official(custom.state_dict(), num_heads=3, decoder_num_heads=4))


def test_new_image_size_rebuilds_the_fixed_tables(model) -> None:
    bigger = load_official(model.state_dict(), img_size=56)
    assert bigger.pos_embed.shape == (1, 1 + 64, 128) and bigger.num_patches == 64
    assert torch.equal(bigger.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    assert bigger.forward_features(torch.randn(1, 1, 56, 56)).shape == (1, 65, 128)


def test_bad_checkpoints_are_refused_with_one_line(model, tmp_path) -> None:
    finetuned = {**model.encoder_state_dict(), "head.weight": torch.zeros(10, 128), "head.bias": torch.zeros(10)}
    with pytest.raises(CheckpointError, match="unexpected keys in checkpoint: head.bias, head.weight"):
        load_official(finetuned)
    partial = {k: v for k, v in model.state_dict().items() if k != "decoder_norm.weight"}
    with pytest.raises(CheckpointError, match="checkpoint misses keys: decoder_norm.weight"):
        load_official(partial)
    no_norm = {k: v for k, v in model.encoder_state_dict().items() if not k.startswith("norm.")}
    with pytest.raises(CheckpointError, match="misses keys: norm.bias, norm.weight"):
        load_official(no_norm)
    with pytest.raises(CheckpointError, match="lacks .patch_embed.proj.weight."):
        load_official({"vit.embeddings.cls_token": torch.zeros(1, 1, 8)})
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read .*junk.pth"):
        read_state_dict(junk)
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        read_state_dict(tmp_path / "missing.pth")
    torch.save({"epoch": 3}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match="holds no state_dict"):
        read_state_dict(tmp_path / "meta.pth")

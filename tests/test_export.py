"""Export round trips: timm hub folder (strict timm load, same features) and the full MAE."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from launch.errors import CheckpointError
from launch.export import export_timm, timm_encoder
from pretrain.export import export_full, load_full
from pretrain.presets import create_mae

MEAN, STD = (0.1307,), (0.3081,)


@pytest.fixture(scope="module")
def mae() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_mae("mae_vit_mnist_p4", depth=2).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_timm_local_dir_loads_strictly_with_same_features(mae, images, tmp_path: Path) -> None:
    out = export_timm(mae, tmp_path / "timm", mean=MEAN, std=STD)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    keys = safetensors.torch.load_file(str(out / "model.safetensors")).keys()
    assert not any(k.startswith(("decoder", "mask_token")) for k in keys)

    vit = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert vit.num_classes == 0
    assert vit.pretrained_cfg["input_size"] == (1, 28, 28)
    assert tuple(vit.pretrained_cfg["mean"]) == MEAN and tuple(vit.pretrained_cfg["std"]) == STD
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(images), mae.forward_features(images), atol=1e-6)


def test_missing_key_fails_loudly(mae, tmp_path: Path) -> None:
    out = export_timm(mae, tmp_path / "timm", mean=MEAN, std=STD)
    state = safetensors.torch.load_file(str(out / "model.safetensors"))
    del state["blocks.1.attn.qkv.weight"]
    safetensors.torch.save_file(state, str(out / "model.safetensors"))
    with pytest.raises(RuntimeError, match="blocks.1.attn.qkv.weight"):
        timm.create_model(f"local-dir:{out}", pretrained=True)


def test_wrong_key_in_encoder_is_named(mae) -> None:
    class Renamed(torch.nn.Module):
        def timm_model_args(self):
            return mae.timm_model_args()

        def encoder_state_dict(self):
            state = dict(mae.encoder_state_dict())
            state["fc_norm.weight"] = state.pop("norm.weight")
            return state

    with pytest.raises(CheckpointError, match=r"missing keys: norm.weight; unexpected keys: fc_norm.weight"):
        timm_encoder(Renamed())


def test_full_export_round_trip(mae, images, tmp_path: Path) -> None:
    out = export_full(mae, tmp_path / "mae", mean=MEAN, std=STD, extra={"norm_pix_loss": True})
    model, config = load_full(out)
    assert config["norm_pix_loss"] is True and config["pretrained_cfg"]["mean"] == list(MEAN)
    for (k, a), (k2, b) in zip(mae.state_dict().items(), model.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    noise = torch.rand(3, mae.num_patches, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(images, 0.75, noise)[0], mae(images, 0.75, noise)[0])


def test_existing_folder_is_not_clobbered(mae, tmp_path: Path) -> None:
    out = tmp_path / "timm"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        export_timm(mae, out, mean=MEAN, std=STD)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(CheckpointError, match="3/3 values but the model takes 1 channels"):
        export_timm(mae, tmp_path / "bad", mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    assert not (tmp_path / "bad").exists()


def test_a_full_export_of_another_shape_names_the_file_the_key_and_both_shapes(mae, tmp_path: Path) -> None:
    out = export_full(mae, tmp_path / "mae", mean=MEAN, std=STD)
    state = safetensors.torch.load_file(str(out / "model.safetensors"))
    state["decoder_pred.bias"] = state["decoder_pred.bias"][:-1]
    safetensors.torch.save_file(state, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_full(out)
    (line,) = str(err.value).splitlines()
    assert line.startswith(f"{out}/model.safetensors does not fit MaskedAutoencoderViT: decoder_pred.bias has shape")
    assert "there, [16] in this model (1 mismatched tensors)" in line

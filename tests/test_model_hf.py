"""Parity with Hugging Face ``ViTMAEForPreTraining``: same weights + same noise -> same masks,
predictions and loss; both HF key layouts (hub files, transformers 5) load."""

from __future__ import annotations

import re

import pytest
import torch
import transformers

from launch.errors import CheckpointError
from pretrain.masking import gather_tokens, removed_ids
from pretrain.objective import mae_loss, removed_patch_loss
from pretrain.official import from_hf_vitmae, load_official

# transformers 5 in-memory names -> the transformers 4 names stored in hub checkpoints
_V4 = {
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = transformers.ViTMAEConfig(
        image_size=28,
        patch_size=7,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
        layer_norm_eps=1e-6,
        mask_ratio=0.75,
        norm_pix_loss=True,
    )
    return transformers.ViTMAEForPreTraining(cfg).eval()


def _as_hub_v4(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        key = re.sub(r"^vit\.layers\.", "vit.encoder.layer.", key)
        for new, old in _V4.items():
            key = key.replace(f".{new}.", f".{old}.")
        out[key] = value
    return out


@pytest.mark.parametrize("layout", ["transformers5", "hub_v4"])
def test_same_weights_and_noise_give_the_same_prediction_and_loss(hf_model, layout: str) -> None:
    state = hf_model.state_dict()
    if layout == "hub_v4":
        state = _as_hub_v4(state)
        assert "vit.encoder.layer.0.attention.attention.query.weight" in state
    ours = load_official(state, num_heads=2, decoder_num_heads=2).eval()
    imgs, noise = torch.randn(3, 1, 28, 28), torch.rand(3, 16)
    with torch.no_grad():
        out = hf_model(pixel_values=imgs, noise=noise)
        pred, mask = ours(imgs, 0.75, noise)
    assert torch.equal(mask, out.mask)
    torch.testing.assert_close(pred, out.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        mae_loss(pred, ours.patchify(imgs), mask, norm_pix_loss=True), out.loss, rtol=1e-5, atol=1e-6
    )
    with torch.no_grad():  # the training path: only the removed patches are predicted and scored
        latent, _, ids_restore = ours.forward_encoder(imgs, 0.75, noise)
        ids = removed_ids(ids_restore, latent.shape[1] - 1)
        pred_removed = ours.forward_decoder(latent, ids_restore, ids)
    loss = removed_patch_loss(pred_removed, gather_tokens(ours.patchify(imgs), ids), norm_pix_loss=True)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)
    # HF's patchify is the official (p, q, c) layout too
    torch.testing.assert_close(ours.patchify(imgs), hf_model.patchify(imgs), rtol=0, atol=0)


def test_unknown_hf_tensor_is_refused(hf_model) -> None:
    state = {**hf_model.state_dict(), "vit.layers.0.attention.rotary.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="unknown Hugging Face ViTMAE tensor 'blocks.0.attention.rotary.weight'"):
        from_hf_vitmae(state)

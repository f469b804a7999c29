"""Random masking and the fixed sin-cos tables: invariants, not just shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from launch.errors import ConfigError
from pretrain.masking import num_visible, random_masking, removed_ids, sample_noise
from pretrain.pos_embed import sincos_2d_pos_embed


def _tokens(n: int = 6, length: int = 49, dim: int = 8) -> torch.Tensor:
    # token value encodes (sample, position) so gathers can be checked exactly
    pos = torch.arange(length, dtype=torch.float32).view(1, length, 1)
    sample = torch.arange(n, dtype=torch.float32).view(n, 1, 1) * 1000
    return (pos + sample).expand(n, length, dim).clone()


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_keeps_int_l_times_one_minus_r_per_sample(ratio: float) -> None:
    x = _tokens()
    visible, mask, ids_restore = random_masking(x, ratio)
    keep = int(49 * (1 - ratio))
    assert visible.shape == (6, keep, 8)
    assert torch.equal(mask.sum(1), torch.full((6,), float(49 - keep)))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_visible_tokens_are_exactly_the_unmasked_positions() -> None:
    x = _tokens()
    visible, mask, _ = random_masking(x, 0.75)
    for i in range(x.shape[0]):
        kept_positions = sorted((visible[i, :, 0] - 1000 * i).long().tolist())
        assert kept_positions == torch.nonzero(mask[i] == 0).flatten().tolist()


def test_seeded_noise_depends_only_on_the_sample_seed() -> None:
    """A sample's mask follows its seed, not its batch: what makes masks world-size independent."""
    seeds = torch.tensor([0, 1, 2**62 + 5, 123456789012345], dtype=torch.int64)
    noise = sample_noise(seeds, 196)
    assert noise.shape == (4, 196) and noise.dtype == torch.float32
    assert 0 <= noise.min() and noise.max() < 1
    assert torch.equal(sample_noise(seeds.flip(0)[1:], 196), noise.flip(0)[1:])  # other batch, same rows
    assert torch.equal(sample_noise(seeds, 196), noise)
    assert len({tuple(row.tolist()) for row in noise}) == 4


def test_seeded_masks_are_uniform_over_patches_and_independent_across_seeds() -> None:
    noise = sample_noise(torch.arange(4000, dtype=torch.int64) * 2654435761, 49)
    _, mask, _ = random_masking(_tokens(4000), 0.75, noise)
    per_patch = mask.mean(0)  # 37 of 49 patches removed: every patch ~ 37 / 49 of the time
    assert (per_patch - 37 / 49).abs().max() < 0.04
    overlap = (mask[1:] * mask[:-1]).sum(1).mean()  # neighbouring seeds: independent masks share ~ 37^2 / 49
    assert abs(overlap.item() - 37 * 37 / 49) < 0.3


@pytest.mark.parametrize("ratio", [0.0, 0.75])
def test_removed_ids_are_exactly_the_masked_positions(ratio: float) -> None:
    visible, mask, ids_restore = random_masking(_tokens(), ratio)
    ids = removed_ids(ids_restore, visible.shape[1])
    assert ids.shape == (6, 49 - visible.shape[1])
    for i in range(6):
        assert sorted(ids[i].tolist()) == torch.nonzero(mask[i] == 1).flatten().tolist()


def test_restore_indices_invert_the_shuffle() -> None:
    x = _tokens()
    noise = torch.rand(6, 49)
    _, _, ids_restore = random_masking(x, 0.75, noise)
    ids_shuffle = torch.argsort(noise, dim=1)
    shuffled = torch.gather(x, 1, ids_shuffle[..., None].expand(-1, -1, 8))
    assert torch.equal(torch.gather(shuffled, 1, ids_restore[..., None].expand(-1, -1, 8)), x)
    assert torch.equal(torch.sort(ids_restore, dim=1).values, torch.arange(49).expand(6, 49))


def test_samples_differ_and_same_noise_gives_same_mask() -> None:
    x = _tokens(n=8)
    _, mask, _ = random_masking(x, 0.75)
    assert len({tuple(m.tolist()) for m in mask}) > 1
    noise = torch.rand(8, 49)
    first = random_masking(x, 0.75, noise)
    second = random_masking(x, 0.75, noise.clone())
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # lowest noise is kept
    keep = int(49 * 0.25)
    kept = torch.argsort(noise, dim=1)[:, :keep]
    assert torch.all(torch.gather(first[1], 1, kept) == 0)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_mask_ratio_outside_unit_interval_is_refused(ratio: float) -> None:
    with pytest.raises(ValueError, match=rf"mask_ratio {ratio} is outside the allowed range \[0, 1\)"):
        random_masking(_tokens(), ratio)


def test_ratio_that_keeps_nothing_and_wrong_noise_shape_are_refused() -> None:
    with pytest.raises(ValueError, match="keeps no patch of 16"):
        num_visible(16, 0.95)
    with pytest.raises(ValueError, match=r"noise has shape \(6, 48\)"):
        random_masking(_tokens(), 0.5, torch.rand(6, 48))


def _official_table(embed_dim: int, grid_size: int) -> np.ndarray:
    """The official MAE numpy recipe (meshgrid(w, h), [emb_h | emb_w] of [sin | cos]), written out."""
    grid_h = np.arange(grid_size, dtype=np.float64)
    grid_w = np.arange(grid_size, dtype=np.float64)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)

    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


@pytest.mark.parametrize(("dim", "grid"), [(128, 7), (64, 4), (768, 14)])
def test_sincos_table_matches_the_official_layout(dim: int, grid: int) -> None:
    table = sincos_2d_pos_embed(dim, grid)
    assert table.dtype == torch.float32 and table.shape == (1 + grid * grid, dim)
    np.testing.assert_allclose(table.numpy(), _official_table(dim, grid), rtol=0, atol=1e-6)
    assert sincos_2d_pos_embed(dim, grid, cls_token=False).shape == (grid * grid, dim)


def test_sincos_needs_width_multiple_of_four() -> None:
    with pytest.raises(ConfigError, match="embed dim 66 must be a multiple of 4"):
        sincos_2d_pos_embed(66, 4)

"""Per-sample random masking (MAE paper, Sec. 3): shuffle by noise, keep a prefix.

Only index gathers are used (no boolean indexing, no ``.item()``), so the number of
kept tokens is static, the op runs under ``torch.compile`` and never syncs with the host.
"""

from __future__ import annotations

import torch
from torch import Tensor


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches kept per sample: ``int(L * (1 - mask_ratio))`` as in the official code.

    Raises ``ValueError`` for a ratio outside [0, 1) or one that keeps no patch at all.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio {mask_ratio} is outside the allowed range [0, 1)")
    keep = int(num_patches * (1 - mask_ratio))
    if keep < 1:
        raise ValueError(
            f"mask_ratio {mask_ratio} keeps no patch of {num_patches}; use a ratio below {1 - 1 / num_patches:.4f}"
        )
    return keep


def random_masking(x: Tensor, mask_ratio: float, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Keep a random subset of tokens per sample.

    x: (N, L, D) tokens; noise: optional (N, L) scores, lowest are kept (uniform if None).
    Returns ``x_visible`` (N, L_keep, D), ``mask`` (N, L) float with 1 = removed, 0 = kept,
    and ``ids_restore`` (N, L) such that gathering the shuffled sequence with it restores
    the original order.
    """
    n, length, _ = x.shape
    keep = num_visible(length, mask_ratio)
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    elif noise.shape != (n, length):
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected (batch, num_patches) = {(n, length)}")
    ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x_visible = gather_tokens(x, ids_shuffle[:, :keep])
    # ids_restore[i] is the rank of patch i in the shuffle: ranks past `keep` are removed
    mask = (ids_restore >= keep).float()
    return x_visible, mask, ids_restore


_LOW32 = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """Integer hash of int64 values in [0, 2**32) (Wellons' lowbias32 shape). Multipliers stay below
    2**31, so no product overflows int64 and the result is the same on every device and under compile."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _LOW32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _LOW32
    return x ^ (x >> 16)


def sample_noise(seeds: Tensor, length: int) -> Tensor:
    """seeds: (N,) int64 >= 0, one per sample -> (N, L) float32 noise in [0, 1) for ``random_masking``.

    A counter-based hash of (seed, patch index) computed where ``seeds`` live: a sample's mask depends
    on its own seed only (not on the batch it lands in, the rank, or any generator state), and
    drawing it needs no host sync."""
    key = _hash32(_hash32((seeds >> 32) ^ 0x6D2B79F5) ^ (seeds & _LOW32)).unsqueeze(1)  # (N, 1)
    patch = torch.arange(length, device=seeds.device, dtype=torch.int64) * 0x9E3779B1  # Weyl steps, < 2**48
    bits = _hash32((key + patch) & _LOW32) >> 8  # 24 bits: exact in float32
    return bits.to(torch.float32) * 2.0**-24


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """x: (N, L, D), ids: (N, M) token indices per sample -> (N, M, D).

    Whole-row copies by ``index_select`` on the flattened (N * L, D) tokens: on CPU several
    times faster, forward and backward, than ``gather`` with an index expanded over D.
    """
    n, length, dim = x.shape
    rows = ids + torch.arange(n, device=ids.device).unsqueeze(1) * length
    return x.reshape(n * length, dim).index_select(0, rows.flatten()).view(n, ids.shape[1], dim)


def removed_ids(ids_restore: Tensor, keep: int) -> Tensor:
    """ids_restore: (N, L) from ``random_masking`` -> (N, L - keep) indices of the removed patches.

    ``argsort`` inverts the permutation back into the shuffle order, whose tail is removed.
    """
    return torch.argsort(ids_restore, dim=1)[:, keep:]

"""ViT-MAE: a timm ViT encoder that sees only the visible patches, and a light decoder.

Parameter names are the official MAE ones; the encoder part (``cls_token``, ``pos_embed``,
``patch_embed.*``, ``blocks.*``, ``norm.*``) is exactly timm's ``VisionTransformer``, so
``encoder_state_dict()`` loads into ``VisionTransformer(**timm_model_args(), num_classes=0)``
with ``strict=True``. The model predicts pixels; the loss lives in ``pretrain.objective``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from einops import rearrange
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Attention, Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from launch.errors import ConfigError
from pretrain.masking import gather_tokens, random_masking
from pretrain.pos_embed import sincos_2d_pos_embed

#: keys of the encoder in timm's VisionTransformer naming (everything else is decoder)
DECODER_PREFIXES = ("mask_token", "decoder_")


class MaskedAutoencoderViT(nn.Module):
    """Masked autoencoder with a Vision Transformer backbone (He et al., 2021)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        _check_arch(img_size, patch_size, in_chans, embed_dim, num_heads, decoder_embed_dim, decoder_num_heads)
        self.arch: dict[str, Any] = dict(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            decoder_embed_dim=decoder_embed_dim,
            decoder_depth=decoder_depth,
            decoder_num_heads=decoder_num_heads,
            mlp_ratio=mlp_ratio,
        )
        self.patch_size, self.in_chans, self.img_size = patch_size, in_chans, img_size
        self.grad_checkpointing = False
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        block = partial(Block, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm_layer)

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        grid = self.patch_embed.grid_size[0]
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # fixed sin-cos table: a frozen Parameter (as the official code) so it keeps its checkpoint name
        self.pos_embed = nn.Parameter(sincos_2d_pos_embed(embed_dim, grid)[None], requires_grad=False)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows with depth
        self.blocks = nn.ModuleList([block(embed_dim, num_heads, drop_path=dpr[i]) for i in range(depth)])
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_2d_pos_embed(decoder_embed_dim, grid)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList([block(decoder_embed_dim, decoder_num_heads) for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)

        self.set_fused_attn(fused_attn)
        self._init_weights()

    # ------------------------------------------------------------------ setup

    def _init_weights(self) -> None:
        """Official MAE init: xavier-uniform linears (patch projection seen as one), normal(0.02) tokens."""
        proj = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.data.view(proj.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def set_fused_attn(self, enable: bool = True) -> None:
        """Fused ``scaled_dot_product_attention`` (default) or timm's explicit softmax path."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.fused_attn = enable

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (timm's method name)."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed"}

    # ------------------------------------------------------------------ layout

    def patchify(self, imgs: Tensor) -> Tensor:
        """imgs: (N, C, H, W) -> (N, L, p*p*C), patches in row-major order, pixels as (p, q, c)."""
        p = self.patch_size
        return rearrange(imgs, "n c (h p) (w q) -> n (h w) (p q c)", p=p, q=p)

    def unpatchify(self, x: Tensor) -> Tensor:
        """x: (N, L, p*p*C) -> (N, C, H, W); the exact inverse of ``patchify``."""
        p, grid = self.patch_size, self.patch_embed.grid_size
        return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=grid[0], w=grid[1], p=p, q=p, c=self.in_chans)

    # ------------------------------------------------------------------ forward

    def forward_encoder(
        self, imgs: Tensor, mask_ratio: float, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """imgs: (N, C, H, W); noise: optional (N, L) (lowest kept).

        Returns ``latent`` (N, 1 + L_keep, D), ``mask`` (N, L) with 1 = removed and
        ``ids_restore`` (N, L). Masking happens after patch + position embedding, so the
        blocks only ever see the class token and the visible patches.
        """
        x = self._embed_patches(imgs)
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)
        return self._encode(x), mask, ids_restore

    def forward_features(self, imgs: Tensor) -> Tensor:
        """imgs: (N, C, H, W) -> (N, 1 + L, D): the plain ViT encoder, never masked."""
        return self._encode(self._embed_patches(imgs))

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor, ids_pred: Tensor | None = None) -> Tensor:
        """latent: (N, 1 + L_keep, D), ids_restore: (N, L) -> pixel predictions (N, L, p*p*C).

        With ``ids_pred`` (N, M) patch indices, only those M patches are predicted: (N, M, p*p*C).
        The loss needs only the removed patches, so the final norm and the wide pixel head
        (and, in the loss, the targets) skip the visible quarter (same values, per token).
        """
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(n, length + 1 - x.shape[1], -1)
        x = torch.cat([x, mask_tokens], dim=1)  # cls, the visible patches as shuffled, mask tokens
        # unshuffle in one gather: cls stays first, patch i takes shuffled slot ids_restore[:, i]
        order = torch.cat([ids_restore.new_zeros(n, 1), ids_restore + 1], dim=1)
        x = gather_tokens(x, order) + self.decoder_pos_embed
        x = self._run_blocks(self.decoder_blocks, x)
        x = x[:, 1:] if ids_pred is None else gather_tokens(x, ids_pred + 1)  # +1: past the cls token
        return self.decoder_pred(self.decoder_norm(x))

    def forward(self, imgs: Tensor, mask_ratio: float = 0.75, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """imgs: (N, C, H, W) -> ``pred`` (N, L, p*p*C), ``mask`` (N, L). The loss is the caller's."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        return self.forward_decoder(latent, ids_restore), mask

    def _embed_patches(self, imgs: Tensor) -> Tensor:
        """imgs: (N, C, H, W) -> (N, L, D) patch tokens with position added (class token not yet)."""
        expected = (self.in_chans, *self.patch_embed.img_size)
        if imgs.ndim != 4 or tuple(imgs.shape[1:]) != expected:
            raise ValueError(
                f"images of shape {tuple(imgs.shape)} do not fit the model; "
                f"expected (N, {', '.join(map(str, expected))})"
            )
        return self.patch_embed(imgs) + self.pos_embed[:, 1:]

    def _encode(self, x: Tensor) -> Tensor:
        """x: (N, K, D) positioned patch tokens -> (N, 1 + K, D) normalized encoder output."""
        cls = (self.cls_token + self.pos_embed[:, :1]).to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        return self.norm(self._run_blocks(self.blocks, x))

    def _run_blocks(self, blocks: nn.ModuleList, x: Tensor) -> Tensor:
        for blk in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    # ------------------------------------------------------------------ interop

    def timm_model_args(self) -> dict[str, Any]:
        """JSON-able kwargs of timm's ``VisionTransformer`` with the same encoder (add ``num_classes``)."""
        a = self.arch  # timm's default norm is already LayerNorm(eps=1e-6), so no callable is needed
        return dict(
            img_size=a["img_size"],
            patch_size=a["patch_size"],
            in_chans=a["in_chans"],
            embed_dim=a["embed_dim"],
            depth=a["depth"],
            num_heads=a["num_heads"],
            mlp_ratio=a["mlp_ratio"],
            qkv_bias=True,
            class_token=True,
            global_pool="token",
        )

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The encoder's tensors under timm ``VisionTransformer`` keys (decoder and mask token dropped)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(DECODER_PREFIXES)}


def _check_arch(img_size: int, patch: int, chans: int, dim: int, heads: int, dec_dim: int, dec_heads: int) -> None:
    if patch < 1 or img_size % patch:
        raise ConfigError(f"image size {img_size} is not divisible by patch size {patch}; use a multiple of {patch}")
    if chans < 1:
        raise ConfigError(f"in_chans {chans} must be at least 1 (1 for grayscale, 3 for RGB)")
    for what, width, n in (("embed_dim", dim, heads), ("decoder_embed_dim", dec_dim, dec_heads)):
        if n < 1 or width % n:
            raise ConfigError(f"{what} {width} is not divisible by its number of heads {n}")

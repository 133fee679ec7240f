"""ViT models: the MAE autoencoder (a timm VisionTransformer plus MAE's decoder) and the fine-tuning classifier.

Both are built from timm components, so their state dicts use the key layout of the official MAE checkpoints
(cls_token, pos_embed, patch_embed.proj.*, blocks.N.*, norm.*, decoder_*, mask_token, fc_norm.*, head.*).

    >>> mae = build_mae(PRESETS["vit_base"], img_size=224, patch_size=16)   # mae_vit_base_patch16_dec512d8b
    >>> clf = build_classifier(PRESETS["vit_base"], num_classes=1000, drop_path=0.1)
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from timm.layers import Mlp, trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer

from harness.core.arch import PRESETS, Arch, get_arch, num_visible  # noqa: F401  (re-exported: their home is harness.core.arch)


_norm = partial(nn.LayerNorm, eps=1e-6)


def sincos_pos_embed_2d(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding in MAE's layout: (1 + grid*grid, dim), a zero row for the class token.

    Half the channels encode the column index and half the row index (MAE builds meshgrid(w, h)); each half is
    [sin(pos * omega), cos(pos * omega)] with omega = 1 / 10000^(k / (dim/4)).
    """
    assert dim % 4 == 0, "sin-cos position embedding needs embed_dim divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([encode(cols), encode(rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


@dataclass
class Masking:
    """One random mask per image. ids_keep indexes the visible patches; mask is 1 on masked patches."""

    ids_keep: torch.Tensor  # (B, n_vis)
    ids_restore: torch.Tensor  # (B, N)
    mask: torch.Tensor  # (B, N) float, 1 = masked


def random_masking(batch: int, num_patches: int, mask_ratio: float, device, rounding: str = "paper",
                   generator: Optional[torch.Generator] = None) -> Masking:
    """MAE's per-sample shuffle: sort uniform noise, keep the first n_vis indices."""
    n_vis = num_visible(num_patches, mask_ratio, rounding)
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :n_vis]
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :n_vis] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Masking(ids_keep, ids_restore, mask)


class MaskedAutoencoderViT(VisionTransformer):
    """MAE: a timm ViT encoder over the visible patches + a light decoder predicting the pixels of every patch.

    forward_encoder() can return the raw residual stream of chosen blocks (before the final norm) and stop after a
    given block: the DMAE teacher runs only up to its deepest aligned block. The optional `distill_proj` heads
    (student feature -> teacher width) belong to a DMAE student and are dropped at fine-tuning.
    """

    def __init__(self, arch: Arch, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 with_decoder: bool = True):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
                         global_pool="token", embed_dim=arch.embed_dim, depth=arch.depth, num_heads=arch.num_heads,
                         mlp_ratio=arch.mlp_ratio, qkv_bias=True, norm_layer=_norm, weight_init="skip")
        self.arch = arch
        self.patch_size = patch_size
        self.in_chans = in_chans
        grid = self.patch_embed.grid_size[0]
        self.pos_embed.requires_grad_(False)  # fixed sin-cos, as in MAE
        self.has_decoder = with_decoder
        if with_decoder:
            d = arch.decoder_embed_dim
            self.decoder_embed = nn.Linear(arch.embed_dim, d, bias=True)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
            self.decoder_pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, d), requires_grad=False)
            self.decoder_blocks = nn.ModuleList([
                Block(d, arch.decoder_num_heads, arch.mlp_ratio, qkv_bias=True, norm_layer=_norm)
                for _ in range(arch.decoder_depth)])
            self.decoder_norm = _norm(d)
            self.decoder_pred = nn.Linear(d, patch_size ** 2 * in_chans, bias=True)
        self.distill_proj: Optional[nn.ModuleList] = None
        self._init_mae_weights()

    def _init_mae_weights(self) -> None:
        grid = self.patch_embed.grid_size[0]
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.embed_dim, grid)[None])
        if self.has_decoder:
            self.decoder_pos_embed.data.copy_(sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], grid)[None])
            nn.init.normal_(self.mask_token, std=0.02)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for name, m in self.named_modules():
            if name == "patch_embed.proj":
                continue
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def add_distill_heads(self, out_dims: Sequence[int], kind: str = "linear", init: str = "official") -> None:
        """One projection per aligned pair: student width -> teacher width.

        kind 'linear': nn.Linear with bias (official 'fc-1layer'); 'mlp': timm Mlp(in=student width, hidden=out=teacher
        width, GELU) (official 'mlp-1layer', keys fc1/fc2). init 'official': PyTorch's default nn.Linear init -- the
        official student builds its heads AFTER its weight-init pass, so they are never re-initialised; 'xavier':
        xavier-uniform weights and zero biases, like the rest of the MAE (this harness's earlier default).
        """
        if init not in ("official", "xavier"):
            raise ValueError(f"projection init must be 'official' or 'xavier', got {init!r}")
        heads = []
        for out in out_dims:
            if kind == "linear":
                head = nn.Linear(self.embed_dim, out)
            elif kind == "mlp":
                head = Mlp(in_features=self.embed_dim, hidden_features=out, out_features=out, act_layer=nn.GELU)
            else:
                raise ValueError(f"projection must be 'linear' or 'mlp', got {kind!r}")
            if init == "xavier":
                for m in head.modules():
                    if isinstance(m, nn.Linear):
                        nn.init.xavier_uniform_(m.weight)
                        nn.init.zeros_(m.bias)
            heads.append(head)
        self.distill_proj = nn.ModuleList(heads)

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), MAE's channel-last patch order."""
        p, c = self.patch_size, self.in_chans
        b, _, h, w = imgs.shape
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def forward_encoder(self, imgs: torch.Tensor, ids_keep: Optional[torch.Tensor],
                        out_blocks: Sequence[int] = (), stop_after: Optional[int] = None
                        ) -> Tuple[Optional[torch.Tensor], Dict[int, torch.Tensor]]:
        """Encode the visible patches (all of them when ids_keep is None).

        Returns (latent after the final norm, or None when stopped early; {block index: raw block output}),
        block outputs shaped (B, 1 + n_vis, D) with the class token first.
        """
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        last = len(self.blocks) - 1 if stop_after is None else stop_after
        if not 0 <= last < len(self.blocks):
            raise ValueError(f"block {last} does not exist in a {len(self.blocks)}-block encoder")
        feats: Dict[int, torch.Tensor] = {}
        wanted = set(out_blocks)
        for i in range(last + 1):
            x = self.blocks[i](x)
            if i in wanted:
                feats[i] = x
        latent = self.norm(x) if last == len(self.blocks) - 1 else None
        return latent, feats

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        b, n = ids_restore.shape
        mask_tokens = self.mask_token.expand(b, n + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward(self, imgs: torch.Tensor, masking: Masking, feat_blocks: Sequence[int] = ()
                ) -> Tuple[torch.Tensor, list]:
        """Student step: pixel prediction for every patch, and the projected features of `feat_blocks`
        (one per distill head, in order)."""
        latent, feats = self.forward_encoder(imgs, masking.ids_keep, out_blocks=feat_blocks)
        pred = self.forward_decoder(latent, masking.ids_restore)
        projected = [self.distill_proj[k](feats[b]) for k, b in enumerate(feat_blocks)] if feat_blocks else []
        return pred, projected


def build_mae(arch: Arch, img_size: int, patch_size: int, in_chans: int = 3, with_decoder: bool = True
              ) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(arch, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                with_decoder=with_decoder)


def build_classifier(arch: Arch, num_classes: int, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                     drop_path: float = 0.0) -> VisionTransformer:
    """MAE's fine-tuning layout: timm ViT with global average pool (class token excluded) + fc_norm + head,
    head initialised trunc_normal(std=2e-5)."""
    model = VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                              global_pool="avg", fc_norm=True, embed_dim=arch.embed_dim, depth=arch.depth,
                              num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio, qkv_bias=True,
                              norm_layer=_norm, drop_path_rate=drop_path)
    trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)
    return model

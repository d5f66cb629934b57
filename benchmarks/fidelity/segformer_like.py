"""SegFormerLike: a small encoder with the structure of SegFormer (MiT) plus its all-MLP decoder.

    image (B, 3, 128, 128)
    -> 3 stages; each: overlapping patch embed (conv, stride 2; the first 7x7, then 3x3) + LayerNorm
       -> tokens x.flatten(2).transpose(1, 2)
       -> depth x pre-norm block:
          efficient self-attention: queries from all tokens; keys/values from the spatially reduced
          map (``sr``: conv kernel = stride = sr_ratio, then LayerNorm), F.scaled_dot_product_attention
          Mix-FFN: Linear -> 3x3 depthwise conv on the token map -> GELU -> Linear
       -> LayerNorm -> back to (B, C, H, W)
       stage 1: 64 x 64 tokens (keys 8 x 8, sr 8); stage 2: 32 x 32 (keys 8 x 8, sr 4);
       stage 3: 16 x 16 (keys 8 x 8, sr 2)
    -> decoder (SegFormer's all-MLP head): per stage Linear -> upsample to 64 x 64 (bilinear) ->
       concat -> 1x1 conv + BN + ReLU -> Linear(classes * 2 * 2) -> pixel shuffle
    -> logits (B, classes, 128, 128)

The attention follows transformers' ``SegformerEfficientSelfAttention`` (query / key / value
Linear, ``sr`` conv + ``layer_norm``) and the Mix-FFN ``SegformerMixFFN`` (dense1, dwconv, GELU,
dense2), with SDPA in place of the explicit matmul-softmax-matmul. SegFormer's first stage has stride
4; at 128 pixels that is only 32 x 32 tokens, so here the first stage has stride 2 (64 x 64 tokens,
the paper's operating point) and one stage fewer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import NUM_CLASSES
from .model import init_linear

__all__ = ["SegFormerLike"]


class EfficientSelfAttention(nn.Module):
    """Attention with spatially reduced keys/values (SegFormer's)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.layer_norm = nn.LayerNorm(dim)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        b, n, c = x.shape
        q = self.heads(self.query(x))
        if self.sr_ratio > 1:
            kv = x.permute(0, 2, 1).reshape(b, c, height, width)
            kv = self.sr(kv).reshape(b, c, -1).permute(0, 2, 1)
            kv = self.layer_norm(kv)
        else:
            kv = x
        k = self.heads(self.key(kv))
        v = self.heads(self.value(kv))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MixFFN(nn.Module):
    """Linear -> 3x3 depthwise conv over the token map -> GELU -> Linear (SegFormer's Mix-FFN)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.dense1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.dense2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = self.dense1(x)
        b, n, c = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(b, c, height, width)).flatten(2).transpose(1, 2)
        return self.dense2(F.gelu(x))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), height, width)
        return x + self.mlp(self.norm2(x), height, width)


class Stage(nn.Module):
    def __init__(self, in_dim, dim, kernel, depth, num_heads, sr_ratio, mlp_ratio) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(in_dim, dim, kernel, stride=2, padding=kernel // 2)
        self.embed_norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(Block(dim, num_heads, sr_ratio, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        b, c, h, w = x.shape
        x = self.embed_norm(x.flatten(2).transpose(1, 2))
        for blk in self.blocks:
            x = blk(x, h, w)
        x = self.norm(x)
        return x.transpose(1, 2).reshape(b, c, h, w)


class SegFormerLike(nn.Module):
    """SegFormer-structured segmenter: per-pixel logits (B, num_classes, H, W) for a (B, 3, H, W) image."""

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        dims: tuple[int, ...] = (32, 64, 128),
        depths: tuple[int, ...] = (2, 2, 2),
        num_heads: tuple[int, ...] = (1, 2, 4),
        sr_ratios: tuple[int, ...] = (8, 4, 2),
        mlp_ratio: float = 4.0,
        decoder_dim: int = 64,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.patch_size = 2
        in_dims = (3,) + tuple(dims[:-1])
        self.stages = nn.ModuleList(
            Stage(i, d, 7 if s == 0 else 3, n, h, r, mlp_ratio)
            for s, (i, d, n, h, r) in enumerate(zip(in_dims, dims, depths, num_heads, sr_ratios))
        )
        self.decode_linear = nn.ModuleList(nn.Linear(d, decoder_dim) for d in dims)
        self.fuse = nn.Sequential(
            nn.Conv2d(decoder_dim * len(dims), decoder_dim, 1, bias=False), nn.BatchNorm2d(decoder_dim), nn.ReLU()
        )
        self.head = nn.Conv2d(decoder_dim, num_classes * self.patch_size**2, 1)
        self.apply(init_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        size = feats[0].shape[-2:]
        ups = []
        for f, lin in zip(feats, self.decode_linear):
            f = lin(f.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(f.shape[0], -1, *f.shape[-2:])
            ups.append(f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False))
        x = self.head(self.fuse(torch.cat(ups, dim=1)))
        return F.pixel_shuffle(x, self.patch_size)  # (B, classes, 128, 128)

"""The attention-core models of benchmark case 1 and the hand-written grid-attention baselines.

* :class:`AttentionCore` - attention over an ``H x W`` image and nothing else: q, k, v are read
  from a ``(B, 3*h*d, H, W)`` feature map, the output is ``(B, H*W, h*d)`` tokens. The map goes
  through ``F.avg_pool2d(x, 1)`` first: an identity that marks it as an image for the layout
  proof (which starts at spatial ops: conv / pool / interpolate) and that inductor folds into the
  copy feeding SDPA, so it costs nothing. The tokens are made contiguous as a projection would
  write them (a q read straight from an NCHW map has a strided last axis, and SDPA then falls back
  to its unfused math kernel in eager and inductor alike).
* :class:`AttentionBlock` - the same attention inside a pre-norm block with its projections:
  ``x + dwconv3x3(x)`` (conv positional encoding) -> tokens -> LayerNorm -> qkv Linear -> SDPA ->
  proj Linear -> residual.
* :class:`EagerGridCore` - grid attention the way the authors wrote it: view/permute the tokens
  into ``G*G`` groups (folded into the batch), plain SDPA, permute back.
* :class:`FlexGridCore` - grid attention with FlexAttention block masks: ``clustered=True``
  permutes the tokens group-major first so the block mask is block-diagonal (blocks outside the
  groups are skipped); ``clustered=False`` keeps raster order and masks ``group(q) == group(k)``,
  which no block mask can skip (every 128-token block holds tokens of every group).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttentionCore(nn.Module):
    def __init__(self, heads: int = 2, head_dim: int = 64):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim

    def channels(self) -> int:
        return 3 * self.heads * self.head_dim

    def tokens(self, qkv_map):
        x = F.avg_pool2d(qkv_map, 1)  # identity; marks the map as an image (see the module docstring)
        b, _, h, w = x.shape
        return x.flatten(2).transpose(1, 2).contiguous(), (b, h, w)  # (B, N, 3C)

    def forward(self, qkv_map):
        t, (b, h, w) = self.tokens(qkv_map)
        q, k, v = t.reshape(b, h * w, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        return o.transpose(1, 2).reshape(b, h * w, self.heads * self.head_dim)


class AttentionBlock(nn.Module):
    def __init__(self, heads: int = 2, head_dim: int = 64):
        super().__init__()
        dim = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def channels(self) -> int:
        return self.heads * self.head_dim

    def forward(self, x):
        x = x + self.pos(x)
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, N, C)
        qkv = self.qkv(self.norm(t)).reshape(b, h * w, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o = self.attend(q, k, v, h, w)
        return t + self.proj(o.transpose(1, 2).reshape(b, h * w, c))

    def attend(self, q, k, v, h, w):
        return F.scaled_dot_product_attention(q, k, v)


def _group(x, h: int, w: int, g: int):
    """(B, heads, N, d) raster tokens -> (B*g*g, heads, N/(g*g), d), the authors' view/permute."""
    b, heads, _, d = x.shape
    x = x.reshape(b, heads, h // g, g, w // g, g, d).permute(0, 3, 5, 1, 2, 4, 6)
    return x.reshape(b * g * g, heads, (h // g) * (w // g), d)


def _ungroup(x, b: int, h: int, w: int, g: int):
    """Inverse of :func:`_group`: (B*g*g, heads, n, d) -> (B, heads, N, d)."""
    _, heads, _, d = x.shape
    x = x.reshape(b, g, g, heads, h // g, w // g, d).permute(0, 3, 4, 1, 5, 2, 6)
    return x.reshape(b, heads, h * w, d)


class EagerGridCore(AttentionCore):
    def __init__(self, heads: int = 2, head_dim: int = 64, stride: int = 2):
        super().__init__(heads, head_dim)
        self.stride = stride

    def forward(self, qkv_map):
        t, (b, h, w) = self.tokens(qkv_map)
        q, k, v = t.reshape(b, h * w, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        g = self.stride
        o = F.scaled_dot_product_attention(_group(q, h, w, g), _group(k, h, w, g), _group(v, h, w, g))
        o = _ungroup(o, b, h, w, g)
        return o.transpose(1, 2).reshape(b, h * w, self.heads * self.head_dim)


class EagerGridBlock(AttentionBlock):
    def __init__(self, heads: int = 2, head_dim: int = 64, stride: int = 2):
        super().__init__(heads, head_dim)
        self.stride = stride

    def attend(self, q, k, v, h, w):
        g, b = self.stride, q.shape[0]
        o = F.scaled_dot_product_attention(_group(q, h, w, g), _group(k, h, w, g), _group(v, h, w, g))
        return _ungroup(o, b, h, w, g)


class FlexGridCore(AttentionCore):
    def __init__(self, height: int, width: int, heads: int = 2, head_dim: int = 64, stride: int = 2,
                 clustered: bool = True):
        from torch.nn.attention.flex_attention import create_block_mask

        super().__init__(heads, head_dim)
        self.stride, self.clustered = stride, clustered
        g, n = stride, (height // stride) * (width // stride)
        length = height * width
        if clustered:
            def mask_mod(b, h, q_idx, kv_idx):
                return (q_idx // n) == (kv_idx // n)
        else:
            def mask_mod(b, h, q_idx, kv_idx):
                gq = ((q_idx // width) % g) * g + (q_idx % width) % g
                gk = ((kv_idx // width) % g) * g + (kv_idx % width) % g
                return gq == gk
        self.block_mask = create_block_mask(mask_mod, None, None, length, length, device="cpu")
        # group-major order of the raster tokens, and back (a gather: inductor's CPU flex lowering
        # wants 4-D input buffers, which a 7-D permute copy is not)
        order = _group(torch.arange(length).view(1, 1, length, 1), height, width, g).flatten()
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("inverse", torch.argsort(order), persistent=False)

    def attention_density(self) -> float:
        """Fraction of (query block, key block) pairs the block mask computes."""
        return 1.0 - float(self.block_mask.sparsity()) / 100.0

    def forward(self, qkv_map):
        from torch.nn.attention.flex_attention import flex_attention

        t, (b, h, w) = self.tokens(qkv_map)
        q, k, v = t.reshape(b, h * w, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.clustered:  # group-major sequence: (B, heads, G*G*n, d)
            o = flex_attention(q.index_select(2, self.order), k.index_select(2, self.order),
                               v.index_select(2, self.order), block_mask=self.block_mask)
            o = o.index_select(2, self.inverse)
        else:
            o = flex_attention(q, k, v, block_mask=self.block_mask)
        return o.transpose(1, 2).reshape(b, h * w, self.heads * self.head_dim)

"""SamLike: a small encoder with the structure of SAM's image encoder, for dense prediction.

    image (B, 3, 128, 128)
    -> conv stem (3x3 s2 -> BN -> GELU -> 3x3): patch 2 -> 64 x 64 tokens, NHWC (permute)
    -> + learned absolute pos-embed (B, 64, 64, dim)
    -> depth x pre-norm block, SAM's Block: windowed attention (8 x 8 windows, window_partition /
       window_unpartition) in most blocks, global attention over all 64 x 64 = 4096 tokens in
       ``global_blocks``; every attention adds the decomposed relative-position bias
       (``attn = attn + rel_h + rel_w``, get_rel_pos / add_decomposed_rel_pos) in SAM's manual
       matmul-softmax-matmul form
    -> LayerNorm -> Linear(dim, classes * 2 * 2) -> pixel shuffle -> logits (B, classes, 128, 128)

The attention, block and rel-pos code follow ``segment_anything/modeling/image_encoder.py``
(Apache-2.0) line by line, minus what a 128-pixel model does not need (the neck). At 64 x 64 pixels
(the cheap training phase) the tokens are 32 x 32: the pos-embed is interpolated (bicubic) and
``get_rel_pos`` interpolates the global blocks' rel-pos tables (linear), as SAM does for another
input size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import IMAGE_SIZE, NUM_CLASSES
from .model import init_linear

__all__ = ["SamLike", "add_decomposed_rel_pos", "get_rel_pos"]


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative positional embeddings (q_size, k_size, C) for the given query and key sizes (SAM's)."""
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos_resized = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist, mode="linear"
        )
        rel_pos_resized = rel_pos_resized.reshape(-1, max_rel_dist).permute(1, 0)
    else:
        rel_pos_resized = rel_pos
    q_coords = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos_resized[relative_coords.long()]


def add_decomposed_rel_pos(attn, q, rel_pos_h, rel_pos_w, q_size, k_size) -> torch.Tensor:
    """SAM's decomposed relative-position bias: ``attn + rel_h[..., None] + rel_w[..., None, :]``."""
    q_h, q_w = q_size
    k_h, k_w = k_size
    Rh = get_rel_pos(q_h, k_h, rel_pos_h)
    Rw = get_rel_pos(q_w, k_w, rel_pos_w)
    B, _, dim = q.shape
    r_q = q.reshape(B, q_h, q_w, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)
    attn = (attn.view(B, q_h, q_w, k_h, k_w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).view(
        B, q_h * q_w, k_h * k_w
    )
    return attn


class Attention(nn.Module):
    """SAM's multi-head attention with the decomposed rel-pos bias, on (B, H, W, C) inputs."""

    def __init__(self, dim: int, num_heads: int, input_size: tuple[int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W))
        attn = attn.softmax(dim=-1)
        x = (attn @ v).view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
        return self.proj(x)


def window_partition(x: torch.Tensor, window_size: int):
    """(B, H, W, C) -> windows (B * nW, ws, ws, C) and the padded size (SAM's)."""
    B, H, W, C = x.shape
    pad_h = (window_size - H % window_size) % window_size
    pad_w = (window_size - W % window_size) % window_size
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window_size, window_size, Wp // window_size, window_size, C)
    windows = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, C)
    return windows, (Hp, Wp)


def window_unpartition(windows: torch.Tensor, window_size: int, pad_hw, hw) -> torch.Tensor:
    """Windows back to (B, H, W, C), padding removed (SAM's)."""
    Hp, Wp = pad_hw
    H, W = hw
    B = windows.shape[0] // (Hp * Wp // window_size // window_size)
    x = windows.view(B, Hp // window_size, Wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, Hp, Wp, -1)
    if Hp > H or Wp > W:
        x = x[:, :H, :W, :].contiguous()
    return x


class Block(nn.Module):
    """SAM's block: pre-norm windowed (``window_size > 0``) or global attention, then an MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window_size: int, input_size: tuple[int, int]):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, input_size if window_size == 0 else (window_size, window_size))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (H, W))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class SamLike(nn.Module):
    """SAM-structured segmenter: per-pixel logits (B, num_classes, H, W) for a (B, 3, H, W) image."""

    def __init__(
        self,
        image_size: int = IMAGE_SIZE,
        num_classes: int = NUM_CLASSES,
        dim: int = 64,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 3.0,
        window_size: int = 8,
        global_blocks: tuple[int, ...] = (2, 5),
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.patch_size = 2
        self.num_classes = num_classes
        self.grid = image_size // self.patch_size
        # SAM embeds patches with one conv; our tokens are 2 px wide, so a two-conv stem gives each
        # one a 7 x 7-pixel view (a texture period is 4-11 px) and leaves all longer-range mixing to
        # the windowed and global attention.
        self.patch_embed = nn.Sequential(
            nn.Conv2d(3, dim // 2, 3, stride=2, padding=1), nn.BatchNorm2d(dim // 2), nn.GELU(),
            nn.Conv2d(dim // 2, dim, 3, padding=1),
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid, self.grid, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, 0 if i in global_blocks else window_size, (self.grid, self.grid))
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes * self.patch_size**2)
        self.apply(init_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).permute(0, 2, 3, 1)  # (B, 64, 64, dim), as SAM's PatchEmbed
        b, h, w, _ = x.shape
        pos = self.pos_embed
        if (h, w) != (self.grid, self.grid):  # another resolution (low-res training phase)
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False)
            pos = pos.permute(0, 2, 3, 1)
        x = x + pos
        for blk in self.blocks:
            x = blk(x)
        x = self.head(self.norm(x))  # (B, H, W, classes * 4)
        x = x.permute(0, 3, 1, 2)
        return F.pixel_shuffle(x, self.patch_size)  # (B, classes, 128, 128)

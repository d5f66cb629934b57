"""SegViT: a small plain ViT for dense prediction, with global attention over all image tokens.

    image (B, 3, 128, 128)
    -> conv stem (3x3 s2 -> BN -> GELU -> 3x3 s2 -> BN -> GELU -> 3x3 -> BN -> GELU -> 3x3):
       patch 4 -> 32 x 32 tokens, each seeing a 23 x 23-pixel neighbourhood
    -> x.flatten(2).transpose(1, 2) -> + learned pos-embed (2D sin-cos init)   (B, 1024, dim)
    -> depth x pre-norm block: LayerNorm -> qkv Linear -> heads -> F.scaled_dot_product_attention
                                over all 1024 tokens -> proj ; LayerNorm -> MLP
    -> LayerNorm -> Linear(dim, classes * 4 * 4) -> pixel shuffle -> logits (B, classes, 128, 128)

The tokens come straight from the conv output by ``flatten(2).transpose(1, 2)``, so the gridattn
pass can prove every attention site's 32 x 32 image layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The demo model's global multi-head SDPA attention (qkv -> heads -> SDPA -> proj), same weights layout.
from gridattn_fx.tools.demo_model import Attention

from .data import IMAGE_SIZE, NUM_CLASSES

__all__ = ["SegViT", "predict"]


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(1, grid*grid, dim) 2D sine-cosine position embedding (MAE style), the pos-embed's init."""
    if dim % 4:
        raise ValueError(f"dim ({dim}) must be a multiple of 4 for the sincos init")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for c in (yy.reshape(-1), xx.reshape(-1)):
        arg = c[:, None] * omega[None]
        parts += [arg.sin(), arg.cos()]
    return torch.cat(parts, dim=1).float()[None]


@torch.no_grad()
def predict(model, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Logits (N, classes, H, W) of ``model`` (eager or compiled) over ``images`` in equal chunks."""
    return torch.cat([model(images[i : i + batch]) for i in range(0, len(images), batch)])


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_linear(m: nn.Module) -> None:
    """The fidelity models' Linear init (truncated normal, zero bias), for ``module.apply``."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)


class SegViT(nn.Module):
    """Plain ViT segmenter: per-pixel logits (B, num_classes, H, W) for a (B, 3, H, W) image."""

    def __init__(
        self,
        image_size: int = IMAGE_SIZE,
        patch_size: int = 4,
        num_classes: int = NUM_CLASSES,
        dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 3.0,
        stem: str = "conv4bn",
        pos_init: str = "sincos",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.grid = image_size // patch_size
        if stem == "conv4bn":
            # Convolutional stem ("early convolutions", Xiao et al. 2021): two stride-2 3x3 convs and
            # two 3x3 convs with BatchNorm + GELU; each token sees a 23x23-pixel neighbourhood.
            if patch_size != 4:
                raise ValueError("stem 'conv4bn' needs patch_size 4")
            self.patch_embed = nn.Sequential(
                nn.Conv2d(3, dim // 2, 3, stride=2, padding=1), nn.BatchNorm2d(dim // 2), nn.GELU(),
                nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim), nn.GELU(),
                nn.Conv2d(dim, dim, 3, padding=1), nn.BatchNorm2d(dim), nn.GELU(),
                nn.Conv2d(dim, dim, 3, padding=1),
            )
        elif stem == "conv":
            # Plain overlapping patch embed (kernel 2p, stride p): did not learn the shape classes
            # within the training budget (see README.md); kept for comparison.
            self.patch_embed = nn.Conv2d(3, dim, kernel_size=2 * patch_size, stride=patch_size, padding=patch_size // 2)
        else:
            raise ValueError(f"unknown stem {stem!r}")
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, dim))
        if pos_init == "sincos":
            with torch.no_grad():
                self.pos_embed.copy_(sincos_2d(self.grid, dim))
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes * patch_size * patch_size)
        self.apply(init_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = self.patch_embed(x)  # (B, dim, 32, 32)
        h, w = x.shape[-2:]
        pos = self.pos_embed
        if (h, w) != (self.grid, self.grid):  # another resolution (low-res training phase)
            pos = pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
            pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
            pos = pos.flatten(2).transpose(1, 2)
        x = x.flatten(2).transpose(1, 2) + pos  # (B, 1024, dim)
        for blk in self.blocks:
            x = blk(x)
        x = self.head(self.norm(x))  # (B, 1024, classes * p * p)
        x = x.transpose(1, 2).reshape(b, self.num_classes * self.patch_size**2, h, w)
        return F.pixel_shuffle(x, self.patch_size)  # (B, classes, 128, 128)

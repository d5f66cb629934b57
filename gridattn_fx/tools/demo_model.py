"""A built-in high-resolution ViT-style backbone for the demo and benchmarks.

Plain PyTorch, no downloads, random weights from a fixed seed. The structure follows the usual
timm / ViTDet layout so that the gridattn pass sees a typical graph:

    Conv2d patch embed (stride = patch) -> flatten(2).transpose(1, 2)
    -> cat([cls, tokens]) -> + learned pos-embed
    -> N pre-norm blocks: LayerNorm -> qkv Linear -> reshape/permute/unbind into heads
       -> F.scaled_dot_product_attention -> proj ; LayerNorm -> MLP
    -> LayerNorm -> drop cls -> (B, C, H/patch, W/patch) dense feature map

With the default size (1024x1024 image, patch 16 -> 64x64 = 4096 image tokens + 1 cls token,
width 256, 4 heads, 4 blocks) attention dominates the cost of a forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DemoViT", "build_demo_model"]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class DemoViT(nn.Module):
    """ViT backbone over a square image that returns a dense (B, C, H/p, W/p) feature map."""

    def __init__(
        self,
        image_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 256,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(
                f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})"
            )
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        num_tokens = self.grid_size * self.grid_size
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_tokens, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, C, h, w)
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C), row-major
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x[:, 1:].transpose(1, 2).reshape(b, c, h, w)


def build_demo_model(
    image_size: int = 1024,
    *,
    patch_size: int = 16,
    embed_dim: int = 256,
    depth: int = 4,
    num_heads: int = 4,
    mlp_ratio: float = 4.0,
    batch_size: int = 1,
    seed: int = 0,
) -> tuple[DemoViT, torch.Tensor]:
    """Build the demo ViT (eval mode, random weights from ``seed``) and an example image batch.

    Returns ``(model, example_input)`` where ``example_input`` has shape
    ``(batch_size, 3, image_size, image_size)``.
    """
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = DemoViT(
            image_size=image_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
        ).eval()
        example_input = torch.randn(batch_size, 3, image_size, image_size)
    finally:
        torch.random.set_rng_state(gen_state)
    return model, example_input

"""``clip-mha``: a CLIP-style vision tower built from ``torch.nn.MultiheadAttention`` (plain torch).

The structure of OpenAI CLIP's ``VisionTransformer`` (conv patch embedding without bias, class
token, absolute position embedding, ``ln_pre``, residual attention blocks with
``nn.MultiheadAttention`` and a QuickGELU MLP, ``ln_post`` on the class token, projection).
OpenAI's code runs the transformer sequence-first (``batch_first=False``, ``x.permute(1, 0, 2)``);
open_clip's newer code is batch-first. Both are available.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import finish, images, seeded

FULL = dict(image_size=224, patch_size=16, width=768, layers=12, heads=12, output_dim=512)  # ViT-B/16
SMALL = dict(image_size=128, patch_size=16, width=64, layers=2, heads=2, output_dim=32)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, batch_first: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=batch_first)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class CLIPVisionTower(nn.Module):
    def __init__(self, image_size=224, patch_size=16, width=768, layers=12, heads=12, output_dim=512,
                 batch_first: bool = False):
        super().__init__()
        self.batch_first = batch_first
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        grid = image_size // patch_size
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Sequential(*[ResidualAttentionBlock(width, heads, batch_first) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x):
        x = self.conv1(x)                                  # B, C, h, w
        x = x.reshape(x.shape[0], x.shape[1], -1)          # B, C, h*w
        x = x.permute(0, 2, 1)                             # B, h*w, C
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype,
                                                             device=x.device)
        x = torch.cat([cls, x], dim=1)                     # B, 1 + h*w, C
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        if self.batch_first:
            x = self.transformer(x)
        else:
            x = x.permute(1, 0, 2)                         # L, B, C
            x = self.transformer(x)
            x = x.permute(1, 0, 2)
        x = self.ln_post(x[:, 0, :])
        return x @ self.proj


def build(*, small: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0, batch_size: int = 1,
          nonzero_init: bool = True, batch_first: bool = False, **overrides):
    """``overrides``: ``image_size``, ``patch_size``, ``width``, ``layers``, ``heads``, ``output_dim``."""
    kwargs = dict(SMALL if small else FULL, **overrides)
    with seeded(seed):
        model = CLIPVisionTower(batch_first=batch_first, **kwargs)
        x = images(batch_size, kwargs["image_size"])
    with seeded(seed + 1):
        return finish(model, (x,), dtype=dtype, nonzero_init=nonzero_init)

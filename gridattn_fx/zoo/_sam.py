"""``sam:vit_b``: the official Segment Anything image encoder (``segment_anything.modeling.ImageEncoderViT``)."""

from __future__ import annotations

from functools import partial

import torch

from ._common import finish, images, require, seeded
from ._torchvision_stub import import_with_torchvision

# build_sam_vit_b's encoder arguments (segment_anything/build_sam.py), and a small version with the
# same structure: windowed blocks plus global blocks with decomposed relative-position bias.
FULL = dict(depth=12, embed_dim=768, img_size=1024, mlp_ratio=4, num_heads=12, patch_size=16, qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=(2, 5, 8, 11), window_size=14, out_chans=256)
SMALL = dict(FULL, depth=4, embed_dim=64, img_size=256, num_heads=2, global_attn_indexes=(1, 3), window_size=8,
             out_chans=32)


def build(*, small: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0, batch_size: int = 1,
          nonzero_init: bool = True, **overrides):
    """``overrides`` are ``ImageEncoderViT`` keyword arguments (``img_size``, ``depth``, ...)."""
    require("segment_anything", "sam:vit_b", import_it=False)
    import_with_torchvision("segment_anything")
    from segment_anything.modeling import ImageEncoderViT

    kwargs = dict(SMALL if small else FULL, **overrides)
    with seeded(seed):
        model = ImageEncoderViT(norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **kwargs)
        x = images(batch_size, kwargs["img_size"])
    with seeded(seed + 1):
        return finish(model, (x,), dtype=dtype, nonzero_init=nonzero_init)

"""timm builders (``timm:<model name>``), through ``timm.create_model(name, pretrained=False)``."""

from __future__ import annotations

import torch

from ._common import finish, images, require, seeded
from ._torchvision_stub import import_with_torchvision

# name -> (small create_model kwargs, small input size, full input size). The full config is the
# timm registry's own for that name (kwargs {}), at its pretrained input size.
SPECS = {
    "vit_base_patch16_224": (
        dict(img_size=128, embed_dim=64, depth=2, num_heads=2), 128, 224),
    "deit_base_distilled_patch16_224": (
        dict(img_size=128, embed_dim=64, depth=2, num_heads=2), 128, 224),
    "vit_small_patch14_reg4_dinov2": (
        dict(img_size=112, embed_dim=64, depth=2, num_heads=2), 112, 518),
    "eva02_tiny_patch14_224": (
        dict(img_size=112, embed_dim=64, depth=2, num_heads=2, ref_feat_shape=(8, 8)), 112, 224),
    "samvit_base_patch16": (
        dict(img_size=256, embed_dim=64, depth=4, num_heads=2, global_attn_indexes=(1, 3), window_size=8,
             neck_chans=32), 256, 1024),
    "swin_tiny_patch4_window7_224": (
        dict(img_size=128, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4), 128, 224),
}


def import_timm():
    """``import timm`` (with the torchvision stub around the import when no real torchvision works)."""
    require("timm", "timm:*", import_it=False)
    return import_with_torchvision("timm")


def set_fused_attn(model: torch.nn.Module, fused: bool) -> int:
    """Set the ``fused_attn`` attribute of every timm attention module; returns how many were set.

    ``True``: ``F.scaled_dot_product_attention``; ``False``: timm's hand-written
    ``(q * scale) @ k.transpose(-2, -1)``, ``softmax``, ``@ v`` path. (``timm.layers.set_fused_attn``
    only changes the default for modules created afterwards.)
    """
    n = 0
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = bool(fused)
            n += 1
    return n


def build(model_name: str, *, small: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0,
          batch_size: int = 1, nonzero_init: bool = True, fused_attn: bool | None = None, **overrides):
    """A timm model with random weights and an image batch for it.

    ``overrides`` are ``timm.create_model`` keyword arguments (``img_size=...``, ``depth=...``);
    ``fused_attn``: ``None`` keeps timm's default (fused where torch has SDPA), ``True``/``False``
    force it on every attention module.
    """
    timm = import_timm()
    if model_name in SPECS:
        small_kwargs, small_size, full_size = SPECS[model_name]
        kwargs = dict(small_kwargs) if small else {}
        size = small_size if small else full_size
    else:
        kwargs, size = {}, None
    kwargs.update(overrides)
    with seeded(seed):
        model = timm.create_model(model_name, pretrained=False, **kwargs)
        if size is None or "img_size" in overrides:
            size = _input_size(model, overrides.get("img_size"))
        x = images(batch_size, size)
    if fused_attn is not None:
        set_fused_attn(model, fused_attn)
    with seeded(seed + 1):
        return finish(model, (x,), dtype=dtype, nonzero_init=nonzero_init)


def _input_size(model, img_size):
    if img_size is not None:
        return img_size
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        return tuple(pe.img_size)
    return tuple(model.pretrained_cfg["input_size"][-2:])

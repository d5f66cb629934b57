"""Model zoo: real library models built from configs with random weights (nothing is downloaded).

    from gridattn_fx import zoo
    model, inputs = zoo.build("timm:samvit_base_patch16")               # small, seconds on a CPU
    model, inputs = zoo.build("timm:samvit_base_patch16", small=False)  # the real ViT-B at 1024x1024
    out = model(*inputs)

Every builder returns ``(model, example_inputs)``: the model in eval mode with seeded random
weights, and a tuple of positional inputs for ``model(*example_inputs)`` (what ``rewrite()`` and
``capture()`` take). Common keyword arguments:

- ``small=True``: tiny widths and depths, image token grids of at least 8x8, the same attention
  structure as the real model (windowed vs global blocks, cross-attention, prefix tokens);
  ``small=False``: the real model's config and input size (see ``docs/zoo.md``);
- ``dtype=torch.float32``: model and floating-point inputs are cast to it;
- ``seed=0``, ``batch_size=1``;
- ``nonzero_init=True``: parameters a library initialises to exactly zero (relative-position
  tables, adaLN-Zero, zero-init projections) are re-drawn from N(0, 0.02), so that every attention
  site affects the output;
- family options: ``fused_attn`` (timm: ``True``/``False`` sets every attention module's
  ``fused_attn``), ``attn_implementation`` (transformers: ``"eager"`` / ``"sdpa"``),
  ``attn_processor`` (diffusers: ``"classic"`` for ``AttnProcessor()``, ``"sdpa"``), ``batch_first``
  (``clip-mha``);
- any other keyword overrides a field of the model's config (``img_size=...``, ``depth=...``).

The model libraries are imported only when a builder runs; a missing one raises
``ModuleNotFoundError`` (``scripts/install_zoo.sh`` installs them). timm and segment_anything are
imported with a torchvision stand-in when no working torchvision is installed (see
``_torchvision_stub.py`` and ``docs/zoo.md``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

__all__ = ["ZooEntry", "ENTRIES", "build", "names", "library_available", "entry", "import_library"]


@dataclass(frozen=True)
class ZooEntry:
    name: str
    library: str            # top-level module that must be installed ("timm", "transformers", ...; "torch")
    description: str
    small: str              # the small config, in words
    full: str               # the full config, in words
    builder: Callable[..., tuple]


def _timm_entry(model_name):
    def b(**kw):
        from . import _timm as m
        return m.build(model_name, **kw)
    return b


def _hf_entry(entry_name):
    def b(**kw):
        from . import _transformers as m
        return m.build(entry_name, **kw)
    return b


def _diffusers_entry(entry_name):
    def b(**kw):
        from . import _diffusers as m
        return m.build(entry_name, **kw)
    return b


def _sam_vit_b(**kw):
    from . import _sam
    return _sam.build(**kw)


def _clip_mha(**kw):
    from . import clip_mha
    return clip_mha.build(**kw)


_E = ZooEntry
ENTRIES: dict[str, ZooEntry] = {e.name: e for e in [
    _E("timm:vit_base_patch16_224", "timm", "timm ViT-B/16 (cls token)",
       "128px, 8x8 tokens + cls, dim 64, depth 2, 2 heads", "224px, 14x14 + cls, ViT-B/16", _timm_entry("vit_base_patch16_224")),
    _E("timm:deit_base_distilled_patch16_224", "timm", "timm DeiT-B distilled (cls + dist tokens)",
       "128px, 8x8 + 2 prefix, dim 64, depth 2, 2 heads", "224px, 14x14 + 2, DeiT-B",
       _timm_entry("deit_base_distilled_patch16_224")),
    _E("timm:vit_small_patch14_reg4_dinov2", "timm", "timm DINOv2 ViT-S/14 with 4 registers",
       "112px, 8x8 + 5 prefix, dim 64, depth 2, 2 heads", "518px, 37x37 + 5, ViT-S/14",
       _timm_entry("vit_small_patch14_reg4_dinov2")),
    _E("timm:eva02_tiny_patch14_224", "timm", "timm EVA02-Ti/14 (RoPE on patch tokens, SwiGLU)",
       "112px, 8x8 + cls, dim 64, depth 2, 2 heads", "224px, 16x16 + cls, EVA02-Ti",
       _timm_entry("eva02_tiny_patch14_224")),
    _E("timm:samvit_base_patch16", "timm", "timm SAM ViT-B (windowed + global blocks, decomposed rel-pos bias)",
       "256px, 16x16 tokens, dim 64, depth 4, global blocks 1,3, window 8",
       "1024px, 64x64 tokens, ViT-B, global blocks 2,5,8,11, window 14", _timm_entry("samvit_base_patch16")),
    _E("timm:swin_tiny_patch4_window7_224", "timm", "timm Swin-T (shifted windows only)",
       "128px, 32x32 tokens at stage 1, dim 32, depths 2,2,2,2, window 4",
       "224px, 56x56 at stage 1, Swin-T, window 7", _timm_entry("swin_tiny_patch4_window7_224")),
    _E("transformers:vit", "transformers", "HF ViTModel (cls token)",
       "128px, 8x8 + cls, dim 64, 2 layers, 2 heads", "ViTConfig() = vit-base-patch16-224", _hf_entry("vit")),
    _E("transformers:dinov2-registers", "transformers", "HF Dinov2WithRegistersModel (cls + 4 registers)",
       "112px, 8x8 + 5 prefix, dim 64, 2 layers", "518px, 37x37 + 5, dinov2-with-registers-base",
       _hf_entry("dinov2-registers")),
    _E("transformers:sam-vision", "transformers", "HF SamVisionModel (windowed + global, rel-pos bias)",
       "256px, 16x16 tokens, dim 64, 4 layers, global 1,3, window 8",
       "SamVisionConfig() = sam-vit-base encoder, 1024px, 64x64 tokens", _hf_entry("sam-vision")),
    _E("transformers:sam", "transformers", "HF SamModel (encoder + prompt encoder + two-way mask decoder)",
       "encoder as sam-vision small, decoder width 32, 2 points", "sam-vit-base, 1024px, 2 points", _hf_entry("sam")),
    _E("transformers:segformer", "transformers", "HF SegformerForSemanticSegmentation (spatially reduced keys)",
       "128px, stages 32x32/16x16/8x8/4x4, widths 16-128, depth 1 each, sr 8,4,2,1",
       "SegformerConfig() = mit-b0, 512px, 150 classes", _hf_entry("segformer")),
    _E("transformers:clip-text", "transformers", "HF CLIPTextModel (causal text self-attention)",
       "77 tokens, dim 64, 2 layers, vocab 1000", "CLIPTextConfig() = clip-vit-base-patch32 text, 77 tokens",
       _hf_entry("clip-text")),
    _E("diffusers:unet-sd21", "diffusers", "diffusers UNet2DConditionModel, SD-2.1 config (self + cross attention)",
       "32x32 latents, channels 32,64,64, attention at 32x32, 16x16 (down/up) and 8x8 (mid), text 77x32",
       "SD-2.1: 96x96 latents (768px), channels 320-1280, text 77x1024", _diffusers_entry("unet-sd21")),
    _E("diffusers:dit", "diffusers", "diffusers DiTTransformer2DModel (adaLN-Zero, class conditioned)",
       "16x16 latents, patch 2: 8x8 tokens, 2 layers, 2 heads x 16", "DiT-XL/2-256: 32x32 latents, 16x16 tokens",
       _diffusers_entry("dit")),
    _E("diffusers:pixart", "diffusers", "diffusers PixArtTransformer2DModel (self + cross attention to captions)",
       "16x16 latents: 8x8 tokens, 2 layers, 120 caption tokens x 32", "PixArt-XL-2-1024: 128x128 latents, 64x64 tokens",
       _diffusers_entry("pixart")),
    _E("diffusers:flux", "diffusers", "diffusers FluxTransformer2DModel (joint text+image attention, RoPE; "
       "tokens packed by the pipeline, img_ids hold their rows/columns)",
       "16x16 image tokens of 16 channels + 8 text tokens x 32, 1 double + 1 single block, 2 heads x 16",
       "FLUX.1-dev: 64x64 image tokens (1024px), 512 text tokens x 4096, 19 + 38 blocks", _diffusers_entry("flux")),
    _E("diffusers:autoencoder-kl", "diffusers", "diffusers AutoencoderKL (single-head mid-block attention)",
       "32px, channels 32,64: mid attention at 16x16 in encoder and decoder",
       "SD-2.1 VAE: 768px, mid attention at 96x96", _diffusers_entry("autoencoder-kl")),
    _E("diffusers:wan", "diffusers", "diffusers WanTransformer3DModel, Wan2.1 T2V (Conv3d patches, video "
       "self-attention with 3-D RoPE, cross-attention to text)",
       "4x16x16 latents, patch (1, 2, 2): 4x8x8 tokens, 2 layers, 2 heads x 24, text 8x32",
       "Wan2.1-T2V-1.3B: 21x60x104 latents (480x832, 81 frames), 21x30x52 tokens, text 512x4096",
       _diffusers_entry("wan")),
    _E("diffusers:cogvideox", "diffusers", "diffusers CogVideoXTransformer3DModel (frames folded into the batch for "
       "the patch embedding, joint attention over [text, video])",
       "4 latent frames of 16x16, patch 2: 4x8x8 tokens, 2 layers, 2 heads x 16, text 8x32",
       "CogVideoX-2b: 13x60x90 latents (480x720, 49 frames), 13x30x45 tokens, text 226x4096",
       _diffusers_entry("cogvideox")),
    _E("diffusers:ltx-video", "diffusers", "diffusers LTXVideoTransformer3DModel (tokens packed by the pipeline; "
       "video self-attention with 3-D RoPE, cross-attention to text)",
       "4x8x8 packed tokens of 16 channels, 2 layers, 2 heads x 16, text 8x32",
       "LTX-Video 0.9: 16x16x24 tokens of 128 channels (768x512, 121 frames), text 128x4096",
       _diffusers_entry("ltx-video")),
    _E("diffusers:hunyuan-video", "diffusers", "diffusers HunyuanVideoTransformer3DModel (dual-stream joint "
       "attention [video, text], then single-stream blocks)",
       "4x16x16 latents, patch 2: 4x8x8 tokens, 1 dual + 1 single block, 2 heads x 16, text 8x32",
       "HunyuanVideo: 33x90x160 latents (720x1280, 129 frames), 33x45x80 tokens, 20 + 40 blocks",
       _diffusers_entry("hunyuan-video")),
    _E("sam:vit_b", "segment_anything", "official segment_anything ImageEncoderViT (ViT-B)",
       "256px, 16x16 tokens, dim 64, depth 4, global 1,3, window 8",
       "build_sam_vit_b encoder: 1024px, 64x64 tokens", _sam_vit_b),
    _E("clip-mha", "torch", "CLIP-style vision tower with nn.MultiheadAttention (plain torch)",
       "128px, 8x8 + cls, width 64, 2 layers, 2 heads", "ViT-B/16: 224px, 14x14 + cls", _clip_mha),
]}


def names() -> list[str]:
    """All registered model names."""
    return list(ENTRIES)


def entry(name: str) -> ZooEntry:
    try:
        return ENTRIES[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ENTRIES)}") from None


def library_available(name: str) -> bool:
    """Whether the library a zoo entry needs is installed (without importing it)."""
    return importlib.util.find_spec(entry(name).library) is not None


def build(name: str, **overrides):
    """Build the named model: ``(model, example_inputs)``. See the module docstring for options.

    ``timm:<name>`` also accepts any timm model name that is not registered here; such a model is
    built with timm's own (full) config whatever ``small`` says, and ``img_size=...`` sets its input.
    """
    if name not in ENTRIES and name.startswith("timm:"):
        return _timm_entry(name[len("timm:"):])(**overrides)
    return entry(name).builder(**overrides)


def import_library(module_name: str):
    """``import module_name`` (timm, segment_anything) where torchvision may not import: a CPU-only
    torch with PyPI's CUDA torchvision wheel gets the zoo's stand-in for the import (docs/zoo.md)."""
    from ._torchvision_stub import import_with_torchvision

    return import_with_torchvision(module_name)


"""Hugging Face transformers builders (``transformers:<entry>``): ``Model(Config(...))``, random weights."""

from __future__ import annotations

import torch

from ._common import finish, images, require, seeded


def _vit(t, small):
    if small:
        cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                   image_size=128, patch_size=16)
    else:
        cfg = {}  # ViTConfig() is google/vit-base-patch16-224
    return t.ViTConfig, t.ViTModel, cfg, "image_size"


def _dinov2_registers(t, small):
    if small:
        cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=112, patch_size=14,
                   num_register_tokens=4)
    else:  # facebook/dinov2-with-registers-base
        cfg = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=518, patch_size=14,
                   num_register_tokens=4)
    return t.Dinov2WithRegistersConfig, t.Dinov2WithRegistersModel, cfg, "image_size"


_SAM_VISION_SMALL = dict(hidden_size=64, output_channels=32, num_hidden_layers=4, num_attention_heads=2,
                         image_size=256, patch_size=16, window_size=8, global_attn_indexes=[1, 3], mlp_dim=128,
                         num_pos_feats=16)  # the prompt/image positional embedding width is 2 * num_pos_feats


def _sam_vision(t, small):
    # SamVisionConfig() is facebook/sam-vit-base's encoder. Its initializer_range is 1e-10 (weights
    # are always loaded); 0.02 gives random weights whose attention is not trivially uniform.
    cfg = dict(_SAM_VISION_SMALL if small else {}, initializer_range=0.02)
    return t.SamVisionConfig, t.SamVisionModel, cfg, "image_size"


def _segformer(t, small):
    if small:  # the mit-b0 structure, narrower and one block per stage
        cfg = dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 4, 8],
                   sr_ratios=[8, 4, 2, 1], decoder_hidden_size=64, num_labels=8, image_size=128)
    else:  # SegformerConfig() is nvidia/mit-b0; 150 ADE20k classes at 512x512
        cfg = dict(num_labels=150, image_size=512)
    return t.SegformerConfig, t.SegformerForSemanticSegmentation, cfg, "image_size"


def _clip_text(t, small):
    if small:
        cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   vocab_size=1000, max_position_embeddings=77, projection_dim=32, bos_token_id=998, eos_token_id=999,
                   pad_token_id=1)
    else:  # CLIPTextConfig() is openai/clip-vit-base-patch32's text tower
        cfg = {}
    return t.CLIPTextConfig, t.CLIPTextModel, cfg, None


ENTRIES = {
    "vit": _vit,
    "dinov2-registers": _dinov2_registers,
    "sam-vision": _sam_vision,
    "segformer": _segformer,
    "clip-text": _clip_text,
}


def build(entry: str, *, small: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0, batch_size: int = 1,
          nonzero_init: bool = True, attn_implementation: str | None = None, **overrides):
    """``overrides`` are config fields; ``attn_implementation``: ``None`` (library default, ``"sdpa"``
    on torch 2.13), ``"eager"`` or ``"sdpa"``."""
    t = require("transformers", f"transformers:{entry}")
    if entry == "sam":
        return _build_sam(t, small=small, dtype=dtype, seed=seed, batch_size=batch_size, nonzero_init=nonzero_init,
                          attn_implementation=attn_implementation, **overrides)
    config_cls, model_cls, cfg, size_key = ENTRIES[entry](t, small)
    cfg = dict(cfg, **overrides)
    if attn_implementation is not None:
        cfg["attn_implementation"] = attn_implementation
    config = config_cls(**cfg)
    with seeded(seed):
        model = model_cls(config)
        if size_key is None:  # text: token ids
            inputs = (torch.randint(0, config.vocab_size, (batch_size, config.max_position_embeddings)),)
        else:
            inputs = (images(batch_size, getattr(config, size_key)),)
    if entry == "segformer":
        install_output_capturing_hooks(model.segformer)
    with seeded(seed + 1):
        return finish(model, inputs, dtype=dtype, nonzero_init=nonzero_init)


def install_output_capturing_hooks(model) -> None:
    """Install transformers' output-capturing hooks on ``model`` now, outside any graph capture.

    A ``@capture_outputs`` forward that is asked for hidden states (``SegformerModel`` is, by the
    segmentation head: ``output_hidden_states=True``) installs forward hooks on its first call,
    inside ``with threading.Lock():``, which Dynamo cannot trace (``Unsupported context manager``),
    so a full-graph capture of a fresh model fails. After this call that branch is skipped. Only for
    such models: installing the hooks on a model that never asks for outputs makes every hooked
    layer call ``ContextVar.get``, which Dynamo cannot trace either (``torch.compile`` without
    ``fullgraph`` would just break the graph in both cases).
    """
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # another transformers version: nothing to do
        return
    maybe_install_capturing_hooks(model)


def _build_sam(t, *, small, dtype, seed, batch_size, nonzero_init, attn_implementation, vision_config=None,
               prompt_encoder_config=None, mask_decoder_config=None, num_points: int = 2, **overrides):
    """SamModel: vision encoder + prompt encoder + mask decoder, called with ``(pixel_values,
    input_points, input_labels)``. ``vision_config`` / ``prompt_encoder_config`` /
    ``mask_decoder_config`` are dicts of overrides for the sub-configs."""
    vision = dict(_SAM_VISION_SMALL if small else {}, initializer_range=0.02, **(vision_config or {}))
    vcfg = t.SamVisionConfig(**vision)
    prompt = dict(hidden_size=vcfg.output_channels, image_size=vcfg.image_size, patch_size=vcfg.patch_size,
                  image_embedding_size=vcfg.image_size // vcfg.patch_size)
    decoder = dict(hidden_size=vcfg.output_channels)
    if small:
        decoder.update(mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32)
    prompt.update(prompt_encoder_config or {})
    decoder.update(mask_decoder_config or {})
    cfg = dict(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder,
               initializer_range=0.02, **overrides)
    if attn_implementation is not None:
        cfg["attn_implementation"] = attn_implementation
    config = t.SamConfig(**cfg)
    with seeded(seed):
        model = t.SamModel(config)
        size = config.vision_config.image_size
        x = images(batch_size, size)
        points = torch.rand(batch_size, 1, num_points, 2) * size
        labels = torch.ones(batch_size, 1, num_points, dtype=torch.long)
    with seeded(seed + 1):
        return finish(model, (x, points, labels), dtype=dtype, nonzero_init=nonzero_init)

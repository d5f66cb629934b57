"""Named option bundles for the model families of the Grid-Attention paper.

A preset is plain data: the options it sets. ``options={"preset": "sd-unet", "stride": 4}`` applies
the preset first, then the explicit options on top; the report marks every decision that a
preset's value made (``(preset 'sd-unet')``).
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "sam": {
        "description": "Segment Anything image encoders: the global-attention blocks, stride 2 "
                       "(a windowed block's tokens are one window, not the image: the window partition "
                       "reshape splits the image axes)",
        "options": {"stride": 2, "min_image_tokens": 1024},
    },
    "sd-unet": {
        "description": "Stable Diffusion UNets: self-attention (attn1) in the down blocks and the mid "
                       "block, stride 2; the authors found the up blocks sensitive",
        "options": {"stride": 2, "min_image_tokens": 0,
                    "include": [r"(^|\.)(down_blocks|mid_block)\..*\.attn1$"]},
    },
    "segformer": {
        "description": "SegFormer: every stage's efficient self-attention (keys on the reduced grid), stride 2",
        "options": {"stride": 2, "min_image_tokens": 0},
    },
    "vit": {
        "description": "plain ViTs: every proven image self-attention with at least min_image_tokens "
                       "image tokens, stride 2",
        "options": {"stride": 2, "min_image_tokens": 1024},
    },
}


def preset_options(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"option 'preset' must be one of {sorted(PRESETS)}, got {name!r}")
    return dict(PRESETS[name]["options"])


def preset_for_model(name: str) -> str:
    """The preset for a zoo model name (``sam:vit_b``, ``timm:samvit_base_patch16``, ...)."""
    lowered = name.lower()
    if lowered.startswith("sam:") or "samvit" in lowered or lowered.startswith("transformers:sam"):
        return "sam"
    if lowered.startswith("diffusers:unet"):
        return "sd-unet"
    if "segformer" in lowered:
        return "segformer"
    return "vit"

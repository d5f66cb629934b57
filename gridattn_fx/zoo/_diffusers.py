"""diffusers builders (``diffusers:<entry>``): ``Model(**config)``, random weights."""

from __future__ import annotations

import torch

from ._common import finish, images, require, seeded

# stabilityai/stable-diffusion-2-1 unet/config.json (768x768 images, 96x96 latents, OpenCLIP-H text 1024).
UNET_SD21 = dict(
    sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
    norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0, center_input_sample=False,
    downsample_padding=1, mid_block_scale_factor=1, norm_eps=1e-5, upcast_attention=True,
)
# Same block structure with three levels: self + cross attention at 32x32 and 16x16 (down and up),
# a plain level at 8x8 and the mid block's attention at 8x8.
UNET_SD21_SMALL = dict(
    UNET_SD21, sample_size=32, layers_per_block=1, block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4, 4), cross_attention_dim=32,
)
UNET_TEXT_TOKENS = 77

# facebook/DiT-XL-2-256 transformer config (32x32 latents, patch 2: 16x16 tokens).
DIT = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
           sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
DIT_SMALL = dict(DIT, num_attention_heads=2, attention_head_dim=16, num_layers=2, sample_size=16)

# PixArt-alpha/PixArt-XL-2-1024-MS transformer config (128x128 latents: 64x64 tokens; T5 captions).
PIXART = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
              cross_attention_dim=1152, sample_size=128, patch_size=2, caption_channels=4096,
              norm_type="ada_norm_single", num_embeds_ada_norm=1000, use_additional_conditions=True)
PIXART_SMALL = dict(PIXART, num_attention_heads=2, attention_head_dim=16, num_layers=2, cross_attention_dim=32,
                    sample_size=16, caption_channels=32, use_additional_conditions=False)
PIXART_CAPTION_TOKENS = 120

# stabilityai/stable-diffusion-2-1 vae/config.json (768x768 images; mid-block attention at 96x96).
AUTOENCODER_KL = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, act_fn="silu", sample_size=768,
)
AUTOENCODER_KL_SMALL = dict(AUTOENCODER_KL, block_out_channels=(32, 64), layers_per_block=1,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            sample_size=32)

# black-forest-labs/FLUX.1-dev transformer config (1024px: 128x128 latents packed 2x2 into 64x64
# tokens of 64 channels; T5 text 512 x 4096, CLIP pooled 768). The pipeline packs the latents
# outside the model (``_pack_latents``): the model's ``hidden_states`` are tokens, ``img_ids`` hold
# each token's (0, row, col).
FLUX = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
FLUX_SMALL = dict(FLUX, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
FLUX_GRID = {True: (16, 16), False: (64, 64)}   # image tokens (latent size / 2)
FLUX_TEXT_TOKENS = {True: 8, False: 512}


# Video transformers. Latents are (batch, channels, frames, height, width) unless said otherwise;
# the small configs keep the real block structure (self-attention over all video tokens, cross or
# joint attention to text) with token grids of 4 frames x 8 x 8 after patching, 8 text tokens.
#
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer config (480x832, 81 frames: 21x60x104 latents,
# Conv3d patch (1, 2, 2): 21x30x52 tokens; umT5 text 512 x 4096). Self-attention over the video
# tokens (3-D RoPE), cross-attention to the text.
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
           text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_SMALL = dict(WAN, num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4, text_dim=32,
                 freq_dim=32, ffn_dim=64, num_layers=2)
# THUDM/CogVideoX-2b transformer config (480x720, 49 frames: 13x60x90 latents, patch 2 per frame:
# 13x30x45 tokens; T5 text 226 x 4096). Frames are folded into the batch for the patch embedding and
# merged into the sequence; joint attention over [text, video] (text first), 3-D sin-cos positions.
COGVIDEOX = dict(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
                 text_embed_dim=4096, num_layers=30, sample_width=90, sample_height=60, sample_frames=49,
                 patch_size=2, temporal_compression_ratio=4, max_text_seq_length=226)
COGVIDEOX_SMALL = dict(COGVIDEOX, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                       time_embed_dim=32, text_embed_dim=32, num_layers=2, sample_width=16, sample_height=16,
                       sample_frames=13, max_text_seq_length=8)   # 13 frames -> 4 latent frames
# Lightricks/LTX-Video transformer config (0.9: 768x512, 121 frames: 16x16x24 latents of 128
# channels, patch 1). The pipeline packs the latents into tokens outside the model (``_pack_latents``,
# frames slowest, then rows, columns); ``num_frames, height, width`` set the 3-D RoPE.
LTX = dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
           attention_head_dim=64, cross_attention_dim=2048, num_layers=28, caption_channels=4096)
LTX_SMALL = dict(LTX, in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16,
                 cross_attention_dim=32, num_layers=2, caption_channels=32)
LTX_ROPE_SCALE = (8 / 25, 32.0, 32.0)   # the pipeline's (temporal compression / frame rate, spatial, spatial)
# hunyuanvideo-community/HunyuanVideo transformer config (720x1280, 129 frames: 33x90x160 latents,
# patch (1, 2, 2)). Dual-stream blocks (video and text attend jointly, video first) then
# single-stream blocks over [video, text].
HUNYUAN_VIDEO = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
                     num_single_layers=40, num_refiner_layers=2, patch_size=2, patch_size_t=1,
                     text_embed_dim=4096, pooled_projection_dim=768, rope_axes_dim=(16, 56, 56))
HUNYUAN_VIDEO_SMALL = dict(HUNYUAN_VIDEO, in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                           num_layers=1, num_single_layers=1, num_refiner_layers=1, text_embed_dim=32,
                           pooled_projection_dim=32, rope_axes_dim=(4, 6, 6))
# Latent video sizes (frames, height, width) and text tokens: small -> 4x8x8 tokens after patching.
VIDEO_LATENTS = {"wan": {True: (4, 16, 16), False: (21, 60, 104)},
                 "cogvideox": {True: (4, 16, 16), False: (13, 60, 90)},
                 "ltx-video": {True: (4, 8, 8), False: (16, 16, 24)},
                 "hunyuan-video": {True: (4, 16, 16), False: (33, 90, 160)}}
VIDEO_TEXT_TOKENS = {"wan": {True: 8, False: 512}, "cogvideox": {True: 8, False: 226},
                     "ltx-video": {True: 8, False: 128}, "hunyuan-video": {True: 8, False: 256}}


def pack_ltx_latents(latents: torch.Tensor) -> torch.Tensor:
    """LTX-Video's packing with patch 1 (the pipeline's ``_pack_latents``): (B, C, F, H, W) ->
    (B, F*H*W, C), frames slowest, then rows, then columns."""
    return latents.flatten(2).transpose(1, 2)


def flux_ids(height: int, width: int) -> torch.Tensor:
    """Flux's ``img_ids`` for a height x width token grid in raster order: rows (0, r, c)."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def set_attn_processor(model, attn_processor):
    """``None``/``"default"``: keep the library default (``AttnProcessor2_0``, SDPA);
    ``"classic"``: ``AttnProcessor()`` (``baddbmm`` scores, ``softmax``, ``bmm``);
    ``"sdpa"``: ``AttnProcessor2_0()``; or a processor instance."""
    if attn_processor in (None, "default"):
        return model
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if attn_processor == "classic":
        attn_processor = AttnProcessor()
    elif attn_processor == "sdpa":
        attn_processor = AttnProcessor2_0()
    elif isinstance(attn_processor, str):
        raise ValueError(f"attn_processor must be None, 'default', 'classic', 'sdpa' or a processor, "
                         f"got {attn_processor!r}")
    model.set_attn_processor(attn_processor)
    return model


def build(entry: str, *, small: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0, batch_size: int = 1,
          nonzero_init: bool = True, attn_processor=None, **overrides):
    """``overrides`` are model constructor (config) arguments."""
    d = require("diffusers", f"diffusers:{entry}")
    b = batch_size
    with seeded(seed):
        if entry == "unet-sd21":
            cfg = dict(UNET_SD21_SMALL if small else UNET_SD21, **overrides)
            model = d.UNet2DConditionModel(**cfg)
            s = cfg["sample_size"]
            inputs = (torch.randn(b, cfg["in_channels"], s, s), torch.tensor([500] * b),
                      torch.randn(b, UNET_TEXT_TOKENS, cfg["cross_attention_dim"]))
        elif entry == "dit":
            cfg = dict(DIT_SMALL if small else DIT, **overrides)
            model = d.DiTTransformer2DModel(**cfg)
            s = cfg["sample_size"]
            inputs = (torch.randn(b, cfg["in_channels"], s, s), torch.tensor([500] * b),
                      torch.randint(0, cfg["num_embeds_ada_norm"], (b,)))
        elif entry == "pixart":
            cfg = dict(PIXART_SMALL if small else PIXART, **overrides)
            model = d.PixArtTransformer2DModel(**cfg)
            s = cfg["sample_size"]
            if cfg["use_additional_conditions"]:
                px = s * 8  # the VAE's factor
                added = {"resolution": torch.tensor([[px, px]] * b, dtype=torch.float32),
                         "aspect_ratio": torch.tensor([[1.0]] * b)}
            else:
                added = {"resolution": None, "aspect_ratio": None}
            inputs = (torch.randn(b, cfg["in_channels"], s, s),
                      torch.randn(b, PIXART_CAPTION_TOKENS, cfg["caption_channels"]),
                      torch.tensor([500] * b), added)
        elif entry == "flux":
            grid = overrides.pop("grid", FLUX_GRID[small])
            text = overrides.pop("text_tokens", FLUX_TEXT_TOKENS[small])
            cfg = dict(FLUX_SMALL if small else FLUX, **overrides)
            model = d.FluxTransformer2DModel(**cfg)
            h, w = grid
            # Positional, in forward's order: hidden_states, encoder_hidden_states, pooled_projections,
            # timestep, img_ids, txt_ids, guidance, joint_attention_kwargs, (controlnet x2), return_dict.
            inputs = (torch.randn(b, h * w, cfg["in_channels"]), torch.randn(b, text, cfg["joint_attention_dim"]),
                      torch.randn(b, cfg["pooled_projection_dim"]), torch.tensor([0.5] * b), flux_ids(h, w),
                      torch.zeros(text, 3), torch.tensor([3.5] * b) if cfg["guidance_embeds"] else None,
                      None, None, None, False)
        elif entry in VIDEO_LATENTS:
            model, inputs = _video(d, entry, small, b, overrides)
        elif entry == "autoencoder-kl":
            cfg = dict(AUTOENCODER_KL_SMALL if small else AUTOENCODER_KL, **overrides)
            model = d.AutoencoderKL(**cfg)
            inputs = (images(b, cfg["sample_size"], cfg["in_channels"]),)
        else:
            raise KeyError(entry)
    set_attn_processor(model, attn_processor)
    with seeded(seed + 1):
        return finish(model, inputs, dtype=dtype, nonzero_init=nonzero_init)


def _video(d, entry: str, small: bool, b: int, overrides: dict):
    """A video transformer and its positional inputs (``latents=(frames, height, width)`` and
    ``text_tokens=n`` override the input sizes; other overrides are constructor arguments)."""
    f, h, w = overrides.pop("latents", VIDEO_LATENTS[entry][small])
    text = overrides.pop("text_tokens", VIDEO_TEXT_TOKENS[entry][small])
    t = torch.tensor([500] * b)
    if entry == "wan":
        cfg = dict(WAN_SMALL if small else WAN, **overrides)
        model = d.WanTransformer3DModel(**cfg)
        # forward(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image, return_dict)
        return model, (torch.randn(b, cfg["in_channels"], f, h, w), t, torch.randn(b, text, cfg["text_dim"]),
                       None, False)
    if entry == "cogvideox":
        cfg = dict(COGVIDEOX_SMALL if small else COGVIDEOX, max_text_seq_length=text, **overrides)
        model = d.CogVideoXTransformer3DModel(**cfg)
        # Latents are (batch, frames, channels, height, width) here.
        # forward(hidden_states, encoder_hidden_states, timestep, timestep_cond, ofs, image_rotary_emb,
        #         attention_kwargs, return_dict)
        return model, (torch.randn(b, f, cfg["in_channels"], h, w), torch.randn(b, text, cfg["text_embed_dim"]),
                       t, None, None, None, None, False)
    if entry == "ltx-video":
        cfg = dict(LTX_SMALL if small else LTX, **overrides)
        model = d.LTXVideoTransformer3DModel(**cfg)
        latents = torch.randn(b, cfg["in_channels"], f, h, w)
        # forward(hidden_states, encoder_hidden_states, timestep, encoder_attention_mask, num_frames,
        #         height, width, rope_interpolation_scale, video_coords, attention_kwargs, return_dict)
        return model, (pack_ltx_latents(latents), torch.randn(b, text, cfg["caption_channels"]), t,
                       torch.ones(b, text, dtype=torch.long), f, h, w, LTX_ROPE_SCALE, None, None, False)
    if entry == "hunyuan-video":
        cfg = dict(HUNYUAN_VIDEO_SMALL if small else HUNYUAN_VIDEO, **overrides)
        model = d.HunyuanVideoTransformer3DModel(**cfg)
        # forward(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
        #         pooled_projections, guidance, attention_kwargs, return_dict)
        return model, (torch.randn(b, cfg["in_channels"], f, h, w), t, torch.randn(b, text, cfg["text_embed_dim"]),
                       torch.ones(b, text, dtype=torch.long), torch.randn(b, cfg["pooled_projection_dim"]),
                       torch.tensor([6000.0] * b), None, False)
    raise KeyError(entry)

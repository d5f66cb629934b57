"""diffusers' image and video transformer / UNet classes with tiny configs, for the coverage table
(tools/coverage.py): each builder returns ``(model, keyword inputs)`` with random weights, image
latents of 16 x 16 (8 x 8 tokens after 2 x 2 patches) and videos of 4 latent frames where the class
takes them. Heads 2 x 16 channels; text 8 tokens. Imported only by the coverage command.
"""

from __future__ import annotations

import torch

HEADS, HEAD_DIM, TEXT = 2, 16, 8
WIDTH = HEADS * HEAD_DIM


def _d():
    import diffusers

    return diffusers


def _r(*shape):
    return torch.randn(*shape)


def _t(value=500.0):
    return torch.tensor([value])


def _ids(h, w):
    from ._diffusers import flux_ids

    return flux_ids(h, w)


def _packed(c, h=8, w=8):
    """Latents packed by the pipeline: (1, h * w, c) tokens in raster order."""
    return _r(1, h * w, c)


# --- image transformers ----------------------------------------------------------------------

def dit():
    m = _d().DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                                   num_layers=1, sample_size=16, patch_size=2, num_embeds_ada_norm=10)
    return m, dict(hidden_states=_r(1, 4, 16, 16), timestep=_t(), class_labels=torch.tensor([1]))


def pixart():
    m = _d().PixArtTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                                      num_layers=1, sample_size=16, patch_size=2, cross_attention_dim=WIDTH,
                                      caption_channels=WIDTH, use_additional_conditions=False)
    return m, dict(hidden_states=_r(1, 4, 16, 16), encoder_hidden_states=_r(1, TEXT, WIDTH), timestep=_t(),
                   added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def transformer2d():
    m = _d().Transformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=32,
                                norm_num_groups=8, cross_attention_dim=WIDTH)
    return m, dict(hidden_states=_r(1, 32, 8, 8), encoder_hidden_states=_r(1, TEXT, WIDTH))


def sd3():
    m = _d().SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=HEAD_DIM,
                                   num_attention_heads=HEADS, joint_attention_dim=WIDTH, caption_projection_dim=WIDTH,
                                   pooled_projection_dim=WIDTH, out_channels=4, pos_embed_max_size=16)
    return m, dict(hidden_states=_r(1, 4, 16, 16), encoder_hidden_states=_r(1, TEXT, WIDTH),
                   pooled_projections=_r(1, WIDTH), timestep=_t())


def flux():
    m = _d().FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                    attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=WIDTH,
                                    pooled_projection_dim=WIDTH, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    return m, dict(hidden_states=_packed(16), encoder_hidden_states=_r(1, TEXT, WIDTH), pooled_projections=_r(1, WIDTH),
                   timestep=_t(0.5), img_ids=_ids(8, 8), txt_ids=torch.zeros(TEXT, 3), guidance=_t(3.5))


def chroma():
    m = _d().ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                      attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=WIDTH,
                                      axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
                                      approximator_hidden_dim=WIDTH, approximator_layers=1)
    return m, dict(hidden_states=_packed(16), encoder_hidden_states=_r(1, TEXT, WIDTH), timestep=_t(0.5),
                   img_ids=_ids(8, 8), txt_ids=torch.zeros(TEXT, 3))


def flux2():
    m = _d().Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                     attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=WIDTH,
                                     timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4))
    img = torch.cat([torch.zeros(64, 1), _ids(8, 8)[:, 1:], torch.zeros(64, 1)], dim=1)  # (t, h, w, l)
    txt = torch.cat([torch.zeros(TEXT, 3), torch.arange(TEXT, dtype=torch.float32)[:, None]], dim=1)
    return m, dict(hidden_states=_packed(16), encoder_hidden_states=_r(1, TEXT, WIDTH), timestep=_t(0.5),
                   img_ids=img[None], txt_ids=txt[None], guidance=_t(3.5))


def qwen_image():
    m = _d().QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                         attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                                         joint_attention_dim=WIDTH, axes_dims_rope=(4, 6, 6))
    return m, dict(hidden_states=_packed(16), encoder_hidden_states=_r(1, TEXT, WIDTH),
                   encoder_hidden_states_mask=torch.ones(1, TEXT), timestep=_t(0.5), img_shapes=[[(1, 8, 8)]])


def auraflow():
    m = _d().AuraFlowTransformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                        num_single_dit_layers=1, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                                        joint_attention_dim=WIDTH, caption_projection_dim=WIDTH, out_channels=4,
                                        pos_embed_max_size=64)
    return m, dict(hidden_states=_r(1, 4, 16, 16), encoder_hidden_states=_r(1, TEXT, WIDTH), timestep=_t())


def lumina2():
    m = _d().Lumina2Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, hidden_size=WIDTH, num_layers=1,
                                       num_refiner_layers=1, num_attention_heads=HEADS, num_kv_heads=HEADS,
                                       multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(64, 64, 64), cap_feat_dim=WIDTH)
    return m, dict(hidden_states=_r(1, 4, 16, 16), timestep=_t(0.5), encoder_hidden_states=_r(1, TEXT, WIDTH),
                   encoder_attention_mask=torch.ones(1, TEXT, dtype=torch.bool))


def cogview3plus():
    m = _d().CogView3PlusTransformer2DModel(patch_size=2, in_channels=4, num_layers=1, attention_head_dim=HEAD_DIM,
                                            num_attention_heads=HEADS, out_channels=4, text_embed_dim=WIDTH,
                                            time_embed_dim=WIDTH, condition_dim=8, pos_embed_max_size=32, sample_size=16)
    return m, dict(hidden_states=_r(1, 4, 16, 16), encoder_hidden_states=_r(1, TEXT, WIDTH), timestep=_t(),
                   original_size=_r(1, 2), target_size=_r(1, 2), crop_coords=_r(1, 2))


def cogview4():
    m = _d().CogView4Transformer2DModel(patch_size=2, in_channels=4, num_layers=1, attention_head_dim=HEAD_DIM,
                                        num_attention_heads=HEADS, out_channels=4, text_embed_dim=WIDTH,
                                        time_embed_dim=WIDTH, condition_dim=8, pos_embed_max_size=32, sample_size=16,
                                        rope_axes_dim=(8, 8))
    return m, dict(hidden_states=_r(1, 4, 16, 16), encoder_hidden_states=_r(1, TEXT, WIDTH), timestep=_t(),
                   original_size=_r(1, 2), target_size=_r(1, 2), crop_coords=_r(1, 2))


def hidream():
    m = _d().HiDreamImageTransformer2DModel(patch_size=2, in_channels=4, num_layers=1, num_single_layers=1,
                                            attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                                            caption_channels=[WIDTH, WIDTH], text_emb_dim=WIDTH, num_routed_experts=2,
                                            num_activated_experts=1, axes_dims_rope=(4, 6, 6), max_resolution=(16, 16),
                                            llama_layers=[0, 1])
    return m, dict(hidden_states=_r(1, 4, 16, 16), timesteps=_t(), encoder_hidden_states_t5=_r(1, TEXT, WIDTH),
                   encoder_hidden_states_llama3=_r(2, 1, TEXT, WIDTH), pooled_embeds=_r(1, WIDTH))


def hunyuan_dit():
    m = _d().HunyuanDiT2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, patch_size=2,
                               sample_size=16, hidden_size=WIDTH, num_layers=2, cross_attention_dim=WIDTH,
                               cross_attention_dim_t5=WIDTH, pooled_projection_dim=WIDTH, text_len=TEXT, text_len_t5=TEXT,
                               use_style_cond_and_image_meta_size=False)
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    rope = get_2d_rotary_pos_embed(HEAD_DIM, ((0, 0), (8, 8)), (8, 8))
    return m, dict(hidden_states=_r(1, 4, 16, 16), timestep=_t(), encoder_hidden_states=_r(1, TEXT, WIDTH),
                   text_embedding_mask=torch.ones(1, TEXT), encoder_hidden_states_t5=_r(1, TEXT, WIDTH),
                   text_embedding_mask_t5=torch.ones(1, TEXT), image_rotary_emb=rope)


def hunyuan_image():
    m = _d().HunyuanImageTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=HEADS,
                                            attention_head_dim=HEAD_DIM, num_layers=1, num_single_layers=1,
                                            num_refiner_layers=1, patch_size=(2, 2), text_embed_dim=WIDTH,
                                            rope_axes_dim=(8, 8))
    return m, dict(hidden_states=_r(1, 4, 16, 16), timestep=_t(), encoder_hidden_states=_r(1, TEXT, WIDTH),
                   encoder_attention_mask=torch.ones(1, TEXT))


def omnigen():
    m = _d().OmniGenTransformer2DModel(in_channels=4, patch_size=2, hidden_size=WIDTH, num_attention_heads=HEADS,
                                       num_key_value_heads=HEADS, intermediate_size=64, num_layers=1, vocab_size=64,
                                       pad_token_id=0, max_position_embeddings=256, original_max_position_embeddings=256,
                                       pos_embed_max_size=16, time_step_dim=32,
                                       rope_scaling={"short_factor": [1.0] * (HEAD_DIM // 2),
                                                     "long_factor": [1.0] * (HEAD_DIM // 2)})
    n = TEXT + 1 + 64
    return m, dict(hidden_states=_r(1, 4, 16, 16), timestep=_t(0.5), input_ids=torch.randint(1, 64, (1, TEXT)),
                   input_img_latents=[], input_image_sizes={0: []}, attention_mask=torch.ones(1, n, n),
                   position_ids=torch.arange(n)[None])


def sana():
    m = _d().SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                    num_layers=1, num_cross_attention_heads=HEADS, cross_attention_head_dim=HEAD_DIM,
                                    cross_attention_dim=WIDTH, caption_channels=WIDTH, sample_size=16, patch_size=2)
    return m, dict(hidden_states=_r(1, 4, 16, 16), encoder_hidden_states=_r(1, TEXT, WIDTH), timestep=_t())


def stable_audio():
    m = _d().StableAudioDiTModel(sample_size=16, in_channels=4, num_layers=1, attention_head_dim=HEAD_DIM,
                                 num_attention_heads=HEADS, num_key_value_attention_heads=1, out_channels=4,
                                 cross_attention_dim=WIDTH, time_proj_dim=16, global_states_input_dim=WIDTH,
                                 cross_attention_input_dim=WIDTH)
    return m, dict(hidden_states=_r(1, 4, 16), timestep=_t(), encoder_hidden_states=_r(1, TEXT, WIDTH),
                   global_hidden_states=_r(1, 1, WIDTH))


# --- UNets ------------------------------------------------------------------------------------

def unet2d_condition():
    m = _d().UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                  block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=WIDTH,
                                  attention_head_dim=HEAD_DIM, norm_num_groups=8)
    return m, dict(sample=_r(1, 4, 16, 16), timestep=_t(), encoder_hidden_states=_r(1, TEXT, WIDTH))


def unet2d():
    m = _d().UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                         down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                         attention_head_dim=HEAD_DIM, norm_num_groups=8)
    return m, dict(sample=_r(1, 3, 16, 16), timestep=_t())


def unet3d_condition():
    m = _d().UNet3DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                  block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                  up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=WIDTH,
                                  attention_head_dim=HEAD_DIM, norm_num_groups=8)
    return m, dict(sample=_r(1, 4, 4, 16, 16), timestep=_t(), encoder_hidden_states=_r(1, TEXT, WIDTH))


def unet_spatio_temporal():
    m = _d().UNetSpatioTemporalConditionModel(
        sample_size=16, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), cross_attention_dim=WIDTH,
        num_attention_heads=(HEADS, HEADS), addition_time_embed_dim=8, projection_class_embeddings_input_dim=24)
    return m, dict(sample=_r(1, 4, 8, 16, 16), timestep=_t(), encoder_hidden_states=_r(1, 1, WIDTH),
                   added_time_ids=_r(1, 3))


# --- video transformers -------------------------------------------------------------------------

def _zoo(name):
    def build():
        from . import build as zoo_build

        model, inputs = zoo_build(f"diffusers:{name}")
        return model, inputs
    return build


def mochi():
    m = _d().MochiTransformer3DModel(patch_size=2, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=1,
                                     pooled_projection_dim=WIDTH, in_channels=4, text_embed_dim=WIDTH, time_embed_dim=16,
                                     max_sequence_length=TEXT)
    return m, dict(hidden_states=_r(1, 4, 4, 16, 16), encoder_hidden_states=_r(1, TEXT, WIDTH), timestep=_t(),
                   encoder_attention_mask=torch.ones(1, TEXT, dtype=torch.bool))


def allegro():
    m = _d().AllegroTransformer3DModel(patch_size=2, patch_size_t=1, num_attention_heads=HEADS,
                                       attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4, num_layers=1,
                                       cross_attention_dim=WIDTH, sample_height=16, sample_width=16, sample_frames=4,
                                       caption_channels=WIDTH)
    return m, dict(hidden_states=_r(1, 4, 4, 16, 16), encoder_hidden_states=_r(1, TEXT, WIDTH), timestep=_t())


def latte():
    m = _d().LatteTransformer3DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                                     out_channels=4, num_layers=1, cross_attention_dim=WIDTH, sample_size=16, patch_size=2,
                                     num_embeds_ada_norm=1000, norm_type="ada_norm_single", caption_channels=WIDTH,
                                     video_length=4)
    return m, dict(hidden_states=_r(1, 4, 4, 16, 16), timestep=_t(), encoder_hidden_states=_r(1, TEXT, WIDTH))


def easyanimate():
    m = _d().EasyAnimateTransformer3DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                                           out_channels=4, time_embed_dim=16, text_embed_dim=WIDTH, num_layers=1,
                                           sample_width=16, sample_height=16, patch_size=2)
    return m, dict(hidden_states=_r(1, 4, 4, 16, 16), timestep=_t(), encoder_hidden_states=_r(1, TEXT, WIDTH))


def cosmos():
    m = _d().CosmosTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=HEADS,
                                      attention_head_dim=HEAD_DIM, num_layers=1, text_embed_dim=WIDTH,
                                      adaln_lora_dim=16, max_size=(8, 32, 32), patch_size=(1, 2, 2),
                                      concat_padding_mask=False, extra_pos_embed_type=None)
    return m, dict(hidden_states=_r(1, 4, 4, 16, 16), timestep=_t(), encoder_hidden_states=_r(1, TEXT, WIDTH))


def consisid():
    m = _d().ConsisIDTransformer3DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                                        out_channels=4, time_embed_dim=16, text_embed_dim=WIDTH, num_layers=1,
                                        sample_width=16, sample_height=16, sample_frames=13, patch_size=2,
                                        max_text_seq_length=TEXT, is_train_face=False)
    return m, dict(hidden_states=_r(1, 4, 4, 16, 16), encoder_hidden_states=_r(1, TEXT, WIDTH), timestep=_t())


def skyreels_v2():
    m = _d().SkyReelsV2Transformer3DModel(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                          in_channels=4, out_channels=4, text_dim=WIDTH, freq_dim=16, ffn_dim=64,
                                          num_layers=1, rope_max_seq_len=64)
    return m, dict(hidden_states=_r(1, 4, 4, 16, 16), timestep=_t(), encoder_hidden_states=_r(1, TEXT, WIDTH))


def wan_vace():
    m = _d().WanVACETransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                       in_channels=4, out_channels=4, text_dim=WIDTH, freq_dim=16, ffn_dim=64, num_layers=2,
                                       rope_max_seq_len=64, vace_layers=[0], vace_in_channels=8)
    return m, dict(hidden_states=_r(1, 4, 4, 16, 16), timestep=_t(), encoder_hidden_states=_r(1, TEXT, WIDTH),
                   control_hidden_states=_r(1, 8, 4, 16, 16))


# class name -> builder. ``_zoo`` entries reuse the zoo's small configs (gridattn_fx/zoo/_diffusers.py).
CLASSES = {
    "DiTTransformer2DModel": dit,
    "PixArtTransformer2DModel": pixart,
    "Transformer2DModel": transformer2d,
    "SD3Transformer2DModel": sd3,
    "FluxTransformer2DModel": flux,
    "ChromaTransformer2DModel": chroma,
    "Flux2Transformer2DModel": flux2,
    "QwenImageTransformer2DModel": qwen_image,
    "AuraFlowTransformer2DModel": auraflow,
    "Lumina2Transformer2DModel": lumina2,
    "CogView3PlusTransformer2DModel": cogview3plus,
    "CogView4Transformer2DModel": cogview4,
    "HiDreamImageTransformer2DModel": hidream,
    "HunyuanDiT2DModel": hunyuan_dit,
    "HunyuanImageTransformer2DModel": hunyuan_image,
    "OmniGenTransformer2DModel": omnigen,
    "SanaTransformer2DModel": sana,
    "StableAudioDiTModel": stable_audio,
    "UNet2DConditionModel": unet2d_condition,
    "UNet2DModel": unet2d,
    "UNet3DConditionModel": unet3d_condition,
    "UNetSpatioTemporalConditionModel": unet_spatio_temporal,
    "WanTransformer3DModel": _zoo("wan"),
    "CogVideoXTransformer3DModel": _zoo("cogvideox"),
    "HunyuanVideoTransformer3DModel": _zoo("hunyuan-video"),
    "LTXVideoTransformer3DModel": _zoo("ltx-video"),
    "MochiTransformer3DModel": mochi,
    "AllegroTransformer3DModel": allegro,
    "LatteTransformer3DModel": latte,
    "EasyAnimateTransformer3DModel": easyanimate,
    "CosmosTransformer3DModel": cosmos,
    "ConsisIDTransformer3DModel": consisid,
    "SkyReelsV2Transformer3DModel": skyreels_v2,
    "WanVACETransformer3DModel": wan_vace,
}

# Classes dense by design: their self-attention is not softmax attention over an image grid.
BY_DESIGN = {
    "SanaTransformer2DModel": "linear (ReLU-kernel) self-attention: no softmax to restrict to a grid",
    "StableAudioDiTModel": "audio: a 1-D sequence of latent frames, no image",
}

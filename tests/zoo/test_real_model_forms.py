"""Attention forms of real library models (random weights from configs): every attention form they use is
found, the right sites are rewritten, the rest are skipped with a specific reason, and the grouped
rewrite equals the masked oracle form end to end (float64).
"""

import re

import pytest
import torch

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx import zoo  # noqa: E402
from zoo_required import missing_library  # noqa: E402


def _tensor(out):
    """The main tensor of a model output (HF ModelOutput, diffusers output, tuple, tensor)."""
    for attr in ("sample", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)
    if hasattr(out, "to_tuple"):  # other ModelOutputs: their first field
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        return _tensor(out[0])
    return out


def _build(name, **kw):
    if not zoo.library_available(name):
        missing_library(zoo.entry(name).library)  # fails unless GRIDATTN_SKIP_ZOO=1 (tests/zoo_required.py)
    return zoo.build(name, dtype=torch.float64, **kw)


# name, builder options, {module-path regex: (decision, form, reason words)}, tolerance
CASES = {
    "sam-official": ("sam:vit_b", {}, {
        r"blocks\.[13]\.attn$": ("rewritten", "manual-matmul+relpos", ""),
        r"blocks\.[02]\.attn$": ("skipped", "manual-matmul+relpos", "windows"),
    }),
    "timm-samvit-fused": ("timm:samvit_base_patch16", {"fused_attn": True}, {
        r"blocks\.[13]\.attn$": ("rewritten", "sdpa+relpos", ""),
        r"blocks\.[02]\.attn$": ("skipped", "sdpa+relpos", "windows"),
    }),
    "timm-samvit-manual": ("timm:samvit_base_patch16", {"fused_attn": False}, {
        r"blocks\.[13]\.attn$": ("rewritten", "manual-matmul+relpos", ""),
        r"blocks\.[02]\.attn$": ("skipped", "manual-matmul+relpos", "windows"),
    }),
    "timm-swin": ("timm:swin_tiny_patch4_window7_224", {}, {
        r"layers\.[012]\.blocks\.0\.attn$": ("skipped", "manual-matmul", "windows"),
        # shifted windows add their mask through a 5-D view of the scores: reported, not read
        r"layers\.[012]\.blocks\.1\.attn$": ("skipped", "manual", "reshape of the scores"),
        # the last stage's 4x4 tokens are one window (no shift): the window is the whole image in
        # raster order, proven through the window partition's reshapes
        r"layers\.3\.blocks\.[01]\.attn$": ("rewritten", "manual-matmul", "image self-attention"),
    }),
    "hf-vit-eager": ("transformers:vit", {"attn_implementation": "eager"}, {
        r"attention$": ("rewritten", "manual-matmul", ""),
    }),
    "hf-sam-vision-eager": ("transformers:sam-vision", {"attn_implementation": "eager"}, {
        r"layers\.[13]\.attn$": ("rewritten", "manual-matmul+relpos", ""),
        r"layers\.[02]\.attn$": ("skipped", "manual-matmul+relpos", "windows"),
    }),
    "hf-sam-vision-sdpa": ("transformers:sam-vision", {"attn_implementation": "sdpa"}, {
        r"layers\.[13]\.attn$": ("rewritten", "sdpa+relpos", ""),
        r"layers\.[02]\.attn$": ("skipped", "sdpa+relpos", "windows"),
    }),
    "diffusers-unet-classic": ("diffusers:unet-sd21", {"attn_processor": "classic"}, {
        r"attn1$": ("rewritten", "manual-baddbmm", ""),
        r"attn2$": ("skipped", "manual-baddbmm", "cross-attention"),
    }),
    "clip-mha": ("clip-mha", {}, {
        r"attn$": ("rewritten", "nn.MultiheadAttention", ""),
    }),
    # --- families with default attention implementations ---
    "timm-vit": ("timm:vit_base_patch16_224", {}, {r"attn$": ("rewritten", "sdpa", "")}),
    "timm-deit-distilled": ("timm:deit_base_distilled_patch16_224", {}, {r"attn$": ("rewritten", "sdpa", "")}),
    "timm-dinov2-reg4": ("timm:vit_small_patch14_reg4_dinov2", {}, {r"attn$": ("rewritten", "sdpa", "")}),
    "timm-eva02-rope": ("timm:eva02_tiny_patch14_224", {}, {r"attn$": ("rewritten", "sdpa", "")}),
    "hf-vit-sdpa": ("transformers:vit", {"attn_implementation": "sdpa"}, {r"attention$": ("rewritten", "sdpa", "")}),
    "hf-dinov2-registers": ("transformers:dinov2-registers", {}, {r"attention$": ("rewritten", "sdpa", "")}),
    "hf-sam-model": ("transformers:sam", {}, {
        r"vision_encoder\.layers\.[13]\.attn$": ("rewritten", "sdpa+relpos", ""),
        r"vision_encoder\.layers\.[02]\.attn$": ("skipped", "sdpa+relpos", "windows"),
        # prompt tokens <-> image: token queries have no image layout, image queries attend to tokens
        r"mask_decoder\..*(self_attn|token_to_image)$": ("skipped", "sdpa", "no spatial source"),
        r"mask_decoder\..*image_to_token$": ("skipped", "sdpa", "cross-attention"),
    }),
    "hf-segformer": ("transformers:segformer", {}, {r"attention$": ("rewritten", "sdpa", "")}),
    "hf-clip-text": ("transformers:clip-text", {}, {r"self_attn$": ("skipped", "sdpa", "no spatial source")}),
    "diffusers-unet-sdpa": ("diffusers:unet-sd21", {}, {
        r"attn1$": ("rewritten", "sdpa", ""),
        r"attn2$": ("skipped", "sdpa", "cross-attention"),
    }),
    "diffusers-dit": ("diffusers:dit", {}, {r"attn1$": ("rewritten", "sdpa", "")}),
    "diffusers-pixart": ("diffusers:pixart", {}, {
        r"attn1$": ("rewritten", "sdpa", ""),
        r"attn2$": ("skipped", "sdpa", "cross-attention"),
    }),
    "diffusers-autoencoder-kl": ("diffusers:autoencoder-kl", {}, {r"attentions\.0$": ("rewritten", "sdpa", "")}),
}

# Prefix tokens the layout proof must find (cls, distillation, registers).
PREFIXES = {"timm-vit": 1, "timm-deit-distilled": 2, "timm-dinov2-reg4": 5, "timm-eva02-rope": 1,
            "hf-vit-sdpa": 1, "hf-dinov2-registers": 5, "clip-mha": 1}


@pytest.mark.parametrize("case", sorted(CASES))
def test_real_model_decisions_and_grouped_equals_masked(case):
    name, options, expected = CASES[case]
    model, inputs = _build(name, **options)
    gm, report = gridattn_fx.rewrite(model, inputs, stride=2, min_image_tokens=0)
    gm_masked, report_masked = gridattn_fx.rewrite(model, inputs, stride=2, min_image_tokens=0,
                                                   implementation="masked")
    assert report.failure is None, report.failure
    text = str(report)
    assert report.sites, text
    for site in report.sites:
        matches = [v for k, v in expected.items() if re.search(k, site.module_path)]
        assert len(matches) == 1, f"{site.module_path} matched {len(matches)} expectations\n{text}"
        decision, form, words = matches[0]
        assert (site.decision, site.form) == (decision, form), f"{site.module_path}\n{text}"
        assert words in site.reason, f"{site.module_path}: {site.reason!r} lacks {words!r}"
    assert [s.decision for s in report.sites] == [s.decision for s in report_masked.sites]
    if case in PREFIXES:
        assert {s.q_layout.prefix for s in report.rewritten} == {PREFIXES[case]}, text
    if case == "hf-segformer":  # keys live on the spatially reduced grid
        assert any(s.k_layout != s.q_layout for s in report.rewritten), text
    grouped, masked = _tensor(gm(*inputs)), _tensor(gm_masked(*inputs))
    # diffusers' upcast_attention computes q @ k^T in float32 on purpose: float32 agreement there
    tol = dict(atol=1e-6, rtol=1e-5) if case.startswith("diffusers") else dict(atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(grouped, masked, **tol)
    original = _tensor(model(*inputs))
    if report.rewritten:  # the grid restricts attention: the output must move (LayerScale
        assert not torch.equal(grouped, original)  # models such as DINOv2 move it only a little)
    else:  # nothing rewritten: the graph computes exactly what the model does
        assert torch.equal(grouped, original)


def test_diffusers_dispatcher_flex_backend_is_rewritten_like_sdpa():
    """diffusers' attention dispatcher with ``attention_backend="flex"`` (Wan's processors call
    ``dispatch_attention_fn``): the FlexAttention op without score_mod / block mask is rewritten
    (float32: FlexAttention refuses float64 on the CPU; rewrite(), since inductor itself cannot lower
    this graph's flex_attention on the CPU in torch 2.13: "not enough values to unpack")."""
    if not zoo.library_available("diffusers:wan"):
        missing_library("diffusers")
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    model, inputs = zoo.build("diffusers:wan", dtype=torch.float32)
    active = _AttentionBackendRegistry._active_backend
    model.set_attention_backend("flex")   # also sets diffusers' process-wide active backend
    try:
        with torch.no_grad():
            gm, report = gridattn_fx.rewrite(model, inputs, stride=2, min_image_tokens=0)
            gm_masked, _ = gridattn_fx.rewrite(model, inputs, stride=2, min_image_tokens=0, implementation="masked")
            grouped, masked, original = _tensor(gm(*inputs)), _tensor(gm_masked(*inputs)), _tensor(model(*inputs))
    finally:
        model.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(active)
    decisions = {s.module_path: (s.form, s.decision) for s in report.sites}
    assert decisions == {f"blocks.{i}.attn{j}": ("flex", "rewritten" if j == 1 else "skipped")
                         for i in (0, 1) for j in (1, 2)}, str(report)
    torch.testing.assert_close(grouped, masked, atol=2e-5, rtol=2e-5)
    assert not torch.allclose(grouped, original, atol=1e-4)


def _grouped_masked(model, inputs):
    with torch.no_grad():
        gm, report = gridattn_fx.rewrite(model, inputs, stride=2, min_image_tokens=0)
        gm_masked, _ = gridattn_fx.rewrite(model, inputs, stride=2, min_image_tokens=0, implementation="masked")
        return report, _tensor(gm(*inputs)), _tensor(gm_masked(*inputs)), _tensor(model(*inputs))


@pytest.mark.parametrize("attention_type", ["divided_space_time", "joint_space_time"])
def test_transformers_timesformer_space_time_attention(attention_type):
    """Frames folded into the batch for the patch embedding, merged back *behind* each position for
    the temporal half: the spatial half (each frame an image) and joint attention (a 4 x 8 x 8 video
    stored time-fastest) are rewritten; the temporal half is temporal attention, not an image."""
    if not zoo.library_available("transformers:vit"):
        missing_library("transformers")
    import transformers as t

    config = t.TimesformerConfig(image_size=32, patch_size=4, num_frames=4, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64, attention_type=attention_type)
    torch.manual_seed(0)
    model = t.TimesformerModel(config).eval().double()
    inputs = (torch.randn(1, 4, 3, 32, 32, dtype=torch.float64),)
    report, grouped, masked, original = _grouped_masked(model, inputs)
    rows = {s.module_path.split(".", 3)[-1]: s for s in report.sites}
    spatial = rows["attention.attention"]
    assert spatial.decision == "rewritten", str(report)
    if attention_type == "joint_space_time":
        assert spatial.q_layout.image_shape == (4, 8, 8) and spatial.q_layout.order == (1, 2, 0), str(report)
    else:
        assert spatial.q_layout.image_shape == (8, 8), str(report)
        temporal = rows["temporal_attention.attention"]
        assert temporal.decision == "skipped" and "temporal attention" in temporal.reason, str(report)
    torch.testing.assert_close(grouped, masked, atol=1e-10, rtol=1e-9)
    assert not torch.allclose(grouped, original)


@pytest.mark.parametrize("name", ["AuraFlowTransformer2DModel", "CogView3PlusTransformer2DModel",
                                  "CogView4Transformer2DModel"])
def test_diffusers_patchify_without_a_convolution(name):
    """The latents cut into patches by view/permute, then a Linear: the input's own H and W prove the
    layout (AuraFlow: 8 register tokens + the text in front of the image in its joint blocks;
    CogView4 then writes its rotary embedding into the image part of q and k in place)."""
    if not zoo.library_available("diffusers:dit"):
        missing_library("diffusers")
    import diffusers

    torch.manual_seed(0)
    if name.startswith("AuraFlow"):
        model = diffusers.AuraFlowTransformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
            out_channels=4, pos_embed_max_size=64)
        inputs = (torch.randn(1, 4, 16, 16), torch.randn(1, 8, 32), torch.tensor([500.0]))
    elif name.startswith("CogView4"):
        model = diffusers.CogView4Transformer2DModel(
            patch_size=2, in_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2, out_channels=4,
            text_embed_dim=32, time_embed_dim=32, condition_dim=8, pos_embed_max_size=32, sample_size=16,
            rope_axes_dim=(8, 8))
        inputs = (torch.randn(1, 4, 16, 16), torch.randn(1, 8, 32), torch.tensor([500.0]), torch.randn(1, 2),
                  torch.randn(1, 2), torch.randn(1, 2))
    else:
        model = diffusers.CogView3PlusTransformer2DModel(
            patch_size=2, in_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2, out_channels=4,
            text_embed_dim=32, time_embed_dim=32, condition_dim=8, pos_embed_max_size=32, sample_size=16)
        inputs = (torch.randn(1, 4, 16, 16), torch.randn(1, 8, 32), torch.tensor([500.0]), torch.randn(1, 2),
                  torch.randn(1, 2), torch.randn(1, 2))
    model = model.eval().double()
    inputs = tuple(x.double() for x in inputs)
    report, grouped, masked, original = _grouped_masked(model, inputs)
    assert report.sites and all(s.decision == "rewritten" for s in report.sites), str(report)
    assert all(s.q_layout.image_shape == (8, 8) and "model input" in s.evidence for s in report.sites), str(report)
    torch.testing.assert_close(grouped, masked, atol=1e-10, rtol=1e-9)
    assert not torch.allclose(grouped, original)


def test_diffusers_unet3d_spatial_attention_around_temporal_layers():
    """UNet3DConditionModel: frames folded into the batch for 2-D convs, temporal Conv3d layers and
    temporal transformers in between. Every spatial self-attention is rewritten, every temporal one
    says it is temporal attention, cross-attention keys are text."""
    if not zoo.library_available("diffusers:dit"):
        missing_library("diffusers")
    import diffusers

    torch.manual_seed(0)
    model = diffusers.UNet3DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval().double()
    inputs = (torch.randn(1, 4, 4, 16, 16, dtype=torch.float64), torch.tensor([500]),
              torch.randn(1, 8, 32, dtype=torch.float64))
    report, grouped, masked, original = _grouped_masked(model, inputs)
    for s in report.sites:
        temporal = "temp_attentions" in s.module_path or s.module_path.startswith("transformer_in")
        if temporal:
            assert s.decision == "skipped" and "temporal attention" in s.reason, s.reason
        elif s.module_path.endswith("attn1"):
            assert s.decision == "rewritten", s.reason
        else:
            assert s.decision == "skipped" and "cross-attention" in s.reason, s.reason
    assert len(report.rewritten) == 4, str(report)
    torch.testing.assert_close(grouped, masked, atol=1e-10, rtol=1e-9)
    assert not torch.allclose(grouped, original)


def test_diffusers_easyanimate_frames_flattened_in_front():
    """EasyAnimate embeds frames folded into the batch with a Conv2d, then flattens frames, rows and
    columns into one sequence: a 4 x 8 x 8 video behind 8 text tokens."""
    if not zoo.library_available("diffusers:dit"):
        missing_library("diffusers")
    import diffusers

    torch.manual_seed(0)
    model = diffusers.EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2, sample_width=16,
        sample_height=16, num_layers=1, mmdit_layers=1, time_embed_dim=32, text_embed_dim=32,
        enable_text_attention_mask=False).eval().double()
    inputs = (torch.randn(1, 4, 4, 16, 16, dtype=torch.float64), torch.tensor([500]), None,
              torch.randn(1, 8, 32, dtype=torch.float64))
    report, grouped, masked, original = _grouped_masked(model, inputs)
    (s,) = report.sites
    assert s.decision == "rewritten" and s.q_layout.prefix == 8 and s.q_layout.image_shape == (4, 8, 8), str(report)
    torch.testing.assert_close(grouped, masked, atol=1e-10, rtol=1e-9)
    assert not torch.allclose(grouped, original)

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

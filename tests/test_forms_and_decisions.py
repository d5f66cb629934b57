"""Attention forms that used to be missing from the report, and decisions that used to be silent.

Forms: a per-head tensor scale (Swin-V2's cosine attention with ``logit_scale``, XCiT's
temperature), channels-first ``v @ attn^T`` (timm CoAtNet/MaxxViT ``Attention2d``,
EfficientViT-MSRA), and softmaxes that look like attention but whose chain has no reading. Each
oracle path adds the independently built log grid mask to the model's own scores right before
its softmax (eager only), so the reference is the model's own arithmetic restricted by M.
"""

import math
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import ViT, build, image
from oracle import assert_close64, assert_differs, assert_equal_exact, oracle_mask

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx import GridAttnConfig, TokenLayout  # noqa: E402
from gridattn_fx.passes import pipeline  # noqa: E402

DIM, HEADS = 16, 2
HD = DIM // HEADS
OPTS = {"stride": 2, "min_image_tokens": 0}


class _Oracle(nn.Module):
    def __init__(self):
        super().__init__()
        self.oracle = None

    def _masked(self, scores):
        if self.oracle is None:
            return scores
        ql, kl, stride = self.oracle
        return scores + oracle_mask(None, ql, kl, stride, scores.dtype)


class CosineAttention(_Oracle):
    """Swin-V2-style cosine attention with a learned per-head logit scale, as global attention
    over a conv patch embedding (a proven layout; Swin-V2's own windows are not)."""

    def __init__(self, grid=(6, 8), bias=True, divide=False, logit_scale=True):
        super().__init__()
        self.divide, self.use_logit_scale = divide, logit_scale
        self.embed = nn.Conv2d(3, DIM, 2, 2)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.rand(HEADS, 1, 1) + 1))
        L = grid[0] * grid[1]
        self.table = nn.Parameter(torch.randn(HEADS, L, L)) if bias else None

    def forward(self, img):
        x = self.embed(img).flatten(2).transpose(1, 2)
        B, L, C = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, HEADS, HD).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        if self.use_logit_scale:
            logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
            attn = attn / (1 / logit_scale) if self.divide else attn * logit_scale
        else:
            attn = attn * 10.0
        if self.table is not None:
            attn = attn + self.table.unsqueeze(0)
        attn = self._masked(attn).softmax(dim=-1)
        o = attn @ v
        return self.proj(o.transpose(1, 2).reshape(B, L, C))


class ChannelAttention(_Oracle):
    """XCiT-style cross-covariance attention: q, k (B, h, d, N) normalized over the tokens, a
    per-head temperature, attention between channels."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, DIM, 2, 2)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.temperature = nn.Parameter(torch.rand(HEADS, 1, 1) + 0.5)

    def forward(self, img):
        x = self.embed(img).flatten(2).transpose(1, 2)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, HEADS, HD).permute(2, 0, 3, 4, 1).unbind(0)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature
        attn = attn.softmax(dim=-1)
        return (attn @ v).permute(0, 3, 1, 2).reshape(B, N, C)


class ChannelsFirstAttention(_Oracle):
    """timm CoAtNet/MaxxViT ``Attention2d`` (unfused): a 1x1 conv makes q, k, v of shape
    (B, h, d, N); ``attn = (q * scale)^T @ k``, a bias, ``out = v @ attn^T``.
    ``heads=False``: EfficientViT-MSRA's per-head form, (B, d, N) tensors without a head axis."""

    def __init__(self, heads=True, bias=True):
        super().__init__()
        self.heads = HEADS if heads else None
        self.stem = nn.Conv2d(3, DIM, 2, 2)
        self.qkv = nn.Conv2d(DIM, 3 * DIM, 1)
        self.proj = nn.Conv2d(DIM, DIM, 1)
        self.bias = bias
        self.scale = HD ** -0.5

    def forward(self, img):
        x = self.stem(img)
        B, C, H, W = x.shape
        if self.heads:
            q, k, v = self.qkv(x).view(B, self.heads, HD * 3, -1).chunk(3, dim=2)
        else:
            q, k, v = self.qkv(x).view(B, -1, H, W).split([DIM, DIM, DIM], dim=1)
            q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
        q = q * self.scale
        attn = q.transpose(-2, -1) @ k
        if self.bias:
            attn = attn + torch.arange(H * W, dtype=attn.dtype).div(H * W).unsqueeze(0).expand(H * W, -1)
        attn = self._masked(attn).softmax(dim=-1)
        out = (v @ attn.transpose(-2, -1)).view(B, -1, H, W)
        return self.proj(out)


def _rewrite_vs_oracle(model, img, layout, stride=2, **options):
    gm, report = gridattn_fx.rewrite(model, (img,), **{**OPTS, "stride": stride, **options})
    model.oracle = (layout, layout, stride)
    try:
        expected = model(img)
    finally:
        model.oracle = None
    out = gm(img)
    assert_close64(out, expected)
    assert_differs(out, model(img))
    return report


# --- item 6: forms ---------------------------------------------------------------------------------
@pytest.mark.parametrize("implementation", ["grouped", "masked"])
@pytest.mark.parametrize("bias,divide", [(True, False), (False, True)], ids=["scale+bias", "divided"])
def test_cosine_attention_with_a_per_head_logit_scale_is_rewritten_exactly(implementation, bias, divide):
    torch.manual_seed(0)
    model = CosineAttention(bias=bias, divide=divide).double().eval()
    report = _rewrite_vs_oracle(model, image(2, 12, 16), (0, 6, 8), implementation=implementation)
    (site,) = report.sites
    assert site.decision == "rewritten", str(report)
    assert "cosine" in site.form and "tensor-scale" in site.form
    assert site.q_layout == TokenLayout(0, 6, 8)


def test_cosine_attention_with_a_constant_scale_moves_its_regrouping():
    torch.manual_seed(0)
    model = CosineAttention(bias=False, logit_scale=False).double().eval()
    report = _rewrite_vs_oracle(model, image(2, 12, 16), (0, 6, 8))
    (site,) = report.sites
    assert site.decision == "rewritten" and site.form == "manual-matmul+cosine", str(report)
    assert "cluster at" in site.regrouping, str(report)  # normalize runs on the regrouped q and k


def test_cosine_attention_at_a_non_divisible_grid_and_stride_2x4():
    torch.manual_seed(0)
    model = CosineAttention(grid=(5, 7)).double().eval()
    report = _rewrite_vs_oracle(model, image(1, 10, 14), (0, 5, 7), stride=(2, 4))
    assert report.sites[0].decision == "rewritten", str(report)


def test_a_scale_that_varies_along_the_tokens_is_reported_not_read_as_a_scale():
    class TokenScale(CosineAttention):
        def forward(self, img):
            x = self.embed(img).flatten(2).transpose(1, 2)
            B, L, C = x.shape
            q, k, v = self.qkv(x).reshape(B, L, 3, HEADS, HD).permute(2, 0, 3, 1, 4).unbind(0)
            attn = (q @ k.transpose(-2, -1)) * self.table[:1, :1]  # (1, 1, L): varies along the keys
            return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(B, L, C))

    torch.manual_seed(0)
    model = TokenScale().double().eval()
    img = image(1, 12, 16)
    gm, report = gridattn_fx.rewrite(model, (img,), **OPTS)
    (site,) = report.sites
    assert site.decision == "skipped" and "varies along the token axes" in site.reason, str(report)
    assert_equal_exact(gm(img), model(img))


def test_channel_attention_is_reported_and_skipped():
    torch.manual_seed(0)
    model = ChannelAttention().double().eval()
    img = image(2, 12, 16)
    gm, report = gridattn_fx.rewrite(model, (img,), **OPTS)
    (site,) = report.sites
    assert site.decision == "skipped", str(report)
    assert "no proven image layout" in site.reason, str(report)
    assert_equal_exact(gm(img), model(img))


@pytest.mark.parametrize("implementation", ["grouped", "masked"])
@pytest.mark.parametrize("heads,bias", [(True, True), (True, False), (False, True)],
                         ids=["coatnet", "coatnet-nobias", "msra-3d"])
def test_channels_first_v_at_attn_transposed_is_rewritten_exactly(heads, bias, implementation):
    torch.manual_seed(0)
    model = ChannelsFirstAttention(heads=heads, bias=bias).double().eval()
    report = _rewrite_vs_oracle(model, image(2, 12, 16), (0, 6, 8), implementation=implementation)
    (site,) = report.sites
    assert site.decision == "rewritten" and "channels-first" in site.form, str(report)
    assert site.q_layout == TokenLayout(0, 6, 8) and site.q_shape[-2:] == (48, HD if heads else DIM)


def test_channels_first_site_through_the_backend():
    torch.manual_seed(0)
    model = ChannelsFirstAttention().double().eval()
    img = image(2, 12, 16)
    out = torch.compile(model, backend="gridattn", options=OPTS)(img)
    assert gridattn_fx.last_report().sites[0].decision == "rewritten", str(gridattn_fx.last_report())
    model.oracle = ((0, 6, 8), (0, 6, 8), 2)
    expected = model(img)
    model.oracle = None
    assert_close64(out, expected)


def test_channels_first_with_an_untransposed_query_is_reported_and_skipped():
    class Mixed(ChannelsFirstAttention):
        def forward(self, img):
            x = self.stem(img)
            B, C, H, W = x.shape
            q, k, v = self.qkv(x).view(B, HEADS, HD * 3, -1).chunk(3, dim=2)
            q = q.transpose(-2, -1).contiguous()  # the product no longer sees the transpose
            attn = (q @ k).softmax(dim=-1)
            return self.proj((v @ attn.transpose(-2, -1)).view(B, -1, H, W))

    torch.manual_seed(0)
    model = Mixed().double().eval()
    img = image(1, 12, 16)
    gm, report = gridattn_fx.rewrite(model, (img,), **OPTS)
    (site,) = report.sites
    assert site.decision == "skipped" and "channels-first" in site.reason, str(report)
    assert_equal_exact(gm(img), model(img))


class Spellings(nn.Module):
    """Softmaxes around a conv patch embedding: attention spelled in ways no reading knows, and
    softmaxes that are not attention."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.embed = nn.Conv2d(3, DIM, 2, 2)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.head = nn.Linear(DIM, 10)
        self.weight = nn.Parameter(torch.randn(DIM, 10))

    def forward(self, img):
        x = self.embed(img).flatten(2).transpose(1, 2)
        B, L, C = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, HEADS, HD).permute(2, 0, 3, 1, 4).unbind(0)
        scores = q @ k.transpose(-2, -1)
        if self.kind == "softcap":  # tanh soft-capping of the logits
            o = torch.softmax(torch.tanh(scores / 5.0) * 5.0, dim=-1) @ v
        elif self.kind == "stable":  # max subtracted by hand
            o = (scores - scores.amax(-1, keepdim=True)).softmax(-1) @ v
        elif self.kind == "weighted_sum":  # probabilities applied without a product
            o = (scores.softmax(-1).unsqueeze(-1) * v.unsqueeze(-3)).sum(-2)
        else:  # "classifier": no attention at all; classifier softmaxes, one of them used twice
            pooled = x.mean(1)
            probs = (pooled @ self.weight / 2.0).softmax(dim=-1)
            return self.head(pooled).softmax(-1) + probs + probs.amax(-1, keepdim=True)
        return o.transpose(1, 2).reshape(B, L, C)


@pytest.mark.parametrize("kind", ["softcap", "stable", "weighted_sum"])
def test_attention_spelled_in_an_unread_way_is_still_reported(kind):
    torch.manual_seed(0)
    model = Spellings(kind).double().eval()
    img = image(1, 12, 16)
    gm, report = gridattn_fx.rewrite(model, (img,), **OPTS)
    assert len(report.sites) == 1, str(report)
    assert report.sites[0].decision == "skipped" and report.sites[0].reason, str(report)
    assert_equal_exact(gm(img), model(img))


def test_a_classifier_softmax_is_not_an_attention_site():
    torch.manual_seed(0)
    model = Spellings("classifier").double().eval()
    img = image(1, 12, 16)
    _, report = gridattn_fx.rewrite(model, (img,), **OPTS)
    assert report.sites == [], str(report)


# --- item 7: decisions -----------------------------------------------------------------------------
def _vit(**kw):
    torch.manual_seed(0)
    return build(ViT, depth=2, grid=(4, 6), **kw)


def _gridattn_warnings(caught, needle):
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and needle in str(w.message)]


def test_a_failed_replacement_check_warns_once_per_graph_and_is_reported(monkeypatch):
    def failing_check(site, plan, implementation):
        raise RuntimeError("injected check failure")

    monkeypatch.setattr(pipeline, "_check_replacement", failing_check)
    x = image(2, 8, 12)
    for _ in range(2):  # the same failure on a second graph warns again
        model = _vit()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            gm, report = gridattn_fx.rewrite(model, (x,), move_regrouping=False, **OPTS)
        assert report.rewritten == [] and len(report.site_failures) == 2, str(report)
        assert all("injected check failure" in f for f in report.site_failures)
        assert "SITE LEFT DENSE" in str(report) and "blocks.0.attn" in str(report)
        assert len(_gridattn_warnings(caught, "replacement failed its check")) == 1, [str(w.message) for w in caught]
        assert_equal_exact(gm(x), model(x))


def test_the_fallback_warning_is_given_for_every_graph_that_falls_back(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected pass failure")

    monkeypatch.setattr(pipeline, "rewrite_site", broken)
    x = image(2, 8, 12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own once-per-message filter must not hide one
        for _ in range(2):
            _, report = gridattn_fx.rewrite(_vit(), (x,), move_regrouping=False, **OPTS)
            assert report.failure and "injected pass failure" in report.failure
    assert len(_gridattn_warnings(caught, "injected pass failure")) == 2, [str(w.message) for w in caught]


def test_a_pass_that_fails_part_way_still_reports_every_site(monkeypatch):
    """A failure while deciding the second of two sites: both sites get a row, the first with its
    decision undone, the second saying the failure left it dense; the output is the model's."""
    from gridattn_fx.passes import policy

    decided = []

    def fail_on_second(site, *args, **kwargs):
        decided.append(site)
        if len(decided) == 2:
            raise RuntimeError("injected failure in the policy")
        return policy.decide(site, *args, **kwargs)

    monkeypatch.setattr(pipeline, "decide", fail_on_second)
    model, x = _vit(), image(2, 8, 12)  # two blocks, one site each
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm, report = gridattn_fx.rewrite(model, (x,), **OPTS)
    assert report.failure and "injected failure" in report.failure
    assert len(report.sites) == len(model.blocks) >= 2, str(report)
    assert all(s.decision == "skipped" for s in report.sites)
    assert "before this site was decided" in report.sites[-1].reason, str(report)
    with torch.no_grad():
        assert_equal_exact(gm(x), model(x))


def test_a_dynamo_restart_in_the_pass_propagates(monkeypatch):
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis

    import gridattn_fx.frontends.backend as backend_module

    real, calls = backend_module.run_pass, []

    def restart_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise TensorifyScalarRestartAnalysis()
        return real(*args, **kwargs)

    monkeypatch.setattr(backend_module, "run_pass", restart_once)
    model, x = _vit(), image(2, 8, 12)
    with pytest.raises(TensorifyScalarRestartAnalysis):  # not a "pass failed" fallback
        gridattn_fx.rewrite(model, (x,), **OPTS)
    calls.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(model, backend="gridattn", options=OPTS)(x)
    report = gridattn_fx.last_report()
    assert len(calls) == 2 and report.failure is None and len(report.rewritten) == 2, str(report)
    assert not _gridattn_warnings(caught, "gridattn"), [str(w.message) for w in caught]
    assert out.shape == model(x).shape


def test_a_dynamo_restart_in_inductor_propagates(monkeypatch):
    import torch._inductor.compile_fx as inductor_compile
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis

    real, calls = inductor_compile.compile_fx, []

    def restart_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise TensorifyScalarRestartAnalysis()
        return real(*args, **kwargs)

    monkeypatch.setattr(inductor_compile, "compile_fx", restart_once)
    model, x = _vit(), image(2, 8, 12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(model, backend="gridattn", options=OPTS)(x)
    report = gridattn_fx.last_report()
    # one compile per trace: the restart was not compiled again as an "inductor failed" fallback
    assert len(calls) == 2 and report.failure is None and len(report.rewritten) == 2, str(report)
    assert not _gridattn_warnings(caught, "inductor failed"), [str(w.message) for w in caught]


def test_the_constructor_applies_the_preset():
    assert GridAttnConfig(preset="sd-unet") == GridAttnConfig.from_preset("sd-unet")
    config = GridAttnConfig(preset="sd-unet", stride=4)
    assert config == GridAttnConfig.from_preset("sd-unet", stride=4)
    assert config.stride == (4, 4) and config.min_image_tokens == 0 and config.include
    assert "stride" not in config.preset_fields and "include" in config.preset_fields
    # the report credits the preset for what the constructor took from it
    model, x = _vit(), image(2, 8, 12)
    _, report = gridattn_fx.rewrite(model, (x,), GridAttnConfig(preset="vit"))
    assert report.preset == "vit"
    assert all("min_image_tokens" in s.reason and "preset 'vit'" in s.reason for s in report.sites), str(report)


def test_an_unknown_preset_is_rejected_by_name():
    with pytest.raises(ValueError, match="preset"):
        GridAttnConfig(preset="nope")
    with pytest.raises(ValueError, match="preset"):
        GridAttnConfig.from_preset("nope")


class Wrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def test_site_strides_match_inside_a_wrapper_and_unmatched_keys_are_reported():
    model, x = _vit(), image(2, 8, 12)
    strides = {"blocks.0.attn": 1, "blocks.9.attn": 4}  # as calibrate() names them on the bare model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm, report = gridattn_fx.rewrite(Wrapper(model), (x,), site_strides=strides, **OPTS)
    first, second = report.site(r"blocks\.0\.attn"), report.site(r"blocks\.1\.attn")
    assert first.module_path == "model.blocks.0.attn"
    assert first.decision == "skipped" and "stride 1" in first.reason and "site_strides key 'blocks.0.attn'" in first.reason
    assert second.decision == "rewritten" and second.stride == (2, 2)
    assert report.unmatched_site_strides == ["blocks.9.attn"], str(report)
    assert "site_strides key 'blocks.9.attn' matches no attention site in this graph" in str(report)
    assert _gridattn_warnings(caught, "site_strides key 'blocks.9.attn' matches no attention site in this graph")
    # an exact path wins over a suffix
    _, report = gridattn_fx.rewrite(Wrapper(model), (x,), site_strides={"blocks.1.attn": 1, "model.blocks.1.attn": 4},
                                    **OPTS)
    assert report.site(r"blocks\.1\.attn").stride == (4, 4) and report.unmatched_site_strides == []


def test_a_stride_that_leaves_one_token_per_group_is_skipped():
    torch.manual_seed(0)
    model, x = build(ViT, depth=1, grid=(2, 2)), image(1, 4, 4)
    gm, report = gridattn_fx.rewrite(model, (x,), **OPTS)
    (site,) = report.sites
    assert site.decision == "skipped" and "single image key" in site.reason, str(report)
    assert_equal_exact(gm(x), model(x))
    # one side equal to its stride still leaves groups of several tokens: rewritten
    _, report = gridattn_fx.rewrite(build(ViT, depth=1, grid=(2, 6)), (image(1, 4, 12),), **OPTS)
    assert report.sites[0].decision == "rewritten", str(report)


# --- real models (timm, random weights from configs) ------------------------------------------------
def _timm():
    from gridattn_fx.zoo._torchvision_stub import import_with_torchvision

    try:
        return import_with_torchvision("timm")
    except ImportError:
        pytest.skip("timm is not installed")


def _coatnet(timm):
    import dataclasses

    from timm.models import maxxvit

    cfg = maxxvit.model_cfgs["coatnet_nano_rw"]
    cfg = dataclasses.replace(cfg, embed_dim=(16, 16, 32, 32), depths=(1, 1, 1, 1), stem_width=16,
                              transformer_cfg=dataclasses.replace(cfg.transformer_cfg, dim_head=8))
    model = maxxvit.MaxxVit(cfg, img_size=64)
    for module in model.modules():  # the unfused path: v @ attn.transpose(-2, -1)
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


# name -> (builder, the attention modules' class name, {path regex: (decision, form words, reason words)})
REAL = {
    "swinv2": (lambda timm: timm.create_model("swinv2_tiny_window8_256", img_size=64, embed_dim=16, depths=(1, 1),
                                              num_heads=(1, 2), window_size=4),
               "WindowAttention", {r"attn$": ("skipped", "tensor-scale", "windows")}),
    "xcit": (lambda timm: timm.create_model("xcit_nano_12_p16_224", img_size=64, depth=1, cls_attn_layers=1,
                                            embed_dim=32, num_heads=2),
             ("XCA", "ClassAttn"), {r"^blocks\.0\.attn$": ("skipped", "tensor-scale", "no proven image layout"),
                                    r"cls_attn_blocks\.0\.attn$": ("skipped", "", "")}),  # SDPA
    "coatnet": (_coatnet, "Attention2d", {
        r"stages\.2\.blocks\.0\.attn$": ("rewritten", "channels-first", "image self-attention"),
        r"stages\.3\.blocks\.0\.attn$": ("skipped", "channels-first", "single image key")}),
    "efficientvit_msra": (lambda timm: timm.create_model("efficientvit_m0", img_size=64, embed_dim=[16, 32, 48],
                                                         depth=[1, 1, 1], num_heads=[1, 1, 1]),
                          "CascadedGroupAttention", {
        r"stages\.0\.": ("rewritten", "channels-first", "image self-attention"),
        r"stages\.1\.": ("skipped", "channels-first", "single image key"),
        r"stages\.2\.": ("skipped", "channels-first", "no proven image layout")}),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_every_attention_site_of_real_models_is_in_the_report(name):
    from gridattn_fx.zoo._common import finish

    timm = _timm()
    builder, classes, expected = REAL[name]
    torch.manual_seed(0)
    model, (x,) = finish(builder(timm), (torch.randn(1, 3, 64, 64),), dtype=torch.float64, nonzero_init=True)
    reference = model(x)  # eager first: EfficientViT-MSRA fills its attention-bias cache here
    gm, report = gridattn_fx.rewrite(model, (x,), **OPTS)
    modules = [path for path, m in model.named_modules() if type(m).__name__ in classes]
    assert modules
    for path in modules:  # every attention module has its site(s); nothing is matched twice
        assert any(s.module_path.startswith(path) for s in report.sites), (path, str(report))
    for pattern, (decision, form, reason) in expected.items():
        hits = [s for s in report.sites if re.search(pattern, s.module_path)]
        assert hits, (pattern, str(report))
        for site in hits:
            assert site.decision == decision and form in site.form and reason in site.reason, str(report)
    if not report.rewritten:
        assert_equal_exact(gm(x), reference)
    elif name == "coatnet":  # the grouped rewrite is the masked oracle form, end to end
        masked, _ = gridattn_fx.rewrite(model, (x,), implementation="masked", **OPTS)
        out = gm(x)
        assert_close64(out, masked(x))
        assert_differs(out, reference)


def test_attention_inside_a_checkpointed_subgraph_is_reported_dense():
    """Activation checkpointing puts the block's SDPA inside a higher-order op's subgraph: the pass
    rewrites top-level sites only, so the site is reported against the higher-order op, dense."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, 8, 2, 2)

        def forward(self, img):
            x = self.patch(img).flatten(2).transpose(1, 2).unflatten(-1, (2, 4)).transpose(1, 2)
            return checkpoint(F.scaled_dot_product_attention, x, x, x, use_reentrant=False)

    model, x = Checkpointed().double(), image(1, 16, 16).requires_grad_()
    gm, report = gridattn_fx.rewrite(model, (x,), **OPTS)
    (site,) = report.sites
    assert site.decision == "skipped" and "sdpa attention" in site.reason and "inside the subgraph" in site.reason
    with torch.no_grad():
        assert_close64(gm(x), model(x))

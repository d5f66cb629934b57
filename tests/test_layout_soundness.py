"""The layout proof's soundness.

* image identity: queries and keys must come from the same image (or a reduction of it); two
  images of one batch split apart, or two input images through one conv, are cross-attention;
* mutation: an in-place write that can move tokens (copy_, index_copy_, setitem) breaks the proof
  for every alias of the written tensor; in-place pointwise ops (add_, mul_) do not;
* sites whose tokens are still a raster image: BatchNorm1d over flattened tokens, strided
  subsampling of an NHWC view (LeViT);
* skip reasons name the op that really dropped the layout (Conv3d, in-place writes).

Rewritten sites are compared with the independent oracle in float64 (tests/oracle.py through the
models' oracle hook), skipped ones with the untouched model.
"""

import re

import pytest
import torch
import torch.nn as nn

from models import DIM, HEADS, Attention, CrossAttention, attend, build, image
from oracle import assert_close64, assert_differs, assert_equal_exact, layout_tuple, oracle_mode

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx import TokenLayout  # noqa: E402


def rewrite(model, inputs, **opts):
    opts.setdefault("min_image_tokens", 0)
    opts.setdefault("stride", 2)
    gm, report = gridattn_fx.rewrite(model, inputs, **opts)
    assert report.failure is None, report.failure
    return gm, report


def site(report, path):
    return report.site("^" + re.escape(path) + "$")


def expect_rewritten(report, path, q_layout, k_layout=None):
    s = site(report, path)
    assert s.decision == "rewritten", f"{path}: {s.reason}\n{report}"
    assert s.q_layout == TokenLayout(*layout_tuple(q_layout)), str(report)
    assert s.k_layout == TokenLayout(*layout_tuple(k_layout or q_layout)), str(report)
    return s


def assert_matches_oracle(gm, model, inputs, q_layout, k_layout=None, only=None, differs=True):
    """The rewritten ``gm`` equals the model run with the oracle mask at the sites ``only`` names
    (default: every attention module) and, with ``differs``, the grid changed the result."""
    with oracle_mode(model, q_layout, k_layout, only=only):
        ref = model(*inputs)
    assert_close64(gm(*inputs), ref)
    if differs:
        assert_differs(ref, model(*inputs))


def expect_skipped(report, path, *words):
    s = site(report, path)
    assert s.decision == "skipped", f"{path} was rewritten\n{report}"
    reason = s.reason.lower()
    assert all(w in reason for w in words), f"{path}: reason {s.reason!r} lacks one of {words}"
    return s


def tokens(x):
    return x.flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# item 3: image identity
# ---------------------------------------------------------------------------------------------
class FeatureMatcher(nn.Module):
    """LoFTR-like: one backbone over both images as a batch, features split along the batch;
    self-attention within image A (eligible), cross-attention A -> B (not)."""

    def __init__(self, split="chunk", dim=DIM):
        super().__init__()
        self.split = split
        self.backbone = nn.Conv2d(3, dim, 2, 2)
        self.self_attn = Attention(dim)
        self.cross_attn = CrossAttention(dim)

    def forward(self, img_a, img_b):
        feats = self.backbone(torch.cat([img_a, img_b]))
        if self.split == "chunk":
            fa, fb = feats.chunk(2)
        elif self.split == "index":
            n = img_a.shape[0]
            fa, fb = feats[:n], feats[n:]
        else:  # "unbind" of a (2, B, ...) view
            fa, fb = feats.view(2, img_a.shape[0], *feats.shape[1:]).unbind(0)
        a, b = tokens(fa), tokens(fb)
        a = a + self.self_attn(a)
        return a + self.cross_attn(a, b)


@pytest.mark.parametrize("split", ["chunk", "index", "unbind"])
def test_cross_attention_between_two_images_of_a_batch_is_skipped(split):
    model = build(FeatureMatcher, split)
    a, b = image(2, 12, 20), image(2, 12, 20)
    gm, report = rewrite(model, (a, b))
    expect_rewritten(report, "self_attn", (0, 6, 10))
    expect_skipped(report, "cross_attn", "cross-attention between two different images")
    assert_matches_oracle(gm, model, (a, b), (0, 6, 10), only=["self_attn"])


class TwoInputsOneConv(nn.Module):
    def __init__(self, dim=DIM):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 2, 2)
        self.cross_attn = CrossAttention(dim)

    def forward(self, img_a, img_b):
        a, b = tokens(self.patch_embed(img_a)), tokens(self.patch_embed(img_b))
        return self.cross_attn(a, b)


def test_two_input_images_through_one_conv_are_not_one_image():
    model = build(TwoInputsOneConv)
    a, b = image(2, 12, 20), image(2, 12, 20)
    gm, report = rewrite(model, (a, b))
    expect_skipped(report, "cross_attn", "cross-attention between two different images")
    assert report.rewritten == []
    assert_equal_exact(gm(a, b), model(a, b))


class ConvProjections(nn.Module):
    """CvT-style: q and k/v from two different convs of the same feature map (same image); the
    keys also through a strided conv (a reduction of the same image)."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 2, 2)
        self.conv_q = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.conv_kv = nn.Conv2d(dim, dim, 3, 2, 1, groups=dim)
        self.attn = CrossAttention(dim)

    def forward(self, img):
        x = self.patch_embed(img)
        return self.attn(tokens(self.conv_q(x)), tokens(self.conv_kv(x)))


def test_conv_projections_of_one_image_are_the_same_image():
    model = build(ConvProjections)
    x = image(2, 16, 24)
    gm, report = rewrite(model, (x,))
    s = expect_rewritten(report, "attn", (0, 8, 12), (0, 4, 6))
    assert "across two grids" in s.reason
    assert_matches_oracle(gm, model, (x,), (0, 8, 12), (0, 4, 6))


class SwappedBatchKeys(nn.Module):
    """Keys from the same feature map with its images reordered along the batch
    (``cat([x[1:], x[:1]])``): image b's queries would meet image b+1's keys."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 2, 2)
        self.cross_attn = CrossAttention(dim)

    def forward(self, img):
        x = tokens(self.patch_embed(img))
        return self.cross_attn(x, torch.cat([x[1:], x[:1]]))


def test_keys_with_reordered_batch_are_skipped():
    model = build(SwappedBatchKeys)
    x = image(2, 12, 20)
    gm, report = rewrite(model, (x,))
    expect_skipped(report, "cross_attn", "different images")
    assert_equal_exact(gm(x), model(x))


class BatchedPairs(nn.Module):
    """Self-attention over ``cat([feat_a, feat_b])`` (both images in one batch): each batch entry
    attends within its own image, eligible; the batched cross form (keys ``cat([feat_b, feat_a])``)
    is not."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 2, 2)
        self.self_attn = Attention(dim)
        self.cross_attn = CrossAttention(dim)

    def forward(self, img_a, img_b):
        a, b = tokens(self.patch_embed(img_a)), tokens(self.patch_embed(img_b))
        both = torch.cat([a, b])
        both = both + self.self_attn(both)
        fa, fb = both.chunk(2)
        return self.cross_attn(both, torch.cat([fb, fa]))


def test_batched_self_and_cross_attention():
    model = build(BatchedPairs)
    a, b = image(2, 12, 20), image(2, 12, 20)
    gm, report = rewrite(model, (a, b))
    expect_rewritten(report, "self_attn", (0, 6, 10))
    expect_skipped(report, "cross_attn", "different images")
    assert_matches_oracle(gm, model, (a, b), (0, 6, 10), only=["self_attn"])


class HeadsInBatch(nn.Module):
    """diffusers' head_to_batch_dim: heads folded into the batch by separate reshapes of q, k, v
    (eligible); ``swap`` folds the key's heads the other way round, (heads, B), so that query
    entry b * heads + h meets another image's keys (not eligible)."""

    def __init__(self, swap=False, dim=DIM, heads=HEADS):
        super().__init__()
        self.swap, self.heads = swap, heads
        self.patch_embed = nn.Conv2d(3, dim, 2, 2)
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.oracle = None

    def fold(self, x, swap=False):
        B, N, C = x.shape
        x = x.reshape(B, N, self.heads, C // self.heads)
        order = (2, 0, 1, 3) if swap else (0, 2, 1, 3)
        return x.permute(*order).reshape(B * self.heads, N, C // self.heads)

    def forward(self, img):
        x = tokens(self.patch_embed(img))
        o = attend(self, self.fold(self.q(x)), self.fold(self.k(x), self.swap), self.fold(self.v(x), self.swap))
        return o.reshape(x.shape[0], self.heads, x.shape[1], -1)


def test_heads_folded_into_the_batch_alike_are_one_image():
    model = build(HeadsInBatch)
    x = image(2, 12, 20)
    gm, report = rewrite(model, (x,))
    expect_rewritten(report, "", (0, 6, 10))
    assert_matches_oracle(gm, model, (x,), (0, 6, 10))


def test_heads_folded_into_the_batch_differently_are_skipped():
    model = build(HeadsInBatch, swap=True)
    x = image(2, 12, 20)
    gm, report = rewrite(model, (x,))
    expect_skipped(report, "", "different images")
    assert_equal_exact(gm(x), model(x))


# ---------------------------------------------------------------------------------------------
# item 4: in-place writes on the provenance path
# ---------------------------------------------------------------------------------------------
class InPlace(nn.Module):
    def __init__(self, kind, n_tokens=60, dim=DIM):
        super().__init__()
        self.kind = kind
        self.patch_embed = nn.Conv2d(3, dim, 2, 2)
        self.pos = nn.Parameter(torch.randn(1, n_tokens, dim))
        self.register_buffer("perm", torch.randperm(n_tokens))
        self.attn = Attention(dim)

    def forward(self, img):
        t = tokens(self.patch_embed(img)).contiguous()
        if self.kind == "copy_roll":
            t.copy_(torch.roll(t, 1, dims=1))
        elif self.kind == "index_copy":
            t.index_copy_(1, self.perm, t.clone())
        elif self.kind == "setitem":
            t[:, self.perm] = t.clone()
        elif self.kind == "setitem_view":  # written through a view of the tokens
            t.view(t.shape[0], 6, 10, -1)[:, 0] = t.view(t.shape[0], 6, 10, -1)[:, 1].clone()
        elif self.kind == "add_":
            t.add_(self.pos)
        elif self.kind == "mul_":
            t.mul_(2.0)
        elif self.kind == "iadd":
            t += self.pos
        elif self.kind == "write_a_clone":  # a write into a copy leaves the tokens alone
            c = t.clone()
            c[:, self.perm] = t
            t = t + c.mean()
        elif self.kind == "write_after":  # a write into the output, after the attention
            out = self.attn(t)
            out[:, self.perm] = out.clone()
            return out
        return self.attn(t)


@pytest.mark.parametrize("kind", ["copy_roll", "index_copy", "setitem", "setitem_view"])
def test_in_place_reorder_breaks_the_proof(kind):
    model = build(InPlace, kind)
    x = image(2, 12, 20)
    gm, report = rewrite(model, (x,))
    s = expect_skipped(report, "attn", "in-place")
    assert report.rewritten == []
    assert_equal_exact(gm(x), model(x))
    if kind != "setitem_view":
        assert {"copy_roll": "copy", "index_copy": "index_copy", "setitem": "setitem"}[kind] in s.reason


@pytest.mark.parametrize("kind", ["add_", "mul_", "iadd", "write_a_clone", "write_after"])
def test_in_place_pointwise_keeps_the_proof(kind):
    model = build(InPlace, kind)
    x = image(2, 12, 20)
    gm, report = rewrite(model, (x,))
    expect_rewritten(report, "attn", (0, 6, 10))
    assert_matches_oracle(gm, model, (x,), (0, 6, 10))


class InPlaceMixedLayouts(nn.Module):
    """``x.add_(x.transpose)``-like: an in-place add of a differently laid out image."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 2, 2)
        self.attn = Attention(dim)

    def forward(self, img):
        x = self.patch_embed(img)
        t = tokens(x).contiguous()
        t.add_(x.transpose(2, 3).flatten(2).transpose(1, 2))
        return self.attn(t)


def test_in_place_add_of_another_layout_breaks_the_proof():
    model = build(InPlaceMixedLayouts)
    x = image(2, 12, 12)
    gm, report = rewrite(model, (x,))
    expect_skipped(report, "attn", "no proven image layout")
    assert_equal_exact(gm(x), model(x))


# ---------------------------------------------------------------------------------------------
# item 8: tokens that are still a raster image
# ---------------------------------------------------------------------------------------------
class BnTokens(nn.Module):
    """LeViT stage 0: BatchNorm1d over the flattened tokens (per channel, per token)."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 2, 2)
        self.bn = nn.BatchNorm1d(dim)
        self.attn = Attention(dim)

    def forward(self, img):
        x = tokens(self.patch_embed(img))
        x = self.bn(x.flatten(0, 1)).reshape_as(x)
        return self.attn(x)


def test_batchnorm1d_over_flattened_tokens_keeps_the_proof():
    model = build(BnTokens)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    x = image(2, 12, 20)
    gm, report = rewrite(model, (x,))
    expect_rewritten(report, "attn", (0, 6, 10))
    assert_matches_oracle(gm, model, (x,), (0, 6, 10))


def test_batchnorm1d_in_training_mode_keeps_the_proof():
    # batch statistics are still per channel: every value stays at its token
    model = build(BnTokens).train()
    x = image(2, 12, 20)
    gm, report = rewrite(model, (x,))
    expect_rewritten(report, "attn", (0, 6, 10))
    out = gm(x)
    with oracle_mode(model, (0, 6, 10)):
        ref = model(x)
    assert_close64(out, ref)
    assert_differs(ref, model(x))


class MergedBatchTokens(nn.Module):
    """A reshape that splits the flattened (B * N) axis differently from how it was merged."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 2, 2)
        self.attn = Attention(dim)

    def forward(self, img):
        x = tokens(self.patch_embed(img))
        B, N, C = x.shape
        return self.attn(x.reshape(B * N, C).reshape(N, B, C).transpose(0, 1))


def test_tokens_regrouped_across_the_batch_are_not_an_image():
    model = build(MergedBatchTokens)
    x = image(2, 12, 20)
    gm, report = rewrite(model, (x,))
    expect_skipped(report, "attn", "no proven image layout")
    assert_equal_exact(gm(x), model(x))


class Subsample(nn.Module):
    """LeViT's stride-2 subsampling of an NHWC view, then self-attention on the half grid and
    LeViT's AttentionSubsample (queries from the subsampled grid, keys from the full one)."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 2, 2)
        self.sub_attn = CrossAttention(dim)
        self.attn = Attention(dim)

    def forward(self, img):
        x = self.patch_embed(img)
        B, C, H, W = x.shape
        t = tokens(x)
        sub = t.view(B, H, W, C)[:, ::2, ::2].reshape(B, -1, C)
        y = self.sub_attn(sub, t)
        return self.attn(y)


def test_strided_subsampling_is_a_smaller_grid():
    model = build(Subsample)
    x = image(2, 16, 24)
    gm, report = rewrite(model, (x,))
    expect_rewritten(report, "sub_attn", (0, 4, 6), (0, 8, 12))
    expect_rewritten(report, "attn", (0, 4, 6))
    model.sub_attn.oracle = ((0, 4, 6), (0, 8, 12), 2)
    model.attn.oracle = ((0, 4, 6), (0, 4, 6), 2)
    try:
        ref = model(x)
    finally:
        model.sub_attn.oracle = model.attn.oracle = None
    assert_close64(gm(x), ref)
    assert_differs(ref, model(x))


class RelPosWrite(nn.Module):
    """MViTv2-like: the relative-position bias written into the scores in place."""

    def __init__(self, dim=DIM, heads=HEADS):
        super().__init__()
        self.heads = heads
        self.patch_embed = nn.Conv2d(3, dim, 2, 2)
        self.qkv = nn.Linear(dim, dim * 3)
        self.rel = nn.Parameter(torch.randn(heads, 60, 60))
        self.oracle = None

    def forward(self, img):
        x = tokens(self.patch_embed(img))
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * 0.5) @ k.transpose(-2, -1)
        attn[:, :, 1:, 1:] = attn[:, :, 1:, 1:] + self.rel[:, 1:, 1:]
        attn = attn.softmax(dim=-1)
        return (attn @ v).transpose(1, 2).reshape(B, N, C)


def test_scores_written_in_place_are_reported_and_not_rewritten():
    model = build(RelPosWrite)
    x = image(2, 12, 20)
    gm, report = rewrite(model, (x,))
    assert len(report.sites) == 1, str(report)
    s = report.sites[0]
    assert s.decision == "skipped", str(report)
    assert_equal_exact(gm(x), model(x))


# ---------------------------------------------------------------------------------------------
# item 7 (layout part): reasons name the op that dropped the layout
# ---------------------------------------------------------------------------------------------
class VideoTokens(nn.Module):
    def __init__(self, dim=DIM):
        super().__init__()
        self.patch_embed = nn.Conv3d(3, dim, (1, 2, 2), (1, 2, 2))
        self.attn = Attention(dim)

    def forward(self, video):
        return self.attn(self.patch_embed(video).flatten(2).transpose(1, 2))


def test_conv3d_video_tokens_are_proven_and_rewritten():
    # a Conv3d output is a video source (it used to be skipped, naming it); the T x H x W
    # site is now rewritten (temporal stride 1) and equals the N-D oracle
    model = build(VideoTokens)
    x = torch.randn(2, 3, 2, 8, 8, dtype=torch.float64)
    gm, report = rewrite(model, (x,))
    layout = TokenLayout(0, image_shape=(2, 4, 4))
    s = site(report, "attn")
    assert s.decision == "rewritten" and s.q_layout == layout and "conv3d" in s.evidence, str(report)
    assert_matches_oracle(gm, model, (x,), layout)


class BatchedPairsOneEach(BatchedPairs):
    """BatchedPairs with one image each: the batch axes have size 1 along the way."""


def test_batched_cross_attention_with_single_images_is_skipped():
    model = build(BatchedPairsOneEach)
    a, b = image(1, 12, 20), image(1, 12, 20)
    gm, report = rewrite(model, (a, b))
    expect_rewritten(report, "self_attn", (0, 6, 10))
    expect_skipped(report, "cross_attn", "different images")
    assert_matches_oracle(gm, model, (a, b), (0, 6, 10), only=["self_attn"], differs=False)


class LostInsideFlatTokens(nn.Module):
    """An op that mixes tokens between ``flatten(0, 1)`` and ``reshape_as``: the reason must name
    it, not the reshape_as that only reads the template's shape."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 2, 2)
        self.attn = Attention(dim)

    def forward(self, img):
        x = tokens(self.patch_embed(img))
        return self.attn(torch.cumsum(x.flatten(0, 1), 0).reshape_as(x))


def test_reason_names_the_op_that_lost_the_layout():
    model = build(LostInsideFlatTokens)
    x = image(2, 12, 20)
    gm, report = rewrite(model, (x,))
    s = expect_skipped(report, "attn", "lost at cumsum")
    assert "reshape_as" not in s.reason
    assert_equal_exact(gm(x), model(x))


# ---------------------------------------------------------------------------------------------
# real models (random weights from configs)
# ---------------------------------------------------------------------------------------------
def _timm():
    from gridattn_fx.zoo._torchvision_stub import import_with_torchvision
    try:
        return import_with_torchvision("timm")
    except ImportError as e:
        pytest.skip(f"timm is not installed ({e})")


def test_timm_levit_sites_are_proven_and_match_the_oracle():
    """BatchNorm1d over flattened tokens (stage 0) and ``view(B, H, W, C)[:, ::2, ::2]``
    subsampling (stages 1-2) keep the image; every site equals the oracle."""
    from oracle import log_grid_mask

    _timm()
    from timm.models.levit import Levit

    model = Levit(img_size=128, num_classes=10, embed_dim=(32, 48, 64), key_dim=8, depth=(1, 1, 1),
                  num_heads=(2, 2, 2)).double().eval()
    with torch.no_grad():  # timm's init (zero biases, 0.02 weights) leaves attention nearly uniform
        for p in model.parameters():
            p.normal_(0, 0.3)
    x = image(2, 128, 128)
    gm, report = rewrite(model, (x,))
    layouts = {
        "stages.0.blocks.0.attn": ((0, 8, 8), (0, 8, 8)),
        "stages.1.downsample.attn_downsample": ((0, 4, 4), (0, 8, 8)),
        "stages.1.blocks.0.attn": ((0, 4, 4), (0, 4, 4)),
        "stages.2.downsample.attn_downsample": ((0, 2, 2), (0, 4, 4)),
    }
    # the last stage's 2x2 self-attention at stride 2 would leave one key per group: skipped (the
    # downsampling attention above it keeps 4 keys per group for its single query and is rewritten)
    assert len(report.sites) == len(layouts) + 1, str(report)
    last = report.site(r"stages\.2\.blocks\.0\.attn$")
    assert last.decision == "skipped" and "single image key" in last.reason, str(report)
    for path, (ql, kl) in layouts.items():
        expect_rewritten(report, path, ql, kl)
    out = gm(x)
    # LeViT caches its bias table in eval mode (Dynamo's capture left a fake one there); the
    # oracle adds the independently built log grid mask to each site's own bias
    model.get_submodule("stages.2.blocks.0.attn").attention_bias_cache = {}
    patched = []
    for path, (ql, kl) in layouts.items():
        mod = model.get_submodule(path)
        mod.attention_bias_cache = {}
        mask = log_grid_mask(ql, kl, 2)
        mod.get_attention_biases = (lambda m, g: (lambda device: m.attention_biases[:, m.attention_bias_idxs] + g))(mod, mask)
        patched.append(mod)
    try:
        ref = model(x)
    finally:
        for mod in patched:
            del mod.get_attention_biases
    assert_close64(out, ref)
    assert_differs(ref, model(x))


def test_hf_efficientloftr_cross_sites_are_skipped():
    """Both images through one backbone as a batch, split along it: self-attention within an image
    is rewritten, cross-attention between the two images is not."""
    transformers = pytest.importorskip("transformers")
    config = transformers.EfficientLoFTRConfig(
        num_attention_layers=1, stage_num_blocks=[1, 1, 1, 1], out_features=[16, 16, 32, 256],
        stage_stride=[2, 1, 2, 2], hidden_size=256, intermediate_size=256, fine_fusion_dims=[256, 32, 16])
    model = transformers.EfficientLoFTRModel(config).double().eval()
    x = torch.randn(1, 2, 3, 128, 128, dtype=torch.float64)
    gm, report = rewrite(model, (x,))
    prefix = "local_feature_transformer.layers.0."
    expect_rewritten(report, prefix + "self_attention.attention", (0, 4, 4))
    cross = [s for s in report.sites if s.module_path == prefix + "cross_attention.attention"]
    assert len(cross) == 2 and len(report.sites) == 3, str(report)
    for s in cross:
        assert s.decision == "skipped" and "cross-attention between two different images" in s.reason, str(report)


def test_timm_mvitv2_in_place_rel_pos_write_is_reported_and_untouched():
    _timm()
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    model = MultiScaleVit(MultiScaleVitCfg(depths=(1, 1), embed_dim=(16, 32), num_heads=(1, 2)),
                          img_size=64, num_classes=10).double().eval()
    x = image(1, 64, 64)
    gm, report = rewrite(model, (x,))
    assert [s.module_path for s in report.sites] == ["stages.0.blocks.0.attn", "stages.1.blocks.0.attn"], str(report)
    for s in report.sites:
        assert s.decision == "skipped" and "written in place" in s.reason, str(report)
    assert_equal_exact(gm(x), model(x))


class WrittenQuery(nn.Module):
    """q, k and v are views of a tensor that is written in place: the reason is the layout's."""

    def __init__(self, dim=DIM, n_tokens=60):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 2, 2)
        self.register_buffer("perm", torch.randperm(n_tokens))
        self.oracle = None

    def forward(self, img):
        t = tokens(self.patch_embed(img)).contiguous()
        t[:, self.perm] = t.clone()
        q = t.view(t.shape[0], t.shape[1], 2, -1).transpose(1, 2)
        return attend(self, q, q, q)


def test_written_query_view_reason_is_the_layout():
    model = build(WrittenQuery)
    x = image(2, 12, 20)
    gm, report = rewrite(model, (x,))
    s = expect_skipped(report, "", "in-place setitem")
    assert "scores" not in s.reason
    assert_equal_exact(gm(x), model(x))


class InputPatchify(nn.Module):
    """AuraFlow / CogView3 / Lumina: patches cut from the NCHW (NCTHW) model input by view/permute,
    then a Linear: no convolution anywhere."""

    def __init__(self, patch=2, channels=4, dim=DIM, video=False, cut=True):
        super().__init__()
        self.p, self.video, self.cut = patch, video, cut
        self.embed = nn.Linear(channels * patch * patch, dim) if cut else nn.Linear(channels, dim)
        self.attn = Attention(dim)

    def forward(self, x):
        p = self.p
        if not self.cut:   # pixels straight to tokens: the input's axes are not proven an image
            x = x.flatten(2).transpose(1, 2)
        elif self.video:   # (B, C, T, H, W): frames kept whole, rows and columns cut
            b, c, t, h, w = x.shape
            x = x.view(b, c, t, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 4, 6).flatten(4).flatten(1, 3)
        else:
            b, c, h, w = x.shape
            x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).flatten(-3).flatten(1, 2)
        x = self.embed(x)
        return x + self.attn(x)


@pytest.mark.parametrize("video", [False, True])
def test_a_patchify_of_the_model_input_is_a_spatial_source(video):
    model = build(InputPatchify, video=video)
    shape = (2, 4, 3, 8, 12) if video else (2, 4, 8, 12)
    x = torch.randn(*shape, dtype=torch.float64)
    gm, report = gridattn_fx.rewrite(model, (x,), stride=2, min_image_tokens=0)
    (s,) = report.sites
    layout = TokenLayout(0, image_shape=(3, 4, 6) if video else (4, 6))
    assert s.decision == "rewritten" and s.q_layout == layout, str(report)
    assert "model input" in s.evidence and "patchify" in s.evidence
    model.attn.oracle = (layout, layout, 2)
    with torch.no_grad():
        expected = model(x)
        model.attn.oracle = None
        assert_close64(gm(x), expected)


def test_a_model_input_flattened_without_patches_is_not_an_image():
    """Only a patchify proves that a 4-D input is an image: a (B, heads, L, D) tensor or a mask is
    4-D too."""
    model = build(InputPatchify, cut=False)
    x = torch.randn(2, 4, 8, 12, dtype=torch.float64)
    gm, report = gridattn_fx.rewrite(model, (x,), stride=2, min_image_tokens=0)
    (s,) = report.sites
    assert s.decision == "skipped" and "no spatial source" in s.reason, str(report)
    with torch.no_grad():
        assert_equal_exact(gm(x), model(x))


def test_images_packed_into_one_sequence_stay_dense_and_say_why():
    """Pixtral: the tokens of differently sized images concatenated along the sequence, kept apart by
    a block-diagonal mask. One grid per packed image is not modelled: dense, with that reason."""

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, DIM, 2, 2)
            self.attn = Attention(DIM)

        def forward(self, a, b):
            ta, tb = (self.patch(i).flatten(2).transpose(1, 2) for i in (a, b))
            na, nb = ta.shape[1], tb.shape[1]
            allowed = torch.zeros(na + nb, na + nb, dtype=torch.bool)
            allowed[:na, :na] = True
            allowed[na:, na:] = True
            return self.attn(torch.cat([ta, tb], 1), allowed)

    model = build(Packed)
    inputs = (image(1, 8, 8), image(1, 4, 8))
    gm, report = gridattn_fx.rewrite(model, inputs, stride=2, min_image_tokens=0)
    (s,) = report.sites
    assert s.decision == "skipped" and "several images packed into one sequence" in s.reason, str(report)
    with torch.no_grad():
        assert_equal_exact(gm(*inputs), model(*inputs))


class SliceWrite(nn.Module):
    """CogView4 writes its rotary embedding into the image part of q and k in place:
    ``q[:, :, text:, :] = rope(q[:, :, text:, :])``. ``value`` picks what is written there."""

    def __init__(self, value="rope", dim=DIM, heads=HEADS):
        super().__init__()
        self.value, self.heads = value, heads
        self.patch = nn.Conv2d(3, dim, 2, 2)
        self.text = nn.Parameter(torch.randn(1, 3, dim))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.oracle = None

    def forward(self, img, other):
        x = self.patch(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.text.expand(x.shape[0], -1, -1), x], 1)
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        t = self.text.shape[1]
        freqs = torch.linspace(0.5, 1.5, n - t, dtype=x.dtype)[:, None]
        if self.value == "rope":        # per-position values: every token stays where it is
            q[:, :, t:, :] = q[:, :, t:, :] * freqs.cos() + q[:, :, t:, :].roll(1, -1) * freqs.sin()
            k[:, :, t:, :] = k[:, :, t:, :] * freqs.cos()
        elif self.value == "flipped":   # the image tokens reversed: no longer the image's raster
            q[:, :, t:, :] = q[:, :, t:, :].flip(2)
        else:                           # another image's tokens written over q's
            y = self.patch(other).flatten(2).transpose(1, 2)
            q[:, :, t:, :] = self.qkv(y)[..., :c].view(b, n - t, self.heads, c // self.heads).transpose(1, 2)
        return attend(self, q, k, v).transpose(1, 2).reshape(b, n, c)


@pytest.mark.parametrize("value,decision", [("rope", "rewritten"), ("flipped", "skipped"), ("other", "skipped")])
def test_a_slice_written_in_place_keeps_the_layout_only_with_a_value_laid_out_alike(value, decision):
    model = build(SliceWrite, value=value)
    inputs = (image(2, 8, 12), image(2, 8, 12))
    gm, report = gridattn_fx.rewrite(model, inputs, stride=2, min_image_tokens=0)
    (s,) = report.sites
    assert s.decision == decision, str(report)
    with torch.no_grad():
        if decision == "skipped":
            assert_equal_exact(gm(*inputs), model(*inputs))
            return
        layout = TokenLayout(3, 4, 6, 0)
        model.oracle = (layout, layout, 2)
        expected = model(*inputs)
        model.oracle = None
        assert_close64(gm(*inputs), expected)
        assert_differs(expected, model(*inputs))

"""Regrouping moved across per-token ops (gridattn_fx/passes/motion.py).

The pass may put a site's Grid Clustering above the ops that make q/k/v and its Grid Recovering
below the ops that consume the output. These tests check that the result is still exactly the
oracle (float64), that the motion happens where it should (structure, read off the planned motion
and the report), and that it stops at every op that is not per-token or has another reader.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import DIM, HEADS, ManualViT, SegFormerStage, ViT, attend, build, image
from oracle import assert_close64, oracle_mode

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx import GridAttnConfig, TokenLayout  # noqa: E402
from gridattn_fx.frontends.api import capture  # noqa: E402
from gridattn_fx.grid import cluster, cluster_axis, recover_axis  # noqa: E402
from gridattn_fx.ir.module_paths import module_path  # noqa: E402
from gridattn_fx.layout.analysis import LayoutAnalysis  # noqa: E402
from gridattn_fx.ir.graphs import ensure_values  # noqa: E402
from gridattn_fx.passes.policy import decide  # noqa: E402
from gridattn_fx.passes.motion import plan_motion  # noqa: E402
from gridattn_fx.patterns import find_attention_sites  # noqa: E402
from gridattn_fx.ir.ops import op_name  # noqa: E402


def rewrite(model, inputs, **opts):
    opts.setdefault("min_image_tokens", 0)
    return gridattn_fx.rewrite(model, inputs, **opts)


def motions(model, inputs, **opts):
    """The planned motion (or why none) of every rewritten site, with the graph it refers to."""
    opts.setdefault("min_image_tokens", 0)
    config = GridAttnConfig(**opts)
    gm = capture(model, inputs)
    ensure_values(gm, inputs)
    sites = find_attention_sites(gm)
    layouts = LayoutAnalysis(gm, {s.output: (s.query, s.query_dim) for s in sites if s.build is not None})
    out = []
    for s in sites:
        d = decide(s, layouts, config, module_path(s.output), model.training)
        if d.rewrite:
            out.append(plan_motion(gm, s, d.plan) + (gm,))
    return out


def ops(nodes, gm):
    return sorted(op_name(n, gm) or str(n.target) for n in nodes)


def check_against_oracle(model, inputs, q_layout, k_layout=None, stride=2):
    """Moved, at-site and oracle agree; returns the moved rewrite's report."""
    moved, report = rewrite(model, inputs, stride=stride)
    at_site, _ = rewrite(model, inputs, stride=stride, move_regrouping=False)
    with torch.no_grad(), oracle_mode(model, q_layout, k_layout, stride):
        expected = model(*inputs)
    with torch.no_grad():
        got, got_at_site = moved(*inputs), at_site(*inputs)
    assert_close64(got, expected)
    assert_close64(got, got_at_site)
    return report


# --- the two tensor functions --------------------------------------------------------------------

@pytest.mark.parametrize("shape,axis", [((2, 24, 5), 1), ((3, 24), 1), ((2, 3, 24, 4), 2), ((24, 2, 3), 0)])
@pytest.mark.parametrize("stride", [(2, 2), (3, 2), (1, 4)])
def test_cluster_axis_is_cluster_in_place_and_recover_axis_inverts_it(shape, axis, stride):
    height, width = 6, 4
    x = torch.randn(shape, dtype=torch.float64)
    grouped = cluster_axis(x, axis, height, width, stride)
    # cluster() on a (..., L, 1) view: same group order, groups flattened back into one axis
    reference = cluster(x.movedim(axis, -1).unsqueeze(-1), height, width, stride).flatten(-3, -2)
    assert torch.equal(grouped, reference.squeeze(-1).movedim(-1, axis))
    assert torch.equal(recover_axis(grouped, axis, height, width, stride), x)


def test_pregrouped_plan_is_the_oracle_on_clustered_tensors():
    from dataclasses import replace

    from gridattn_fx.grid import GridPlan, MaskSpec
    from oracle import oracle_sdpa

    layout = TokenLayout(0, 6, 8, 0)
    q, k, v = (torch.randn(2, 3, 48, 8, dtype=torch.float64) for _ in range(3))
    plan = replace(GridPlan.for_tensors(q, k, None, layout, layout, 2), pregrouped=True)
    out = plan.grouped(*(cluster_axis(t, 2, 6, 8, 2) for t in (q, k, v)))
    expected = oracle_sdpa(q, k, v, q_layout=(0, 6, 8), k_layout=(0, 6, 8), stride=2)
    assert_close64(recover_axis(out, 2, 6, 8, 2), expected)
    with pytest.raises(ValueError, match="mask"):
        GridPlan(q_layout=layout, k_layout=layout, stride=(2, 2), ndim=4, mask=MaskSpec(ndim=4), pregrouped=True)
    with pytest.raises(ValueError, match="non-image tokens"):
        GridPlan(q_layout=TokenLayout(1, 6, 8, 0), k_layout=layout, stride=(2, 2), ndim=4, pregrouped=True)
    with pytest.raises(ValueError, match="multiple of the stride"):
        GridPlan(q_layout=TokenLayout(0, 5, 8, 0), k_layout=TokenLayout(0, 5, 8, 0), stride=(2, 2), ndim=4, pregrouped=True)


# --- where the regrouping goes, and exactness ------------------------------------------------------

def test_vit_block_clusters_before_the_norm_and_recovers_after_the_projection():
    model = build(ViT, n_cls=0, depth=2)
    inputs = (image(2, 16, 12),)
    report = check_against_oracle(model, inputs, (0, 8, 6))
    for (motion, why, gm), path in zip(motions(model, inputs), ("blocks.0.attn", "blocks.1.attn")):
        assert motion is not None, why
        # the block input feeds the residual too: cluster a copy for norm1 only
        assert ops(motion.entries, gm) in (["transpose"], ["add"])
        assert ops(motion.moved, gm) == sorted(
            ["layer_norm", "linear", "reshape", "permute", "unbind", "getitem", "getitem", "getitem"])
        assert ops(motion.below, gm) == ["linear", "reshape", "transpose"]
        assert op_name(motion.exit, gm) == "linear"
        assert "cluster at" in report.site(path + "$").regrouping
    assert "regrouping: cluster at" in str(report)


def test_segformer_keys_cluster_on_their_own_grid_after_the_reduction():
    model = build(SegFormerStage, depth=1, sr_ratio=2)
    inputs = (image(1, 24, 16),)
    check_against_oracle(model, inputs, (0, 12, 8), (0, 6, 4))
    ((motion, why, gm),) = motions(model, inputs)
    assert motion is not None, why
    entries = {op_name(n, gm): (axis, layout) for n, (axis, layout) in motion.entries.items()}
    # queries: the block's normed input (also read by the reduction conv); keys: the conv's tokens
    assert entries["layer_norm"] == (1, TokenLayout(0, 12, 8, 0))
    assert entries["reshape"] == (2, TokenLayout(0, 6, 4, 0))


def test_manual_attention_moves_too():
    model = build(ManualViT, n_cls=0)
    inputs = (image(1, 8, 8),)
    check_against_oracle(model, inputs, (0, 4, 4))
    ((motion, why, gm),) = motions(model, inputs)
    assert motion is not None, why


class DiffusersLikeAttention(nn.Module):
    """Separate to_q/to_k/to_v, view/transpose heads, cast, to_out + dropout (eval) + rescale."""

    def __init__(self, dim=DIM, heads=HEADS):
        super().__init__()
        self.heads = heads
        self.proj_in = nn.Conv2d(3, dim, 2, 2)
        self.norm = nn.LayerNorm(dim)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.1))
        self.oracle = None

    def forward(self, img):
        x = self.proj_in(img)
        b, c, h, w = x.shape
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        n = self.norm(x)
        q, k, v = (f(n).view(b, -1, self.heads, c // self.heads).transpose(1, 2)
                   for f in (self.to_q, self.to_k, self.to_v))
        o = attend(self, q, k, v).transpose(1, 2).reshape(b, -1, c).to(q.dtype)
        o = self.to_out(o) / 1.0
        return (o + x).reshape(b, h, w, c).permute(0, 3, 1, 2)


def test_diffusers_like_attention_clusters_the_norm_once_for_q_k_v():
    model = build(DiffusersLikeAttention)
    inputs = (image(2, 12, 16),)
    check_against_oracle(model, inputs, (0, 6, 8))
    ((motion, why, gm),) = motions(model, inputs)
    assert motion is not None, why
    assert ops(motion.entries, gm) == ["reshape"]  # x: read by the norm and by the residual
    assert ops(motion.moved, gm).count("linear") == 3
    assert ops(motion.below, gm) == ["dropout", "linear", "reshape", "to", "transpose", "truediv"]


# --- where the motion must stop -------------------------------------------------------------------

class Probe(nn.Module):
    """One attention over a conv image with a configurable op between the norm and the q/k/v projection."""

    def __init__(self, kind, dim=DIM, heads=HEADS, tokens=24):
        super().__init__()
        self.kind, self.heads = kind, heads
        self.embed = nn.Conv2d(3, dim, 2, 2)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim))
        self.oracle = None

    def forward(self, img):
        x = self.embed(img).flatten(2).transpose(1, 2)
        b, n, c = x.shape
        x = self.norm(x)
        extra = None
        if self.kind == "position-add":
            x = x + self.pos                       # differs per token: not per-token
        elif self.kind == "token-mean":
            x = x * x.mean(dim=1, keepdim=True)    # the mean reads x in raster order
        elif self.kind == "dropout-train":
            x = F.dropout(x, 0.5, training=True)
        elif self.kind == "inplace":
            x = x.clone()
            x.mul_(2.0)
        qkv = self.qkv(x)
        if self.kind == "second-reader":
            extra = qkv.sum(-1)                    # someone else reads the projection in raster order
        q, k, v = qkv.reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        o = attend(self, q, k, v).transpose(1, 2).reshape(b, n, c)
        return o if extra is None else (o, extra)


@pytest.mark.parametrize("kind,entry,not_moved", [
    ("position-add", "add", "add"),
    ("token-mean", "layer_norm", "mean"),
    ("second-reader", "linear", "linear"),
])
def test_motion_stops_at_ops_that_are_not_per_token_or_have_other_readers(kind, entry, not_moved):
    model = build(Probe, kind)
    inputs = (image(1, 12, 8),)
    ((motion, why, gm),) = motions(model, inputs)
    assert motion is not None, why
    assert entry in ops(motion.entries, gm)
    assert not_moved not in ops(motion.moved, gm)
    check_against_oracle(model, inputs, (0, 6, 4))


def test_no_motion_across_in_place_ops():
    model = build(Probe, "inplace")
    inputs = (image(1, 12, 8),)
    ((motion, why, gm),) = motions(model, inputs)
    assert motion is None and "in-place op" in why
    report = check_against_oracle(model, inputs, (0, 6, 4))
    assert "in-place op" in report.rewritten[0].regrouping


def test_random_ops_are_not_moved():
    model = Probe("dropout-train").double().train()
    inputs = (image(1, 12, 8),)
    ((motion, why, gm),) = motions(model, inputs)
    assert motion is not None, why
    assert "dropout" in ops(motion.entries, gm) and "dropout" not in ops(motion.moved, gm)


@pytest.mark.parametrize("model,inputs,reason", [
    (lambda: build(ViT, n_cls=1), (image(1, 8, 8),), "has non-image tokens"),
    (lambda: build(ViT, n_cls=0), (image(1, 10, 8),), "not a multiple of the stride"),
    (lambda: build(ViT, n_cls=0, transposed=True), (image(1, 8, 12),), "stored column-major"),
])
def test_sites_that_are_not_plain_images_keep_the_regrouping_at_the_call(model, inputs, reason):
    model = model()
    _, report = rewrite(model, inputs, stride=2)
    assert report.rewritten
    for s in report.rewritten:
        assert s.regrouping.startswith("regrouping at the attention call") and reason in s.regrouping


def test_masked_sites_keep_the_regrouping_at_the_call():
    model = build(ViT, n_cls=0, depth=1)
    inputs = (image(1, 8, 8), torch.randn(1, 1, 16, 16, dtype=torch.float64))
    _, report = rewrite(model, inputs, stride=2)
    assert "mask" in report.rewritten[0].regrouping


def test_option_and_compiled_backend():
    with pytest.raises(TypeError, match="move_regrouping"):
        GridAttnConfig(move_regrouping="yes")
    model = ViT(n_cls=0, depth=1).eval()
    inputs = (image(1, 16, 16, dtype=torch.float32),)
    _, report = rewrite(model, inputs, stride=2, move_regrouping=False)
    assert report.rewritten[0].regrouping == "regrouping at the attention call (move_regrouping=False)"

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="gridattn", options={"stride": 2, "min_image_tokens": 0})
    with torch.no_grad():
        got = compiled(*inputs)
        with oracle_mode(model, (0, 8, 8), None, 2):
            expected = model(*inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert "cluster at" in gridattn_fx.last_report().rewritten[0].regrouping

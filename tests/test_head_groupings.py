"""Per-head groupings: a site's heads split into equal contiguous sets, each set with its own
grouping (docs/design.md section 1), at the FLOPs of one grouping.

Rewritten sites equal the oracle with a per-head mask in float64 (tests/oracle.py, built without
the package); sites the option cannot serve stay dense, with a warning and a reason.
"""

import warnings

import pytest
import torch

from models import ViT, build, image
from oracle import assert_close64, assert_differs, oracle_mode, oracle_sdpa

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx import GridAttnConfig, TokenLayout  # noqa: E402
from gridattn_fx.grid import grouped_attention, masked_attention  # noqa: E402


def qkv(b, h, layout, d=8, kv_heads=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, layout.length, d, generator=g, dtype=torch.float64)
    hk = h if kv_heads is None else kv_heads
    k = torch.randn(b, hk, layout.length, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hk, layout.length, d, generator=g, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("layout,stride,grouping", [
    (TokenLayout(0, 8, 8, 0), 2, ("grid", "window")),
    (TokenLayout(1, 8, 6, 2), (2, 3), ("window", "grid")),
    (TokenLayout(2, 5, 7, 0), 2, ("grid", "window", "window", "grid")),     # padded tiles
    (TokenLayout(0, 6, 8, 0, True), 2, ("grid", "window")),                 # column-major
    (TokenLayout(1, image_shape=(4, 4, 6)), (2, 2, 2), ("window", "grid")),  # a video
])
def test_grouped_equals_oracle(layout, stride, grouping):
    q, k, v = qkv(2, 4, layout)
    out = grouped_attention(q, k, v, q_layout=layout, k_layout=layout, stride=stride, grouping=grouping)
    expected = oracle_sdpa(q, k, v, q_layout=layout, k_layout=layout, stride=stride, grouping=grouping)
    assert_close64(out, expected)
    assert_close64(masked_attention(q, k, v, q_layout=layout, k_layout=layout, stride=stride, grouping=grouping),
                   expected)
    # each head set is its own grouping's attention, not another's
    single = oracle_sdpa(q, k, v, q_layout=layout, k_layout=layout, stride=stride, grouping=grouping[0])
    assert_differs(out, single)


@pytest.mark.parametrize("kv_heads,gqa", [(2, True), (1, False)])
def test_gqa_and_broadcast_kv_keep_their_head_pairing(kv_heads, gqa):
    layout = TokenLayout(1, 6, 6, 0)
    q, k, v = qkv(2, 4, layout, kv_heads=kv_heads)
    out = grouped_attention(q, k, v, q_layout=layout, k_layout=layout, stride=2, grouping=("grid", "window"),
                            enable_gqa=gqa)
    kk, vv = (x.repeat_interleave(4 // kv_heads, dim=1) for x in (k, v))
    expected = oracle_sdpa(q, kk, vv, q_layout=layout, k_layout=layout, stride=2, grouping=("grid", "window"))
    assert_close64(out, expected)


def test_mask_without_head_axis():
    layout = TokenLayout(1, 6, 6, 0)
    q, k, v = qkv(2, 4, layout)
    mask = torch.randn(layout.length, layout.length, dtype=torch.float64)
    out = grouped_attention(q, k, v, mask, q_layout=layout, k_layout=layout, stride=2, grouping=("window", "grid"))
    expected = oracle_sdpa(q, k, v, mask, q_layout=layout, k_layout=layout, stride=2, grouping=("window", "grid"))
    assert_close64(out, expected)


@pytest.mark.parametrize("n_cls", [0, 1])
def test_backend_rewrites_vit_with_per_head_groupings(n_cls):
    m = build(ViT, heads=4, depth=2, n_cls=n_cls)
    x = image(2, 8, 8)
    out = torch.compile(m, backend="gridattn", options={"stride": 2, "min_image_tokens": 0,
                                                        "grouping": ["grid", "window"]})(x)
    report = gridattn_fx.last_report()
    assert report.failure is None and len(report.rewritten) == 2, str(report)
    row = report.site(r"blocks\.0\.attn")
    assert row.grouping == "grid|window" and "per-head groupings grid|window (heads 0-1 grid, heads 2-3 window)" \
        in row.reason, row.reason
    assert "grid|window 2x2" in str(report)
    assert row.flops_after * 4 == row.flops_before or n_cls  # the FLOPs of one grouping at stride 2
    with oracle_mode(m, (n_cls, 4, 4), stride=2, grouping=("grid", "window")):
        expected = m(x)
    assert_close64(out, expected)
    with oracle_mode(m, (n_cls, 4, 4), stride=2, grouping="window"):
        assert_differs(expected, m(x))


def test_per_site_per_head_groupings():
    m = build(ViT, heads=4, depth=2, n_cls=1)
    x = image(1, 8, 8)
    sites = {"blocks.1.attn": gridattn_fx.SiteOptions(grouping=("window", "grid"))}
    gm, report = gridattn_fx.rewrite(m, (x,), GridAttnConfig(stride=2, min_image_tokens=0, sites=sites))
    assert report.site(r"blocks\.0\.attn").grouping == "grid"
    assert report.site(r"blocks\.1\.attn").grouping == "window|grid"
    with oracle_mode(m, (1, 4, 4), stride=2, only=["blocks.0.attn"]), \
            oracle_mode(m, (1, 4, 4), stride=2, only=["blocks.1.attn"], grouping=("window", "grid")):
        expected = m(x)
    assert_close64(gm(x), expected)


def test_heads_that_do_not_split_leave_the_site_dense_with_a_warning():
    m = build(ViT, heads=2, depth=1, n_cls=1)
    x = image(1, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm, report = gridattn_fx.rewrite(m, (x,), GridAttnConfig(stride=2, min_image_tokens=0,
                                                                 grouping=("grid", "window", "grid")))
    row = report.site(r"blocks\.0\.attn")
    assert not report.rewritten and "2 query heads do not split into 3 equal sets" in row.reason, row.reason
    assert any("do not split into 3 equal sets" in str(w.message) for w in caught)
    assert_close64(gm(x), m(x))


def test_folded_heads_leave_the_site_dense():
    """(batch * heads, tokens, features): no head axis to split."""

    class Folded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 2, 2)

        def forward(self, x):
            t = self.conv(x).flatten(2).transpose(1, 2)   # (B, 64, 8)
            q = t.unflatten(-1, (2, 4)).transpose(1, 2).flatten(0, 1)   # heads folded into the batch (SAM)
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    m = Folded().double()
    x = image(1, 16, 16)
    gm, report = gridattn_fx.rewrite(m, (x,), GridAttnConfig(stride=2, min_image_tokens=0,
                                                             grouping=("grid", "window")))
    assert not report.rewritten, str(report)
    assert "no head axis to split" in report.sites[0].reason, report.sites[0].reason


def test_config_validates_per_head_groupings():
    assert GridAttnConfig(grouping=["grid", "window"]).grouping == ("grid", "window")
    assert GridAttnConfig(grouping=("window", "window")).grouping == "window"
    with pytest.raises(ValueError, match="at least one"):
        GridAttnConfig(grouping=())
    with pytest.raises(ValueError, match=r"grouping'\[1\]"):
        GridAttnConfig(grouping=("grid", "tiles"))
    with pytest.raises(TypeError, match="grouping"):
        GridAttnConfig(grouping=("grid", 2))


def test_shuffle_with_a_window_head_set_stays_dense_in_training():
    m = build(ViT, heads=4, depth=1, n_cls=1).train()
    x = image(1, 8, 8)
    gm, report = gridattn_fx.rewrite(m, (x,), GridAttnConfig(stride=2, min_image_tokens=0, distributing="shuffle",
                                                             grouping=("grid", "window")))
    assert not report.rewritten and "shuffle distributing is undefined for window grouping" in report.sites[0].reason

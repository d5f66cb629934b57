"""Shared pooled tokens (``shared_pool``): every image query also attends to the key image averaged
over p x p windows, in one softmax with its own group (docs/design.md section 1).

Rewritten sites equal tests/oracle.py's pooled oracle in float64; sites that cannot take them stay
dense with a warning and a reason; the report counts their FLOPs.
"""

import warnings

import pytest
import torch

from models import ViT, build, image
from oracle import assert_close64, oracle_pooled_sdpa

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx import GridAttnConfig, TokenLayout  # noqa: E402
from gridattn_fx.grid import grouped_attention, masked_attention  # noqa: E402


@pytest.mark.parametrize("layout,stride,grouping,pool", [
    (TokenLayout(0, 8, 8, 0), 2, "grid", 2),
    (TokenLayout(1, 8, 6, 2), (2, 3), "window", 2),
    (TokenLayout(0, 6, 8, 0, True), 2, ("grid", "window"), 2),      # column-major, per-head groupings
    (TokenLayout(2, 6, 10, 0), 4, "grid", 2),                        # padded groups
    (TokenLayout(1, image_shape=(2, 4, 6)), (1, 2, 2), "grid", 2),   # a video: frames pooled apart
    (TokenLayout(0, 8, 8, 0), 2, "grid", 4),
])
def test_grouped_equals_pooled_oracle(layout, stride, grouping, pool):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, layout.length, 8, generator=g, dtype=torch.float64) for _ in range(3))
    kwargs = dict(q_layout=layout, k_layout=layout, stride=stride, grouping=grouping)
    expected = oracle_pooled_sdpa(q, k, v, pool=pool, **kwargs)
    assert_close64(grouped_attention(q, k, v, shared_pool=pool, **kwargs), expected)
    assert_close64(masked_attention(q, k, v, shared_pool=pool, **kwargs), expected)


@pytest.mark.parametrize("compiled", [False, True])
def test_backend_rewrites_with_shared_tokens_and_counts_their_flops(compiled):
    m = build(ViT, heads=2, depth=2, n_cls=1)
    x = image(2, 8, 8)
    options = dict(stride=2, min_image_tokens=0, shared_pool=2)
    if compiled:
        out = torch.compile(m, backend="gridattn", options=options)(x)
        report = gridattn_fx.last_report()
    else:
        gm, report = gridattn_fx.rewrite(m, (x,), GridAttnConfig(**options))
        out = gm(x)
    assert len(report.rewritten) == 2, str(report)
    row = report.site(r"blocks\.0\.attn")
    assert "+ 4 shared tokens pooled over 2x2 windows" in row.reason and "2x2 +pool2" in str(report)
    # per (batch, head): 4 groups of 4 image queries x (cls + 4 own keys + 4 pooled), cls x 17 keys
    bh, d = 2 * 2, 8
    assert row.flops_after == 2 * bh * (4 * 4 * (1 + 4 + 4) + 1 * 17) * (d + d)
    gm_masked, _ = gridattn_fx.rewrite(m, (x,), GridAttnConfig(**options, implementation="masked"))
    assert_close64(out, gm_masked(x))


def test_sites_that_cannot_pool_stay_dense_with_a_warning():
    m = build(ViT, heads=2, depth=1, n_cls=1)
    x = image(1, 10, 10)   # a 5x5 image: no 2x2 windows tile it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm, report = gridattn_fx.rewrite(m, (x,), GridAttnConfig(stride=2, min_image_tokens=0, shared_pool=2))
    assert not report.rewritten
    assert "not a multiple of 2x2 windows" in report.sites[0].reason, report.sites[0].reason
    assert any("shared_pool=2" in str(w.message) for w in caught)
    assert_close64(gm(x), m(x))


def test_shared_pool_per_site_and_validation():
    m = build(ViT, heads=2, depth=2, n_cls=1)
    x = image(1, 8, 8)
    sites = {"blocks.1.attn": gridattn_fx.SiteOptions(shared_pool=2)}
    _, report = gridattn_fx.rewrite(m, (x,), GridAttnConfig(stride=2, min_image_tokens=0, sites=sites))
    assert report.site(r"blocks\.0\.attn").shared_pool == 0
    assert report.site(r"blocks\.1\.attn").shared_pool == 2
    for bad, error in ((1, ValueError), (-2, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="shared_pool"):
            GridAttnConfig(shared_pool=bad)

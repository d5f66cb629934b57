"""The policy (gridattn_fx/passes/policy.py): a list of small rules, each leaving a site dense with a
structured skip (gridattn_fx/reasons.py). Code reads the kind, the report prints the detail."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import SegFormerStage, ViT, build, image

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx.passes import policy  # noqa: E402
from gridattn_fx.reasons import Skip, SkipKind  # noqa: E402
from gridattn_fx.tools.report_cli import skip_label  # noqa: E402


def _site(report, pattern=r"blocks\.0\.attn"):
    return report.site(pattern)


@pytest.mark.parametrize("options,kind", [
    ({"stride": 1}, SkipKind.STRIDE_ONE),
    ({"min_image_tokens": 10_000}, SkipKind.TOO_FEW_TOKENS),
    ({"exclude": [r"blocks\.0"]}, SkipKind.NOT_SELECTED),
    ({"include": [r"nothing"]}, SkipKind.NOT_SELECTED),
    ({"stride": 8}, SkipKind.STRIDE_TOO_LARGE),
    ({"stride": 4}, SkipKind.DEGENERATE),
])
def test_each_rule_gives_its_kind(options, kind):
    model, x = build(ViT, depth=1, n_cls=1), image(1, 8, 8)   # 4x4 image tokens and a cls token
    _, report = gridattn_fx.rewrite(model, (x,), **{"min_image_tokens": 0, "stride": 2, **options})
    row = _site(report)
    assert row.decision == "skipped" and row.skip is kind, str(report)
    assert skip_label(row) == kind.value


def test_a_lost_layout_names_the_op_that_lost_it():
    class Scrambled(nn.Module):
        """A conv image whose tokens are reordered by a gather: no layout survives the indexing."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 2, 2)
            self.register_buffer("order", torch.randperm(16))

        def forward(self, x):
            t = self.conv(x).flatten(2).transpose(1, 2)[:, self.order]
            q = t.unflatten(-1, (2, 4)).transpose(1, 2)
            return F.scaled_dot_product_attention(q, q, q)

    _, report = gridattn_fx.rewrite(Scrambled(), (torch.randn(1, 3, 8, 8),), min_image_tokens=0)
    (row,) = report.sites
    assert row.skip is SkipKind.NO_QUERY_LAYOUT and row.lost_at == "getitem", str(report)
    assert skip_label(row) == "query image layout lost at indexing that drops or reorders image tokens"


def test_no_spatial_source_has_no_lost_op():
    class Tokens(nn.Module):
        def forward(self, t):
            q = t.unflatten(-1, (2, 4)).transpose(1, 2)
            return F.scaled_dot_product_attention(q, q, q)

    _, report = gridattn_fx.rewrite(Tokens(), (torch.randn(1, 16, 8),), min_image_tokens=0)
    (row,) = report.sites
    assert row.skip is SkipKind.NO_QUERY_LAYOUT and row.lost_at is None
    assert "no spatial source" in row.reason


def test_window_grouping_checks_its_own_tiles():
    """SegFormer-like reduced keys (8x8 queries, 4x4 keys): window stride 3 cuts the query axes into
    3 tiles of 3 but the key axes into 2 tiles of 2, so some query tiles would have no keys. Grid
    grouping has no tiles: the same stride leaves the site to the other rules."""
    model, x = build(SegFormerStage, sr_ratio=2), image(1, 16, 16)
    _, report = gridattn_fx.rewrite(model, (x,), min_image_tokens=0, stride=3, grouping="window")
    row = report.site(r"blocks\.0\.attn")
    assert row.skip is SkipKind.GROUPING and "queries without keys" in row.reason, str(report)
    _, report = gridattn_fx.rewrite(model, (x,), min_image_tokens=0, stride=3)
    assert report.site(r"blocks\.0\.attn").skip is not SkipKind.GROUPING


def test_rules_are_small_functions_returning_a_skip_or_none():
    for rule in (*policy.ELIGIBILITY, *policy.AT_STRIDE):
        assert callable(rule) and rule.__doc__ is None or isinstance(rule.__doc__, str)
    skip = Skip(SkipKind.CAUSAL, "causal attention: the grid semantics do not apply")
    assert str(skip) == skip.detail and skip.lost_at is None and skip.warning is None

"""Video (rank-3) sites through the policy and the rewrite, grid and window grouping.

The layout proof of T x H x W tokens (Conv3d sources, 5-D reshapes) is tested elsewhere
(layout/analysis.py); here the video layout is supplied to the pass by a test-only LayoutAnalysis
that answers, for the sequence axis of a flattened ``(B, [prefix +] T*H*W, C)`` input, the layout the
test declares. Everything after the proof runs as in production: the policy's decisions and
report text, the plan, the inserted regrouping (at the call and moved to the projections),
shuffle distributing in training. Outputs are compared with the oracle in float64.
"""

import pytest
import torch
import torch.nn as nn

from models import Block, DIM
from oracle import assert_close64, assert_differs, oracle_mode

gridattn_fx = pytest.importorskip("gridattn_fx")
import gridattn_fx.passes.pipeline as pipeline  # noqa: E402
from gridattn_fx import TokenLayout  # noqa: E402
from gridattn_fx.grid import draw_assignment  # noqa: E402
from gridattn_fx.layout.analysis import LayoutAnalysis  # noqa: E402


class VideoTokens(nn.Module):
    """Blocks over an already-flattened video sequence, with optional learned prefix tokens."""

    def __init__(self, depth=2, prefix=0):
        super().__init__()
        self.prefix = nn.Parameter(torch.randn(1, prefix, DIM)) if prefix else None
        self.blocks = nn.ModuleList([Block() for _ in range(depth)])

    def forward(self, x):
        if self.prefix is not None:
            x = torch.cat([self.prefix.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return x


@pytest.fixture
def declare(monkeypatch):
    """declare(layout): the pass takes ``layout`` for every sequence axis of its length."""
    def install(layout):
        class Declared(LayoutAnalysis):
            def layout(self, node, seq_dim):
                value = node.meta.get("val", node.meta.get("example_value"))
                if isinstance(value, torch.Tensor) and value.shape[seq_dim] == layout.length:
                    return layout, "declared by the test (video)"
                return super().layout(node, seq_dim)

            def same_image(self, query, key):
                return None
        monkeypatch.setattr(pipeline, "LayoutAnalysis", Declared)
    return install


def _run(layout, depth=2, train=False, **options):
    model = VideoTokens(depth, layout.prefix).double()
    model.train(train)
    x = torch.randn(2, layout.image_tokens, DIM, dtype=torch.float64)
    options.setdefault("min_image_tokens", 0)
    gm, report = gridattn_fx.rewrite(model, (x,), **options)
    return model, x, gm, report


CASES = [
    # layout, stride, grouping, what the report shows
    (TokenLayout(1, image_shape=(2, 4, 4)), 2, "grid", "stride 1x2x2"),
    (TokenLayout(1, image_shape=(2, 4, 4)), (2, 2), "window", "window grouping, stride 1x2x2"),
    (TokenLayout(0, image_shape=(4, 4, 4)), (2, 2, 2), "grid", "stride 2x2x2"),       # moved regrouping
    (TokenLayout(0, image_shape=(4, 4, 4)), (2, 2, 2), "window", "window grouping, stride 2x2x2"),
    (TokenLayout(2, image_shape=(3, 5, 6)), (2, 2, 2), "grid", "stride 2x2x2"),       # padding on every axis
    (TokenLayout(2, image_shape=(3, 5, 6)), (2, 2, 3), "window", "window grouping, stride 2x2x3"),
]


@pytest.mark.parametrize("layout,stride,grouping,shown", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_video_sites_match_the_oracle(declare, layout, stride, grouping, shown):
    declare(layout)
    model, x, gm, report = _run(layout, stride=stride, grouping=grouping)
    assert len(report.rewritten) == 2, str(report)
    row = report.site(r"blocks\.0\.attn")
    assert f"image self-attention, {shown}" in row.reason, row.reason
    assert row.flops_after < row.flops_before and len(row.stride) == 3
    if layout.prefix == 0:  # no shared tokens: the regrouping moves to the projections
        assert row.regrouping.startswith("regrouping: cluster at"), row.regrouping
    with oracle_mode(model, layout, stride=stride, grouping=grouping):
        expected = model(x)
    assert_close64(gm(x), expected)
    with oracle_mode(model, layout, stride=1):
        assert_differs(expected, model(x))


def test_video_flops_are_equal_for_both_groupings(declare):
    layout = TokenLayout(1, image_shape=(3, 5, 6))
    declare(layout)
    flops = []
    for grouping in ("grid", "window"):
        _, _, _, report = _run(layout, depth=1, stride=(2, 2, 2), grouping=grouping)
        flops.append(report.sites[0].flops_after)
    assert flops[0] == flops[1]


def test_stride_larger_than_a_video_axis(declare):
    layout = TokenLayout(0, image_shape=(2, 8, 8))
    declare(layout)
    model, x, gm, report = _run(layout, depth=1, stride=(4, 2, 2))
    row = report.sites[0]
    assert row.decision == "skipped", str(report)
    assert "query image 2x8x8 is smaller than the stride 4x2x2" in row.reason
    assert_close64(gm(x), model(x))


def test_video_shuffle_in_training(declare):
    layout = TokenLayout(1, image_shape=(2, 4, 4))
    declare(layout)
    model, x, gm, report = _run(layout, depth=1, train=True, stride=(2, 2, 2), distributing="shuffle")
    row = report.sites[0]
    assert row.decision == "rewritten" and "shuffle distributing (training)" in row.reason, str(report)
    torch.manual_seed(3)
    out = gm(x)
    torch.manual_seed(3)
    a = draw_assignment(layout, (2, 2, 2))
    assert a.shape == (1, 2, 2, 8)
    with oracle_mode(model, layout, stride=(2, 2, 2), assignment=(a, a)):
        assert_close64(out, model(x))


def test_window_video_shuffle_in_training_stays_dense(declare):
    layout = TokenLayout(1, image_shape=(2, 4, 4))
    declare(layout)
    model, x, gm, report = _run(layout, depth=1, train=True, stride=2, grouping="window", distributing="shuffle")
    row = report.sites[0]
    assert row.decision == "skipped" and "undefined for window grouping" in row.reason, str(report)
    assert_close64(gm(x), model(x))

"""Declared video layouts: ``ImageTokens(frames=..., height=..., width=...)`` for tokens packed outside
the model, as LTX-Video's transformer receives them ((B, T*H*W, C), frame by frame, each frame in
raster order). prepare() checks the declaration at every call (T*H*W must match the token count;
a ValueError names the input) and carries it to the sites as an N-D fact: the video site is
rewritten with the rank-generic grouping and equals the oracle (tests/oracle.py, N-D) in float64;
a single declared frame is an image.
"""

import copy

import pytest
import torch
import torch.nn as nn

import gridattn_fx
from gridattn_fx import ImageTokens, TokenLayout
from models import DIM, Block, build
from oracle import assert_close64, oracle_mode

OPTS = {"stride": 2, "min_image_tokens": 1, "strict": True}


class PackedVideoTransformer(nn.Module):
    """LTX-Video-like: packed latent tokens in, the latent grid given as ints."""

    def __init__(self, dim=DIM, depth=1):
        super().__init__()
        self.proj_in = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList([Block(dim) for _ in range(depth)])

    def forward(self, hidden_states, num_frames, height, width):
        x = self.proj_in(hidden_states)
        for blk in self.blocks:
            x = blk(x)
        return x


def _declaration():
    return ImageTokens(frames=lambda a: a["num_frames"], height=lambda a: a["height"], width=lambda a: a["width"])


def _reports():
    return [s for r in gridattn_fx.report_history(clear=True) for s in r.sites]


def _tokens(frames, height, width):
    return torch.randn(2, frames * height * width, DIM, dtype=torch.float64)


@pytest.mark.parametrize("stride,shown", [(2, "1x2x2"), ((2, 2, 2), "2x2x2")])
def test_declared_video_tokens_reach_the_site_as_a_video_layout(stride, shown):
    model = build(PackedVideoTransformer)
    ref = copy.deepcopy(model)
    x = _tokens(3, 4, 6)
    gridattn_fx.prepare(model, (x, 3, 4, 6), hidden_states=_declaration())
    assert gridattn_fx.prepared_layouts(model)["blocks.0"] == [(0, "0+3x4x6+0 tokens on axis 1 (declared)")]
    compiled = torch.compile(model, backend="gridattn", options=dict(OPTS, stride=stride))
    gridattn_fx.report_history(clear=True)
    with torch.no_grad():
        got = compiled(x, 3, 4, 6)
    (site,) = _reports()
    layout = TokenLayout(0, image_shape=(3, 4, 6))
    assert site.q_layout == layout and site.layout_source == "declared"
    assert site.decision == "rewritten" and f"stride {shown}" in site.reason, site
    with oracle_mode(ref, layout, stride=stride), torch.no_grad():
        assert_close64(got, ref(x, 3, 4, 6))


def test_a_single_declared_frame_is_an_image_and_is_rewritten():
    model = build(PackedVideoTransformer)
    ref = copy.deepcopy(model)
    x = _tokens(1, 8, 6)
    gridattn_fx.prepare(model, (x, 1, 8, 6), hidden_states=_declaration())
    compiled = torch.compile(model, backend="gridattn", options=OPTS)
    gridattn_fx.report_history(clear=True)
    with torch.no_grad():
        got = compiled(x, 1, 8, 6)
    (site,) = _reports()
    assert site.q_layout == TokenLayout(0, 8, 6) and site.decision == "rewritten", site
    with oracle_mode(ref, (0, 8, 6), stride=2), torch.no_grad():
        assert_close64(got, ref(x, 1, 8, 6))


def test_video_declarations_are_checked():
    model = build(PackedVideoTransformer)
    x = _tokens(3, 4, 6)
    with pytest.raises(ValueError, match=r"'hidden_states'.*3x4x6 video.*72 tokens.*holds 144"):
        gridattn_fx.prepare(model, (torch.cat([x, x], 1), 3, 4, 6), hidden_states=_declaration())
    with pytest.raises(ValueError, match=r"'hidden_states'.*frames"):
        gridattn_fx.prepare(model, (x, 0, 4, 6), hidden_states=_declaration())
    with pytest.raises(ValueError, match="ImageTokens.frames"):
        ImageTokens(frames=0, height=4, width=6)
    with pytest.raises(TypeError, match="ImageTokens.frames"):
        ImageTokens(frames=1.5, height=4, width=6)
    assert not hasattr(model, "_gridattn_prepared")
    gridattn_fx.prepare(model, (x, 3, 4, 6), hidden_states=ImageTokens(frames=3, height=4, width=6))
    with pytest.raises(ValueError, match="'hidden_states'"):  # checked at every call
        model(_tokens(2, 4, 6), 2, 4, 6)

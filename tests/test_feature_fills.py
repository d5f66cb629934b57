"""Fresh tensors filled along trailing axes (layout/analysis.py ``_feature_fills``).

Interleaved rotary embeddings write their output into a new tensor, feature slice by feature slice
(diffusers' Wan: ``out = torch.empty_like(x); out[..., 0::2] = ...; out[..., 1::2] = ...``). Such a
fill keeps every token where it is, so the filled tensor has its values' layout and the video site
is rewritten (float64 against the oracle). Writes that index the token axis, a fill read half-way,
or a value whose layout is lost leave the site untouched.
"""

import pytest
import torch
import torch.nn as nn

from models import build
from oracle import assert_close64, assert_differs, assert_equal_exact, oracle_mode

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx import TokenLayout  # noqa: E402

HEADS, HEAD_DIM = 2, 8
VIDEO = (2, 4, 4)   # frames, rows, columns after the (1, 2, 2) patch embedding


class RopeFillVideo(nn.Module):
    """Conv3d patches -> tokens -> q, k, v -> interleaved RoPE written into a fresh tensor -> SDPA."""

    def __init__(self, fill="features"):
        super().__init__()
        dim = HEADS * HEAD_DIM
        self.fill = fill
        self.patch = nn.Conv3d(3, dim, (1, 2, 2), (1, 2, 2))
        self.qkv = nn.Linear(dim, 3 * dim)
        n = VIDEO[0] * VIDEO[1] * VIDEO[2]
        angles = torch.randn(n, 1, HEAD_DIM // 2)   # per token (varies along the sequence), like RoPE
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())
        self.oracle = None

    def rope(self, x):  # x: (B, N, heads, d)
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.empty_like(x)
        if self.fill == "token-axis":  # swaps even and odd tokens: a real reordering
            out[..., 0::2, :, :] = x[:, 1::2]
            out[..., 1::2, :, :] = x[:, 0::2]
            return out
        out[..., 0::2] = x1 * self.cos - x2 * self.sin
        if self.fill == "read-between":
            x = x + out.sum()  # reads the half-written tensor
        second = x1 * self.sin + x2 * self.cos
        if self.fill == "lost-value":
            second = second.flip(1)  # the tokens of the second half in reverse order
        out[..., 1::2] = second
        return out

    def forward(self, video):
        from models import attend

        x = self.patch(video).flatten(2).transpose(1, 2)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, HEAD_DIM).unbind(2)
        q, k = self.rope(q), self.rope(k)
        o = attend(self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return o.transpose(1, 2).reshape(b, n, c)


def _inputs():
    return (torch.randn(1, 3, VIDEO[0], 2 * VIDEO[1], 2 * VIDEO[2], dtype=torch.float64),)


@pytest.mark.parametrize("stride", [2, (2, 2, 2)], ids=["s2", "s2x2x2"])
def test_rope_fill_keeps_the_video_layout(stride):
    model, inputs = build(RopeFillVideo), _inputs()
    gm, report = gridattn_fx.rewrite(model, inputs, stride=stride, min_image_tokens=0)
    layout = TokenLayout(0, image_shape=VIDEO)
    (site,) = report.sites
    assert (site.decision, site.q_layout, site.k_layout) == ("rewritten", layout, layout), str(report)
    with oracle_mode(model, layout, layout, stride):
        expected = model(*inputs)
    got = gm(*inputs)
    assert_close64(got, expected)
    assert_differs(got, model(*inputs))


@pytest.mark.parametrize("fill", ["token-axis", "read-between", "lost-value"])
def test_fills_that_can_move_tokens_leave_the_site_alone(fill):
    model, inputs = build(RopeFillVideo, fill), _inputs()
    gm, report = gridattn_fx.rewrite(model, inputs, stride=2, min_image_tokens=0)
    (site,) = report.sites
    assert site.decision == "skipped" and "no proven image layout" in site.reason, str(report)
    assert_equal_exact(gm(*inputs), model(*inputs))

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


# --- a sequence filled part by part along the token axis (Lumina 2's joint sequence) -----------------

class JointFill(nn.Module):
    """Conv patches -> tokens; text and image tokens written into a fresh zero sequence (text first,
    then the image, then padding) -> SDPA. ``case`` varies the writes."""

    def __init__(self, case="joint", text=3, pad=2):
        super().__init__()
        dim = HEADS * HEAD_DIM
        self.case, self.text, self.pad = case, text, pad
        self.patch = nn.Conv2d(3, dim, 2, 2)
        self.txt = nn.Linear(dim, dim)
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, img, text, attn_mask=None):
        x = self.patch(img).flatten(2).transpose(1, 2)
        b, n, c = x.shape
        t = self.txt(text)
        joint = x.new_zeros(b, self.text + n + self.pad, c)
        if self.case == "batch-of-two":   # only entry 0 is written: entry 1 holds zeros
            joint[0, :self.text] = t[0]
            joint[0, self.text:self.text + n] = x[0]
        else:
            joint[:, :self.text] = t
            joint[:, self.text:self.text + n] = x
        if self.case == "overlap":   # a later write over two image tokens
            joint[:, self.text + 1:self.text + 3] = t[:, :2]
        q, k, v = self.qkv(joint).reshape(b, -1, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return out.transpose(1, 2).flatten(2)


@pytest.mark.parametrize("case", ["joint", "overlap", "batch-of-two"])
def test_sequence_filled_along_the_token_axis(case):
    from oracle import log_grid_mask

    torch.manual_seed(0)
    model = JointFill(case).double().eval()
    batch = 2 if case == "batch-of-two" else 1
    img, text = torch.randn(batch, 3, 8, 12, dtype=torch.float64), torch.randn(batch, 3, HEADS * HEAD_DIM,
                                                                               dtype=torch.float64)
    gm, report = gridattn_fx.rewrite(model, (img, text), stride=2, min_image_tokens=1)
    (site,) = report.sites
    with torch.no_grad():
        got, plain = gm(img, text), model(img, text)
    if case != "joint":
        assert site.decision == "skipped" and "setitem" in site.reason, site.reason
        assert_equal_exact(got, plain)
        return
    assert site.decision == "rewritten" and str(site.q_layout) == "3+4x6+2", str(report)
    mask = log_grid_mask((3, 4, 6, 2), (3, 4, 6, 2), 2)
    with torch.no_grad():
        assert_close64(got, model(img, text, attn_mask=mask))
    assert_differs(got, plain)

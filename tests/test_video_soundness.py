"""Video layouts the differential fuzzer (tests/fuzz, video cases) found or guards, minimized.

* frames folded into the batch and merged back into the sequence, then an ``nn.MultiheadAttention``
  (its sequence-first transposes swap the batch axis with the merged token axis and back): the
  stream after ``x + mha(x)`` is still the video, and a later site is rewritten (it used to lose the
  layout: the two swaps were recorded as two different image identities and mixed by the add);
* frames merged into the sequence, keys with a register token appended (queries: the merged
  tokens as they are): one video on both sides, rewritten (the key side used to read the frames as
  merged at the cat and the query side not yet, so the two looked like different images);
* a video whose frames and rows are scrambled by a reshape (not a permute) is no video: untouched;
* keys made by a conv over the video's tokens reshaped in a different order than they are stored
  are another image: cross-attention, untouched.

Rewritten sites are compared with the independent oracle (tests/oracle.py, N-D masks) in float64,
skipped ones with the untouched model.
"""

import pytest
import torch
import torch.nn as nn

from models import DIM, Attention, attend, build
from oracle import assert_close64, assert_differs, assert_equal_exact, oracle_mode

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx import TokenLayout  # noqa: E402


def rewrite(model, inputs, **opts):
    opts.setdefault("min_image_tokens", 0)
    gm, report = gridattn_fx.rewrite(model, inputs, **opts)
    assert report.failure is None, report.failure
    return gm, report


def site(report, path):
    (s,) = [s for s in report.sites if s.module_path == path]
    return s


def video(batch, frames, height, width):
    return torch.randn(batch, 3, frames, height, width, dtype=torch.float64)


class FramesMergedThroughMHA(nn.Module):
    """Conv3d, frames folded into the batch, per-frame tokens merged back into (B, T*H*W, C); an
    nn.MultiheadAttention residual block; then a self-attention site over the stream."""

    def __init__(self, batch_first, dim=DIM):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Conv3d(3, dim, (1, 2, 2), (1, 2, 2))
        self.mha = nn.MultiheadAttention(dim, 2, batch_first=batch_first)
        self.attn = Attention(dim)

    def forward(self, x):
        y = self.embed(x)
        B, C, T, H, W = y.shape
        t = y.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W).flatten(2).transpose(1, 2).reshape(B, T * H * W, C)
        q = t if self.batch_first else t.transpose(0, 1)
        o, _ = self.mha(q, q, q, need_weights=False)
        t = t + (o if self.batch_first else o.transpose(0, 1))
        return self.attn(t)


@pytest.mark.parametrize("batch_first", [True, False])
def test_frames_merged_video_keeps_its_layout_through_multihead_attention(batch_first):
    model = build(FramesMergedThroughMHA, batch_first)
    x = video(2, 3, 8, 12)
    stride = (2, 2, 2)
    gm, report = rewrite(model, (x,), stride=stride, include=[r"^attn$"])
    layout = TokenLayout(0, image_shape=(3, 4, 6))
    s = site(report, "attn")
    assert s.decision == "rewritten" and s.q_layout == layout == s.k_layout, str(report)
    with torch.no_grad(), oracle_mode(model, layout, stride=stride, only=["attn"]):
        ref = model(x)
    with torch.no_grad():
        assert_close64(gm(x), ref)
        assert_differs(ref, model(x))


class FramesMergedKeysWithRegister(nn.Module):
    """CogVideoX's embedding (a Conv2d per frame, frames folded into the batch, merged back with
    ``view(B, T, N, C).flatten(1, 2)``); keys and values also see a learned register token."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 2, 2)
        self.reg_token = nn.Parameter(torch.randn(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.oracle = None

    def forward(self, clip):
        B, C3, T, H, W = clip.shape
        frames = self.proj(clip.permute(0, 2, 1, 3, 4).reshape(B * T, C3, H, W))
        _, C, h, w = frames.shape
        tokens = frames.flatten(2).transpose(1, 2).view(B, T, h * w, C).flatten(1, 2)
        keys = torch.cat([tokens, self.reg_token.expand(B, -1, -1)], dim=1)
        q = self.q(tokens).view(B, -1, 2, C // 2).transpose(1, 2)
        k, v = self.kv(keys).view(B, -1, 2, 2, C // 2).permute(2, 0, 3, 1, 4).unbind(0)
        return attend(self, q, k, v, None, False, None).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("batch", [1, 2])
def test_frames_merged_queries_and_keys_with_a_register_are_one_video(batch):
    model = build(FramesMergedKeysWithRegister)
    x = video(batch, 4, 12, 6)
    stride = (2, 2, 1)
    gm, report = rewrite(model, (x,), stride=stride)
    q_layout, k_layout = TokenLayout(0, image_shape=(4, 6, 3)), TokenLayout(0, image_shape=(4, 6, 3), suffix=1)
    (s,) = report.sites
    assert s.decision == "rewritten" and (s.q_layout, s.k_layout) == (q_layout, k_layout), str(report)
    with torch.no_grad(), oracle_mode(model, q_layout, k_layout, stride=stride):
        ref = model(x)
    with torch.no_grad():
        assert_close64(gm(x), ref)
        assert_differs(ref, model(x))


class ScrambledVideo(nn.Module):
    """(B, T, H, W, C) read as (B, H, T, W, C) without moving data, then permuted back to
    (B, T, H, W, C): rows and frames scrambled (T != H), not a raster of the video."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.embed = nn.Conv3d(3, dim, (1, 2, 2), (1, 2, 2))
        self.attn = Attention(dim)

    def forward(self, x):
        y = self.embed(x).permute(0, 2, 3, 4, 1)
        B, T, H, W, C = y.shape
        return self.attn(y.reshape(B, H, T, W, C).permute(0, 2, 1, 3, 4).reshape(B, T * H * W, C))


def test_scrambled_frames_and_rows_are_not_a_video():
    model = build(ScrambledVideo)
    x = video(1, 2, 6, 8)
    gm, report = rewrite(model, (x,), stride=(2, 2, 2))
    s = site(report, "attn")
    assert s.decision == "skipped" and s.q_layout is None, str(report)
    with torch.no_grad():
        assert_equal_exact(gm(x), model(x))


class KeysFromReorderedTokens(nn.Module):
    """Queries: the video's tokens stored (t, w, h). Keys: those tokens reshaped as if stored
    (t, h, w) and convolved (a new, different image when H != W)."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.embed = nn.Conv3d(3, dim, (1, 2, 2), (1, 2, 2))
        self.conv = nn.Conv3d(dim, dim, 3, padding=1, groups=dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.oracle = None

    def forward(self, x):
        y = self.embed(x)
        B, C, T, H, W = y.shape
        tokens = y.permute(0, 2, 4, 3, 1).reshape(B, T * W * H, C)          # (t, w, h)
        keys = self.conv(tokens.transpose(1, 2).reshape(B, C, T, H, W)).flatten(2).transpose(1, 2)
        q = self.q(tokens).view(B, -1, 2, C // 2).transpose(1, 2)
        k, v = self.kv(keys).view(B, -1, 2, 2, C // 2).permute(2, 0, 3, 1, 4).unbind(0)
        return attend(self, q, k, v, None, False, None).transpose(1, 2).flatten(2)


def test_keys_from_a_conv_of_reordered_tokens_are_another_image():
    model = build(KeysFromReorderedTokens)
    x = video(1, 2, 8, 12)
    gm, report = rewrite(model, (x,), stride=2)
    (s,) = report.sites
    assert s.decision == "skipped" and "different images" in s.reason, str(report)
    with torch.no_grad():
        assert_equal_exact(gm(x), model(x))

"""Video token layouts (T x H x W) proven from the graph's dataflow (layout/analysis.py).

Sources: a Conv3d (or 3-D pool) output; frames folded into the batch and merged back into the
sequence (CogVideoX); 5-D reshapes and permutes; text prefix tokens. The tests assert the proven
layouts (``site.q_layout`` in the report) and that every rewritten site - video sites with the
rank-generic grouping (gridattn_fx/grid/), and the 2-D cases around video: a single-frame video,
per-frame spatial attention with the frames in the batch - equals the oracle (tests/oracle.py,
N-D masks) in float64. Cross-attention to text keys stays untouched.
"""

import pytest
import torch
import torch.nn as nn

from models import DIM, Attention, CrossAttention, build
from oracle import assert_close64, assert_differs, assert_equal_exact, oracle_mode

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx import TokenLayout  # noqa: E402


def rewrite(model, inputs, **opts):
    opts.setdefault("min_image_tokens", 0)
    opts.setdefault("stride", 2)
    return gridattn_fx.rewrite(model, inputs, **opts)


def site(report, path):
    (s,) = [s for s in report.sites if s.module_path == path]
    return s


def video_layout(frames, height, width, prefix=0, order=(0, 1, 2)):
    return TokenLayout(prefix, image_shape=(frames, height, width), order=order)


def expect_video_rewritten(report, path, layout, stride="1x2x2"):
    s = site(report, path)
    assert s.q_layout == layout, f"{path}: proven {s.q_layout!r}, expected {layout!r}\n{report}"
    assert s.decision == "rewritten" and f"stride {stride}" in s.reason, str(report)
    return s


def assert_matches_oracle(gm, model, inputs, layouts: dict, stride=2):
    """``gm`` equals the model with the oracle at the modules ``layouts`` names ({path: layout}),
    and the grid changed the result."""
    switched = [model.get_submodule(path) for path in layouts]
    for path, mod in zip(layouts, switched):
        mod.oracle = (layouts[path], layouts[path], stride)
    try:
        with torch.no_grad():
            ref = model(*inputs)
    finally:
        for mod in switched:
            mod.oracle = None
    with torch.no_grad():
        assert_close64(gm(*inputs), ref)
        assert_differs(ref, model(*inputs))


def video(batch, frames, height, width, channels=3):
    return torch.randn(batch, channels, frames, height, width, dtype=torch.float64)


class WanLike(nn.Module):
    """Wan: Conv3d patch embedding, ``flatten(2).transpose(1, 2)``, self-attention over the video
    tokens, cross-attention from the video tokens to text tokens (keys from text)."""

    def __init__(self, dim=DIM, patch=(1, 2, 2)):
        super().__init__()
        self.patch_embedding = nn.Conv3d(3, dim, patch, patch)
        self.text = nn.Linear(8, dim)
        self.self_attn = Attention(dim)
        self.cross_attn = CrossAttention(dim)

    def forward(self, x, context):
        x = self.patch_embedding(x).flatten(2).transpose(1, 2)
        x = x + self.self_attn(x)
        return x + self.cross_attn(x, self.text(context))


@pytest.mark.parametrize("stride,shown", [(2, "1x2x2"), ((2, 2, 2), "2x2x2")])
def test_wan_video_tokens_are_proven_t_by_h_by_w_and_rewritten(stride, shown):
    model = build(WanLike)
    inputs = (video(2, 4, 8, 12), torch.randn(2, 5, 8, dtype=torch.float64))
    gm, report = rewrite(model, inputs, stride=stride)
    layout = video_layout(4, 4, 6)
    s = expect_video_rewritten(report, "self_attn", layout, shown)
    assert "conv3d" in s.evidence
    cross = site(report, "cross_attn")
    assert cross.decision == "skipped" and cross.k_layout is None and "key" in cross.reason, str(report)
    assert_matches_oracle(gm, model, inputs, {"self_attn": layout}, stride)


def test_single_frame_video_is_an_image_and_is_rewritten():
    """T == 1: the frame axis is dropped where the fact is made; the policy sees a 2-D image."""
    model = build(WanLike)
    inputs = (video(2, 1, 8, 12), torch.randn(2, 5, 8, dtype=torch.float64))
    gm, report = rewrite(model, inputs)
    s = site(report, "self_attn")
    assert s.q_layout == TokenLayout(0, 4, 6) and s.decision == "rewritten", str(report)
    assert site(report, "cross_attn").decision == "skipped"
    with oracle_mode(model, (0, 4, 6), only=["self_attn"]):
        ref = model(*inputs)
    assert_close64(gm(*inputs), ref)
    assert_differs(ref, model(*inputs))


def test_temporal_patches_give_fewer_frames():
    model = build(WanLike, patch=(2, 2, 2))
    inputs = (video(1, 4, 8, 8), torch.randn(1, 5, 8, dtype=torch.float64))
    gm, report = rewrite(model, inputs)
    expect_video_rewritten(report, "self_attn", video_layout(2, 4, 4))
    assert_matches_oracle(gm, model, inputs, {"self_attn": video_layout(2, 4, 4)})


class CogVideoXLike(nn.Module):
    """CogVideoX's patch embedding: frames folded into the batch for a 2-D conv, split off again,
    merged into the sequence, then text tokens in front."""

    def __init__(self, dim=DIM, text_len=4):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 2, 2)
        self.text_proj = nn.Linear(8, dim)
        self.attn = Attention(dim)

    def forward(self, video_frames, text):
        B, F, C, H, W = video_frames.shape
        x = self.proj(video_frames.reshape(-1, C, H, W))
        x = x.view(B, F, *x.shape[1:])
        x = x.flatten(3).transpose(2, 3)   # (B, F, H*W, C)
        x = x.flatten(1, 2)                # (B, F*H*W, C)
        x = torch.cat([self.text_proj(text), x], dim=1).contiguous()
        return self.attn(x)


def test_cogvideox_frames_merged_into_the_sequence_behind_text():
    model = build(CogVideoXLike)
    inputs = (torch.randn(2, 3, 3, 8, 12, dtype=torch.float64), torch.randn(2, 4, 8, dtype=torch.float64))
    gm, report = rewrite(model, inputs)
    layout = video_layout(3, 4, 6, prefix=4)
    s = expect_video_rewritten(report, "attn", layout)
    assert "conv2d" in s.evidence
    assert_matches_oracle(gm, model, inputs, {"attn": layout})


class PerFrameFromConv3d(nn.Module):
    """Spatial attention per frame: a Conv3d output with its frames folded into the batch."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.embed = nn.Conv3d(3, dim, (1, 2, 2), (1, 2, 2))
        self.spatial = Attention(dim)
        self.temporal_view = Attention(dim)

    def forward(self, x):
        y = self.embed(x)                                  # (B, C, T, H, W)
        B, C, T, H, W = y.shape
        frames = y.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)
        t = frames.flatten(2).transpose(1, 2)              # (B*T, H*W, C)
        t = t + self.spatial(t)
        v = t.reshape(B, T * H * W, C)                     # frames merged back: the video again
        return self.temporal_view(v)


def test_per_frame_attention_of_a_conv3d_video_and_the_merged_video():
    model = build(PerFrameFromConv3d)
    x = video(2, 3, 8, 12)
    gm, report = rewrite(model, (x,))
    s = site(report, "spatial")
    assert s.q_layout == TokenLayout(0, 4, 6) and s.decision == "rewritten", str(report)
    expect_video_rewritten(report, "temporal_view", video_layout(3, 4, 6))
    assert_matches_oracle(gm, model, (x,), {"spatial": TokenLayout(0, 4, 6), "temporal_view": video_layout(3, 4, 6)})


class FactorizedTokens(nn.Module):
    """Video tokens split per frame (``view(B, T, N, C).flatten(0, 1)``: frames into the batch),
    and a 5-D reshape/permute that stores the video column-major within each frame."""

    def __init__(self, dim=DIM, one_step=False):
        super().__init__()
        self.one_step = one_step
        self.embed = nn.Conv3d(3, dim, (1, 2, 2), (1, 2, 2))
        self.spatial = Attention(dim)
        self.transposed_video = Attention(dim)

    def forward(self, x):
        y = self.embed(x)
        B, C, T, H, W = y.shape
        v = y.flatten(2).transpose(1, 2)                        # (B, T*H*W, C)
        if self.one_step:  # "b (t n) c -> (b t) n c"
            f = v.reshape(B * T, H * W, C)
        else:
            f = v.view(B, T, H * W, C).flatten(0, 1)           # (B*T, H*W, C)
        f = self.spatial(f).view(B, T * H * W, C)
        cols = f.view(B, T, H, W, C).permute(0, 1, 3, 2, 4).reshape(B, T * W * H, C)
        return self.transposed_video(cols)


@pytest.mark.parametrize("one_step", [False, True])
def test_frames_split_into_the_batch_and_a_5d_permute(one_step):
    model = build(FactorizedTokens, one_step=one_step)
    x = video(2, 3, 8, 12)
    gm, report = rewrite(model, (x,))
    s = site(report, "spatial")
    assert s.q_layout == TokenLayout(0, 4, 6) and s.decision == "rewritten", str(report)
    transposed = video_layout(3, 4, 6, order=(0, 2, 1))
    expect_video_rewritten(report, "transposed_video", transposed)
    assert_matches_oracle(gm, model, (x,), {"spatial": TokenLayout(0, 4, 6), "transposed_video": transposed})


class MixedFrames(nn.Module):
    """Two different videos' frames merged into one sequence axis with the channel axis (not a
    batch axis) in front of the tokens: not a video, not proven."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 2, 2)
        self.attn = Attention(4)

    def forward(self, img):
        y = self.embed(img)                          # (B, C, H, W)
        B, C, H, W = y.shape
        t = y.reshape(B, C // 4, 4, H * W).transpose(2, 3).reshape(B, C // 4 * H * W, 4)
        return self.attn(t)


def test_channels_merged_in_front_of_the_tokens_are_not_frames():
    model = build(MixedFrames)
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    gm, report = rewrite(model, (x,))
    s = site(report, "attn")
    assert s.q_layout is None and s.decision == "skipped", str(report)
    assert_equal_exact(gm(x), model(x))


class VideoSelfAttention(nn.Module):
    def __init__(self, dim=DIM):
        super().__init__()
        self.patch_embedding = nn.Conv3d(3, dim, (1, 2, 2), (1, 2, 2))
        self.attn = Attention(dim)

    def forward(self, x):
        return self.attn(self.patch_embedding(x).flatten(2).transpose(1, 2))


def test_symbolic_video_sizes_are_rewritten_with_the_static_semantics():
    """Frames, rows and columns as symbols (torch.compile(dynamic=True)): the site is rewritten once
    for every size its guards accept, and each call equals the oracle at its own sizes."""
    from test_dynamic_shapes import PassBackend  # the pass without inductor: seconds, not minutes

    model = build(VideoSelfAttention)
    backend = PassBackend(stride=2, min_image_tokens=0)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for frames, height, width in ((2, 8, 12), (3, 12, 8)):
        x = video(1, frames, height, width)
        with torch.no_grad():
            got = compiled(x)
        layout = video_layout(frames, height // 2, width // 2)
        with oracle_mode(model, layout), torch.no_grad():
            assert_close64(got, model(x))
    sites = [s for r in backend.reports for s in r.sites]
    assert sites and all(s.decision == "rewritten" and "symbolic sizes" in s.reason for s in sites), sites


class StackedPair(nn.Module):
    """Two images (feature matching) stacked along a new axis and merged into one sequence, the way
    frames are: they are two images, not the frames of one video (the cross-image rule)."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 2, 2)
        self.attn = Attention(dim)

    def forward(self, a, b):
        x = torch.stack([self.embed(a), self.embed(b)], 1)      # (B, 2, C, h, w)
        return self.attn(x.flatten(3).transpose(2, 3).flatten(1, 2))


def test_two_images_merged_into_one_sequence_are_not_a_video():
    model = build(StackedPair)
    inputs = (torch.randn(2, 3, 8, 12, dtype=torch.float64), torch.randn(2, 3, 8, 12, dtype=torch.float64))
    gm, report = rewrite(model, inputs)
    s = site(report, "attn")
    assert s.q_layout is None and s.decision == "skipped" and "merged with the batch" in s.reason, str(report)
    assert_equal_exact(gm(*inputs), model(*inputs))


class DividedSpaceTime(nn.Module):
    """TimeSformer's divided space-time attention on frames folded into the batch for a 2-D patch
    embedding: the temporal half folds positions into the batch (``(B * N, T, C)``), its output is
    merged back *behind* each position (``view(B, N, T, C).reshape(B, N * T, C)``: time fastest),
    and the spatial half splits that video again (``reshape(B, H, W, T, C).permute(...)``)."""

    def __init__(self, dim=DIM, joint=False):
        super().__init__()
        self.joint = joint
        self.patch = nn.Conv2d(3, dim, 2, 2)
        self.temporal = Attention(dim)
        self.spatial = Attention(dim)

    def forward(self, video):   # (B, T, 3, H, W)
        b, t = video.shape[:2]
        x = self.patch(video.flatten(0, 1))                  # (B*T, C, h, w)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)                      # (B*T, N, C)
        x = x.reshape(b, t, h * w, -1).permute(0, 2, 1, 3).reshape(b * h * w, t, -1)
        x = (x + self.temporal(x)).view(b, h * w, t, -1).reshape(b, h * w * t, -1)   # (B, N*T, C)
        if self.joint:
            return x + self.spatial(x)                       # joint space-time over the whole video
        s = x.reshape(b, h, w, t, -1).permute(0, 3, 1, 2, 4).reshape(b * t, h * w, -1)
        return s + self.spatial(s)


@pytest.mark.parametrize("joint", [False, True])
def test_divided_space_time_frames_merged_behind_the_tokens(joint):
    model = build(DividedSpaceTime, joint=joint)
    inputs = (torch.randn(2, 3, 3, 8, 12, dtype=torch.float64),)
    gm, report = rewrite(model, inputs)
    temporal = site(report, "temporal")
    assert temporal.decision == "skipped" and "temporal attention" in temporal.reason, str(report)
    assert "window" not in temporal.reason
    if joint:   # a 3 x 4 x 6 video stored position-major, time fastest
        layout = video_layout(3, 4, 6, order=(1, 2, 0))
        expect_video_rewritten(report, "spatial", layout, "1x2x2")
    else:       # each frame an image of its own
        layout = TokenLayout(0, 4, 6, 0)
        s = site(report, "spatial")
        assert s.q_layout == layout and s.decision == "rewritten", str(report)
    assert_matches_oracle(gm, model, inputs, {"spatial": layout})


def test_frames_behind_tokens_of_two_different_images_are_not_a_video():
    """The axis merged behind the tokens must index frames of one source tensor: two images
    concatenated along the batch and interleaved token by token are no video."""

    class Interleaved(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, DIM, 2, 2)
            self.attn = Attention(DIM)

        def forward(self, a, b):
            x = torch.cat([self.patch(a), self.patch(b)]).flatten(2).transpose(1, 2)   # (2, N, C)
            x = x.unsqueeze(0).permute(0, 2, 1, 3).reshape(1, -1, DIM)                 # (1, N*2, C)
            return self.attn(x)

    model = build(Interleaved)
    inputs = (torch.randn(1, 3, 8, 8, dtype=torch.float64), torch.randn(1, 3, 8, 8, dtype=torch.float64))
    gm, report = rewrite(model, inputs)
    assert [s.decision for s in report.sites] == ["skipped"], str(report)
    with torch.no_grad():
        assert_equal_exact(gm(*inputs), model(*inputs))


class TemporalBlocks(nn.Module):
    """UNet3D's layers around its spatial attention: frames folded into the batch for a Conv2d, then
    a temporal conv (GroupNorm over the 5-D video, a Conv3d over frames, added to its per-frame
    residual) and a temporal transformer (positions folded into the batch, attention over frames,
    added back), then per-frame spatial self-attention."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.conv_in = nn.Conv2d(3, dim, 2, 2)
        self.norm = nn.GroupNorm(4, dim)
        self.temporal_conv = nn.Conv3d(dim, dim, (3, 1, 1), padding=(1, 0, 0))
        self.temporal = Attention(dim)
        self.spatial = Attention(dim)

    def forward(self, video):   # (B, T, 3, H, W)
        b, t = video.shape[:2]
        x = self.conv_in(video.flatten(0, 1))                                       # (B*T, C, h, w)
        c, h, w = x.shape[1:]
        v = x.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)                         # (B, C, T, h, w)
        v = self.temporal_conv(self.norm(v))
        x = x + v.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        s = x.reshape(b, t, c, h * w).permute(0, 3, 1, 2).reshape(b * h * w, t, c)  # positions in the batch
        s = s + self.temporal(s)
        x = s.reshape(b, h * w, t, c).permute(0, 2, 1, 3).reshape(b * t, h * w, c)  # frames in the batch
        return x + self.spatial(x)


def test_spatial_attention_after_temporal_convs_and_temporal_attention():
    model = build(TemporalBlocks)
    inputs = (torch.randn(2, 3, 3, 8, 12, dtype=torch.float64),)
    gm, report = rewrite(model, inputs)
    temporal, spatial = site(report, "temporal"), site(report, "spatial")
    assert temporal.decision == "skipped" and "temporal attention" in temporal.reason, str(report)
    layout = TokenLayout(0, 4, 6, 0)
    assert spatial.decision == "rewritten" and spatial.q_layout == layout, str(report)
    assert_matches_oracle(gm, model, inputs, {"spatial": layout})


class FramesFlattenedInFront(nn.Module):
    """EasyAnimate: a Conv2d over frames folded into the batch, the frames unfolded again and
    flattened with rows and columns into the sequence, time slowest. ``two_images``: the "frames"
    are two different images concatenated along the batch, which is no video."""

    def __init__(self, dim=DIM, two_images=False):
        super().__init__()
        self.two_images = two_images
        self.proj = nn.Conv2d(3, dim, 2, 2)
        self.attn = Attention(dim)

    def forward(self, video, other):   # (B, 3, T, H, W)
        b, t = video.shape[0], video.shape[2]
        if self.two_images:
            y = torch.cat([self.proj(video[:, :, 0]), self.proj(other)])               # (2B, C, h, w)
            t = 2
        else:
            y = self.proj(video.permute(0, 2, 1, 3, 4).flatten(0, 1))                   # (B*T, C, h, w)
        y = y.unflatten(0, (t, b) if self.two_images else (b, t))
        y = y.transpose(0, 1) if self.two_images else y                                # (B, T, C, h, w)
        x = y.permute(0, 2, 1, 3, 4).flatten(2, 4).transpose(1, 2)                     # (B, T*h*w, C)
        return x + self.attn(x)


@pytest.mark.parametrize("two_images", [False, True])
def test_frames_flattened_in_front_of_rows_and_columns(two_images):
    model = build(FramesFlattenedInFront, two_images=two_images)
    inputs = (video(2, 3, 8, 12), torch.randn(2, 3, 8, 12, dtype=torch.float64))
    gm, report = rewrite(model, inputs)
    if two_images:
        assert site(report, "attn").decision == "skipped", str(report)
        with torch.no_grad():
            assert_equal_exact(gm(*inputs), model(*inputs))
        return
    layout = video_layout(3, 4, 6)
    expect_video_rewritten(report, "attn", layout)
    assert_matches_oracle(gm, model, inputs, {"attn": layout})

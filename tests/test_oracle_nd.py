"""The oracle itself (tests/oracle.py) on tiny hand-computed cases: N-D layouts, the stride
normalisation of docs/design.md section 1, grid and window grouping, N-D shuffle assignments."""

import numpy as np
import pytest
import torch

from oracle import grid_mask_np, layout_nd, shuffled_token_groups, stride_tuple, token_groups


class _Layout:  # a TokenLayout-like object: only the attributes are read
    def __init__(self, prefix, image_shape, suffix=0, order=None):
        self.prefix, self.image_shape, self.suffix = prefix, image_shape, suffix
        self.order = tuple(range(len(image_shape))) if order is None else order


def test_layout_forms_agree():
    assert layout_nd((1, 2, 3)) == (1, (2, 3), 0, (0, 1))
    assert layout_nd((1, 2, 3, 2, True)) == (1, (2, 3), 2, (1, 0))
    assert layout_nd((1, (2, 3, 4))) == (1, (2, 3, 4), 0, (0, 1, 2))
    assert layout_nd((0, (2, 3, 4), 1, (0, 2, 1))) == (0, (2, 3, 4), 1, (0, 2, 1))
    assert layout_nd(_Layout(2, (2, 3, 4), 1)) == (2, (2, 3, 4), 1, (0, 1, 2))


@pytest.mark.parametrize("stride,rank,expected", [
    (2, 2, (2, 2)), ((2, 3), 2, (2, 3)), ((4, 2, 3), 2, (2, 3)),
    (2, 3, (1, 2, 2)), ((2, 3), 3, (1, 2, 3)), ((4, 2, 3), 3, (4, 2, 3)),
])
def test_stride_normalisation(stride, rank, expected):
    assert stride_tuple(stride, rank) == expected


def test_grid_groups_2d_hand():
    # 2x3 image, one prefix token, stride 2: (r % 2, c % 2)
    assert token_groups((1, 2, 3), 2) == [None, (0, 0), (0, 1), (0, 0), (1, 0), (1, 1), (1, 0)]
    # column-major: token index c * H + r
    assert token_groups((0, 2, 3, 0, True), 2) == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 0), (1, 0)]


def test_grid_groups_video_hand():
    video = (1, (2, 2, 2), 1)  # prefix, T x H x W = 2x2x2, suffix
    groups = token_groups(video, 2)  # temporal stride 1: (0, r % 2, c % 2), every group spans both frames
    assert groups[0] is None and groups[-1] is None
    assert groups[1:-1] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)] * 2
    assert token_groups(video, (2, 2)) == groups
    full = token_groups(video, (2, 2, 2))[1:-1]
    assert len(set(full)) == 8 and full[4] == (1, 0, 0)
    # a 3-tuple on an image applies (Gh, Gw)
    assert token_groups((0, 2, 2), (5, 2, 1)) == [(0, 0), (0, 0), (1, 0), (1, 0)]


def test_grid_groups_video_storage_order():
    # order (0, 2, 1): per frame, columns outermost; T x H x W = 1x2x3, token index c * 2 + r
    groups = token_groups((0, (1, 2, 3), 0, (0, 2, 1)), (1, 2, 2))
    assert groups == [(0, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1), (0, 0, 0), (0, 1, 0)]


def test_window_groups_hand():
    # 5x4, stride 2: tiles of ceil(5/2)=3 rows and 2 columns
    groups = token_groups((0, 5, 4), 2, "window")
    rows = [[groups[r * 4 + c] for c in range(4)] for r in range(5)]
    assert rows[0] == [(0, 0), (0, 0), (0, 1), (0, 1)]
    assert rows[2] == rows[0] and rows[3] == [(1, 0), (1, 0), (1, 1), (1, 1)] and rows[4] == rows[3]
    # video, int stride: one tile along time (temporal stride 1)
    v = token_groups((1, (2, 2, 2)), 2, "window")
    assert v[0] is None and v[1:] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)] * 2
    # (2, 2, 2) on 4x2x2: frames 0-1 are tile 0, frames 2-3 tile 1
    v = token_groups((0, (4, 2, 2)), (2, 2, 2), "window")
    assert [g[0] for g in v] == [0] * 8 + [1] * 8


def test_window_mask_reduced_keys_use_their_own_tiles():
    # queries 4x4, keys 2x2 (a reduction), stride 2: query tile 2x2 matches key tile 1x1
    m = grid_mask_np((0, 4, 4), (0, 2, 2), 2, "window")
    assert m.shape == (16, 4) and m.sum(1).tolist() == [1] * 16
    assert m[0].tolist() == [True, False, False, False]     # query (0, 0) -> key (0, 0)
    assert m[15].tolist() == [False, False, False, True]    # query (3, 3) -> key (1, 1)
    # prefix tokens see and are seen by all
    m = grid_mask_np((1, 2, 2), (1, 2, 2), 2, "window")
    assert m[0].all() and m[:, 0].all() and m[1:, 1:].trace() == 4 and m[1:, 1:].sum() == 4


def test_grid_and_window_differ():
    assert not np.array_equal(grid_mask_np((0, 4, 4), (0, 4, 4), 2), grid_mask_np((0, 4, 4), (0, 4, 4), 2, "window"))


def test_shuffled_groups_video():
    lay = (0, (2, 2, 2))
    stride = (2, 2, 2)
    identity = torch.arange(8).view(1, 1, 1, 8)
    assert shuffled_token_groups(lay, stride, identity) == token_groups(lay, stride)
    # reversed offsets: the token at offset o joins group 7 - o
    rev = identity.flip(-1)
    assert shuffled_token_groups(lay, stride, rev) == [tuple(1 - x for x in g) for g in token_groups(lay, stride)]
    # 2x4x4 at (1, 2, 2): blocks (1, 2, 2) in storage order, every group holds one token per block
    lay = (1, (2, 4, 4))
    a = torch.rand(2, 2, 2, 4).argsort(-1)
    groups = shuffled_token_groups(lay, (1, 2, 2), a)[1:]
    for t in range(2):
        for br in range(2):
            for bc in range(2):
                block = [groups[t * 16 + (2 * br + i) * 4 + 2 * bc + j] for i in range(2) for j in range(2)]
                assert sorted(block) == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]

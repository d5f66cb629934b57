"""Both groupings (grid, window) on images and videos, eagerly, against the oracle in float64.

gridattn_fx.grid's regrouped form (``grouped_attention``) and its dense masked form must equal
tests/oracle.py's ``SDPA(Q, K, V, B + log M)`` for the grouping's own mask: prefix/suffix
tokens, sides that are not multiples of the stride, stored axis orders, reduced keys on their own
grid (SegFormer), GQA, boolean and additive masks, and shuffle distributing on videos.
"""

import math

import numpy as np
import pytest
import torch

from oracle import assert_close64, assert_differs, grid_mask_np, oracle_sdpa, token_groups

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx import TokenLayout  # noqa: E402
from gridattn_fx import grid  # noqa: E402

GROUPINGS = ("grid", "window")


def V(prefix, shape, suffix=0, order=None):
    return TokenLayout(prefix, image_shape=shape, suffix=suffix, order=order)


# (q layout, k layout, stride): images and videos, divisible or not, prefix/suffix, stored orders
CASES = [
    (TokenLayout(1, 4, 6, 0), None, 2),
    (TokenLayout(1, 5, 7, 2), None, 2),                            # neither side divisible
    (TokenLayout(0, 6, 5, 1, True), None, (2, 3)),                 # column-major
    (TokenLayout(0, 6, 4), None, (3, 2, 2)),                       # a triple on an image: (Gh, Gw)
    (V(1, (3, 4, 4)), None, 2),                                    # video, int: temporal stride 1
    (V(0, (3, 5, 6), 2), None, (2, 2, 2)),                         # padding on every axis
    (V(2, (2, 4, 6)), None, (2, 3)),                               # pair on a video: (1, Gh, Gw)
    (V(0, (4, 3, 4), 1, order=(0, 2, 1)), None, (2, 1, 2)),        # per frame column-major
    (V(0, (2, 4, 4), 0, order=(1, 2, 0)), None, (2, 2, 2)),        # time innermost
    (TokenLayout(0, 8, 8), TokenLayout(0, 4, 4), 2),               # SegFormer: keys reduced 2x
    (V(1, (2, 8, 8)), V(1, (2, 4, 4)), (1, 2, 2)),                 # a reduced video
]


def _qkv(ql, kl, lead=(2, 3), d=4, dtype=torch.float64):
    q = torch.randn(*lead, ql.length, d, dtype=dtype)
    k = torch.randn(*lead, kl.length, d, dtype=dtype)
    v = torch.randn(*lead, kl.length, d + 1, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("ql,kl,stride", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_grid_mask_is_the_oracle_mask(ql, kl, stride, grouping):
    kl = ql if kl is None else kl
    got = grid.grid_mask(ql, kl, stride, grouping=grouping).numpy()
    np.testing.assert_array_equal(got, grid_mask_np(ql, kl, stride, grouping))


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("ql,kl,stride", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_grouped_and_masked_match_the_oracle(ql, kl, stride, grouping):
    kl = ql if kl is None else kl
    q, k, v = _qkv(ql, kl)
    ref = oracle_sdpa(q, k, v, q_layout=ql, k_layout=kl, stride=stride, grouping=grouping)
    for fn in (grid.grouped_attention, grid.masked_attention):
        out = fn(q, k, v, q_layout=ql, k_layout=kl, stride=stride, grouping=grouping)
        assert_close64(out, ref, msg=f"{fn.__name__} {grouping}")
    assert_differs(ref, torch.nn.functional.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_masks_and_gqa(grouping):
    ql = V(1, (2, 4, 6), 1)
    stride = (2, 2, 3)
    q = torch.randn(2, 4, ql.length, 8, dtype=torch.float64)
    k = torch.randn(2, 2, ql.length, 8, dtype=torch.float64)
    v = torch.randn(2, 2, ql.length, 8, dtype=torch.float64)
    bool_mask = torch.rand(2, 1, ql.length, ql.length) > 0.2
    bool_mask[..., 0] = True  # every query keeps a key
    additive_row = torch.randn(1, 1, 1, ql.length, dtype=torch.float64)
    for mask in (None, bool_mask, additive_row):
        ref = oracle_sdpa(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), mask, q_layout=ql,
                          k_layout=ql, stride=stride, grouping=grouping)
        for fn in (grid.grouped_attention, grid.masked_attention):
            out = fn(q, k, v, mask, q_layout=ql, k_layout=ql, stride=stride, enable_gqa=True, grouping=grouping)
            assert_close64(out, ref, msg=f"{fn.__name__} {grouping} mask {None if mask is None else mask.shape}")


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("shape,stride,order", [
    ((4, 6), (2, 3), None), ((5, 7), (2, 2), (1, 0)), ((3, 5, 6), (2, 2, 2), None),
    ((2, 4, 6), (1, 2, 3), (0, 2, 1)), ((3, 4, 4), (2, 2, 2), (2, 0, 1)),
])
def test_cluster_recover_round_trip_and_groups(shape, stride, order, grouping):
    lay = V(0, shape, order=order)
    g = grid.grouping_named(grouping)
    x = torch.randn(2, lay.image_tokens, 3)
    xg = grid.cluster_layout(x, lay, stride, g)
    assert xg.shape == (2, math.prod(stride), math.prod(-(-n // s) for n, s in zip(shape, stride)), 3)
    torch.testing.assert_close(grid.recover_layout(xg, lay, stride, g), x, rtol=0, atol=0)
    # every token lands in the group the oracle names (group ids count row-major over the strides)
    ids = torch.arange(lay.image_tokens, dtype=torch.float64).view(1, -1, 1) + 1
    placed = grid.cluster_layout(ids, lay, stride, g)[0, :, :, 0]
    expected = token_groups(lay, stride, grouping)
    for gid in range(math.prod(stride)):
        members = sorted(int(t) - 1 for t in placed[gid] if t > 0)  # padding is 0
        want = [t for t, grp in enumerate(expected) if np.ravel_multi_index(grp, stride) == gid]
        assert members == want, (gid, members, want)


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("shape,stride", [((4, 6), (2, 3)), ((2, 4, 6), (1, 2, 2)), ((4, 4, 6), (2, 2, 3))])
def test_cluster_image_axis_round_trip(shape, stride, grouping):
    g = grid.grouping_named(grouping)
    n = math.prod(shape)
    x = torch.randn(2, n, 5)
    y = grid.cluster_image_axis(x, 1, shape, stride, g)
    # group-major: the same order as cluster_layout's groups one after the other
    lay = V(0, shape)
    torch.testing.assert_close(y, grid.cluster_layout(x, lay, stride, g).flatten(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(grid.recover_image_axis(y, 1, shape, stride, g), x, rtol=0, atol=0)


def test_unknown_grouping_names_the_field():
    with pytest.raises(ValueError, match="grouping"):
        grid.grouping_named("tiles")


def test_stride_normalisation():
    assert grid.normalize_stride(2) == (2, 2)
    assert grid.normalize_stride((2, 2, 2)) == (2, 2, 2)
    assert grid.normalize_stride(2, 3) == (1, 2, 2)
    assert grid.normalize_stride((2, 3), 3) == (1, 2, 3)
    assert grid.normalize_stride((4, 2, 3), 2) == (2, 3)
    with pytest.raises(TypeError, match="stride"):
        grid.normalize_stride((2, 2, 2, 2))


# --- shuffle distributing on videos ----------------------------------------------------------------

@pytest.mark.parametrize("layout,stride", [
    (V(1, (2, 4, 4)), (2, 2, 2)),
    (V(0, (4, 4, 6), 1), (2, 2, 3)),
    (V(0, (3, 5, 4)), (2, 2, 2)),                   # partial blocks on two axes
    (V(0, (2, 4, 4), order=(0, 2, 1)), (2, 2, 2)),  # stored per frame column-major
    (V(0, (2, 4, 4)), 2),                           # int: (1, 2, 2) blocks
])
def test_video_shuffle(layout, stride):
    full = grid.normalize_stride(stride, 3)
    a = grid.draw_assignment(layout, stride)
    assert a.shape == grid.assignment_shape(layout, stride)
    ids = grid.group_ids(layout, full, assignment=a)[layout.prefix:layout.prefix + layout.image_tokens]
    # every full Gt x Gh x Gw block holds exactly one token of every group
    t, h, w = layout.image_shape
    coords = np.array(np.unravel_index(np.arange(layout.image_tokens),
                                       [layout.image_shape[o] for o in layout.order]))
    logical = np.empty_like(coords)
    for i, o in enumerate(layout.order):
        logical[o] = coords[i]
    blocks = {}
    for token, c in enumerate(logical.T):
        blocks.setdefault(tuple(x // g for x, g in zip(c, full)), []).append(int(ids[token]))
    for key, members in blocks.items():
        if all((b + 1) * g <= n for b, g, n in zip(key, full, layout.image_shape)):
            assert sorted(members) == list(range(math.prod(full))), key
    # the regrouped form equals the oracle for that assignment, and differs from straightforward
    q, k, v = _qkv(layout, layout, lead=(2,))
    ref = oracle_sdpa(q, k, v, q_layout=layout, k_layout=layout, stride=stride, assignment=(a, a))
    out = grid.grouped_attention(q, k, v, q_layout=layout, k_layout=layout, stride=stride, assignment=(a, a))
    assert_close64(out, ref)
    masked = grid.masked_attention(q, k, v, q_layout=layout, k_layout=layout, stride=stride, assignment=(a, a))
    assert_close64(masked, ref)
    straight = oracle_sdpa(q, k, v, q_layout=layout, k_layout=layout, stride=stride)
    assert_differs(ref, straight)


def test_window_refuses_shuffle():
    ql = V(0, (2, 4, 4))
    plan = grid.GridPlan(q_layout=ql, k_layout=ql, stride=2, ndim=3, grouping="window")
    assert "window" in plan.shuffle_unsupported
    with pytest.raises(ValueError, match="window"):
        grid.GridPlan(q_layout=ql, k_layout=ql, stride=2, ndim=3, grouping="window", shuffle=True)


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_grouped_pairs_equal_across_groupings(grouping):
    ql, kl = V(1, (3, 5, 6)), V(1, (3, 3, 3))
    plan = grid.GridPlan(q_layout=ql, k_layout=kl, stride=(1, 2, 2), ndim=4, grouping=grouping)
    # G groups of ceil(n/g) tokens per axis, plus the prefix query over all keys
    assert plan.grouped_pairs() == 4 * (3 * 3 * 3) * (1 + 3 * 2 * 2) + 1 * kl.length


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("shape,stride", [((4, 6), (2, 3)), ((5, 7), (2, 2))])
def test_decomposed_relpos_bias(shape, stride, grouping):
    """SAM's decomposed rel-pos bias restricted to each group, for both groupings."""
    lay = TokenLayout(0, *shape)
    h, w = shape
    n = 6  # batch * heads
    rel_h = torch.randn(n, h, w, h, dtype=torch.float64)
    rel_w = torch.randn(n, h, w, w, dtype=torch.float64)
    q, k, v = (torch.randn(n, h * w, 4, dtype=torch.float64) for _ in range(3))
    plan = grid.GridPlan(q_layout=lay, k_layout=lay, stride=stride, ndim=3, mask=grid.MaskSpec(ndim=3),
                         relpos=grid.RelPosSpec(), grouping=grouping)
    dense = (rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).flatten(1, 2).flatten(-2, -1)
    ref = oracle_sdpa(q, k, v, dense, q_layout=lay, k_layout=lay, stride=stride, grouping=grouping)
    assert_close64(plan.grouped(q, k, v, (rel_h, rel_w)), ref)
    assert_close64(plan.masked(q, k, v, (rel_h, rel_w)), ref)

"""gridattn_fx.grid used directly (eagerly): cluster/recover, grid_mask, the two attention forms."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oracle import (assert_close64, assert_differs, grid_mask_np, log_grid_mask, naive_attention,
                    oracle_sdpa, stride_tuple)

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx import TokenLayout  # noqa: E402
from gridattn_fx import grid  # noqa: E402


def L(p, h, w, s=0, t=False):
    return TokenLayout(prefix=p, height=h, width=w, suffix=s, transposed=t)


# ---------------------------------------------------------------------------------------------
# the oracle itself (tests the tests)
# ---------------------------------------------------------------------------------------------
def test_oracle_mask_by_hand():
    # cls + 2x2 image, stride 2: each image token is alone in its group; cls sees and is seen by all
    m = grid_mask_np((1, 2, 2), (1, 2, 2), 2)
    expected = np.array([[1, 1, 1, 1, 1],
                         [1, 1, 0, 0, 0],
                         [1, 0, 1, 0, 0],
                         [1, 0, 0, 1, 0],
                         [1, 0, 0, 0, 1]], dtype=bool)
    np.testing.assert_array_equal(m, expected)
    # 2x4 image, stride (1, 2): two column-parity groups; transposed order walks columns first
    m = grid_mask_np((0, 2, 4), (0, 2, 4), (1, 2))
    row_major_cols = [0, 1, 2, 3, 0, 1, 2, 3]
    np.testing.assert_array_equal(
        m, np.array([[a % 2 == b % 2 for b in row_major_cols] for a in row_major_cols]))
    m = grid_mask_np((0, 2, 4, 0, True), (0, 2, 4, 0, True), (1, 2))
    col_major_cols = [0, 0, 1, 1, 2, 2, 3, 3]
    np.testing.assert_array_equal(
        m, np.array([[a % 2 == b % 2 for b in col_major_cols] for a in col_major_cols]))


def test_oracle_matches_loop_attention():
    q, k, v = (torch.randn(1, 2, 1 + 12 + 2, 4, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(15, 15, dtype=torch.float64)
    lay = (1, 3, 4, 2)
    allowed = grid_mask_np(lay, lay, 2)
    ref = naive_attention(q, k, v, allowed, bias=bias)
    assert_close64(oracle_sdpa(q, k, v, bias, q_layout=lay, k_layout=lay, stride=2), ref)


# ---------------------------------------------------------------------------------------------
# cluster / recover
# ---------------------------------------------------------------------------------------------
CLUSTER_CASES = [
    # (H, W, stride, leading dims)
    (4, 6, 2, (2, 3)),
    (5, 7, 2, (2,)),        # neither side divisible
    (6, 10, (2, 4), (1, 2)),  # W not divisible by 4
    (8, 12, (2, 4), (2, 2)),
    (25, 25, 2, (1,)),
    (7, 11, 3, (3,)),
    (3, 4, (1, 2), (2,)),
    (2, 2, 3, (1,)),        # stride larger than the image
]


@pytest.mark.parametrize("H,W,stride,lead", CLUSTER_CASES)
def test_cluster_recover_round_trip(H, W, stride, lead):
    x = torch.randn(*lead, H * W, 5, dtype=torch.float64)
    xg = grid.cluster(x, H, W, stride)
    back = grid.recover(xg, H, W, stride)
    assert back.shape == x.shape and back.dtype == x.dtype
    assert torch.equal(back, x)


@pytest.mark.parametrize("H,W,stride,lead", CLUSTER_CASES)
def test_cluster_groups_are_grid_groups(H, W, stride, lead):
    gh, gw = stride_tuple(stride)
    n = math.ceil(H / gh) * math.ceil(W / gw)
    # token t carries value t + 1 in every channel, so zero marks padding
    ids = torch.arange(1, H * W + 1, dtype=torch.float64)
    x = ids[:, None].expand(H * W, 3).expand(*lead, H * W, 3).contiguous()
    xg = grid.cluster(x, H, W, stride)
    assert xg.shape == (*lead, gh * gw, n, 3)
    # every leading index and channel holds the same grouping
    assert torch.equal(xg, xg.flatten(0, len(lead) - 1)[0].expand_as(xg))
    got = []
    for g in range(gh * gw):
        vals = xg.flatten(0, len(lead) - 1)[0, g, :, 0]
        toks = [int(v) - 1 for v in vals if v != 0]
        assert len(toks) == len(set(toks))
        got.append(frozenset(toks))
    expected = set()
    for gr in range(gh):
        for gc in range(gw):
            expected.add(frozenset(r * W + c for r in range(H) for c in range(W)
                                   if r % gh == gr and c % gw == gc))
    assert set(got) == expected
    assert len(got) == gh * gw


@pytest.mark.parametrize("H,W,stride", [(6, 10, (2, 4)), (5, 7, 2), (4, 6, (1, 3))])
def test_cluster_recover_round_trip_transposed(H, W, stride):
    x = torch.randn(2, H * W, 3, dtype=torch.float64)
    back = grid.recover(grid.cluster(x, H, W, stride, transposed=True), H, W, stride, transposed=True)
    assert torch.equal(back, x)


def test_cluster_recover_gradients():
    x = torch.randn(2, 5 * 7, 3, dtype=torch.float64, requires_grad=True)
    y = grid.recover(grid.cluster(x, 5, 7, 2) * 3.0, 5, 7, 2)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))


# ---------------------------------------------------------------------------------------------
# grid_mask
# ---------------------------------------------------------------------------------------------
MASK_CASES = [
    (L(1, 4, 6), L(1, 4, 6), 2),
    (L(5, 6, 10), L(5, 6, 10), (2, 4)),
    (L(0, 7, 11, 3), L(0, 7, 11, 3), 3),
    (L(1, 6, 10, 0, True), L(1, 6, 10, 0, True), (2, 4)),
    (L(0, 8, 12), L(0, 4, 6), 2),             # SegFormer: different key grid
    (L(2, 4, 4, 1), L(0, 4, 4, 3), 2),        # different prefix/suffix per side
    (L(0, 25, 25), L(0, 25, 25), 2),
]


@pytest.mark.parametrize("ql,kl,stride", MASK_CASES)
def test_grid_mask_matches_independent_mask(ql, kl, stride):
    m = grid.grid_mask(ql, kl, stride)
    assert m.dtype == torch.bool
    assert tuple(m.shape) == (ql.length, kl.length)
    np.testing.assert_array_equal(m.numpy(), grid_mask_np(ql, kl, stride))


def test_grid_mask_int_and_tuple_stride_agree():
    lay = L(1, 5, 7)
    assert torch.equal(grid.grid_mask(lay, lay, 2), grid.grid_mask(lay, lay, (2, 2)))


# ---------------------------------------------------------------------------------------------
# masked_attention / grouped_attention vs the oracle
# ---------------------------------------------------------------------------------------------
def _bool_mask(shape, ql, kl, stride):
    """Random boolean mask that leaves every query at least one grid-allowed key (no NaN rows)."""
    bm = torch.rand(shape) > 0.4
    allowed = grid_mask_np(ql, kl, stride)
    first = allowed.argmax(axis=1)
    bm[..., np.arange(allowed.shape[0]), first] = True
    return bm


ATTN_CASES = {
    # name: (q_layout, k_layout, stride, mask kind, 3-D?, scale)
    "plain": (L(0, 4, 6), L(0, 4, 6), 2, None, False, None),
    "cls_reg": (L(5, 6, 10), L(5, 6, 10), 2, None, False, None),
    "suffix_text": (L(0, 6, 10, 7), L(0, 6, 10, 7), 2, None, False, None),
    "prefix_suffix_2x4": (L(1, 6, 10, 3), L(1, 6, 10, 3), (2, 4), None, False, 0.3),
    "transposed": (L(1, 6, 10, 0, True), L(1, 6, 10, 0, True), (2, 4), None, False, None),
    "non_divisible": (L(1, 7, 11), L(1, 7, 11), 3, None, False, None),
    "segformer_grids": (L(0, 8, 12), L(0, 4, 6), 2, None, False, None),
    "segformer_odd": (L(0, 7, 10), L(0, 3, 5), 2, None, False, None),
    "three_d": (L(0, 6, 10), L(0, 6, 10), 2, None, True, None),
    "float_full": (L(1, 6, 10), L(1, 6, 10), 2, "float_full", False, None),
    "float_broadcast": (L(1, 6, 10), L(1, 6, 10), (2, 4), "float_2d", False, None),
    "float_heads": (L(0, 8, 12), L(0, 4, 6), 2, "float_heads", False, None),
    "bool": (L(2, 6, 10, 1), L(2, 6, 10, 1), 2, "bool", False, None),
    "bool_3d": (L(0, 5, 7), L(0, 5, 7), 2, "bool", True, None),
}


def _attn_inputs(ql, kl, stride, mask_kind, three_d, B=2, heads=2, d=4):
    lead = (B * heads,) if three_d else (B, heads)
    q = torch.randn(*lead, ql.length, d, dtype=torch.float64)
    k = torch.randn(*lead, kl.length, d, dtype=torch.float64)
    v = torch.randn(*lead, kl.length, d, dtype=torch.float64)
    Lq, Lk = ql.length, kl.length
    mask = {
        None: None,
        "float_full": torch.randn(*lead, Lq, Lk, dtype=torch.float64),
        "float_2d": torch.randn(Lq, Lk, dtype=torch.float64),
        "float_heads": torch.randn(1, heads, Lq, Lk, dtype=torch.float64),
        "bool": _bool_mask((*lead[:-1], 1, Lq, Lk) if not three_d else (Lq, Lk), ql, kl, stride),
    }[mask_kind]
    return q, k, v, mask


@pytest.mark.parametrize("impl", ["masked_attention", "grouped_attention"])
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_forms_match_oracle(impl, case):
    ql, kl, stride, mask_kind, three_d, scale = ATTN_CASES[case]
    q, k, v, mask = _attn_inputs(ql, kl, stride, mask_kind, three_d)
    fn = getattr(grid, impl)
    out = fn(q, k, v, mask, 0.0, scale, ql, kl, stride)
    ref = oracle_sdpa(q, k, v, mask, scale, q_layout=ql, k_layout=kl, stride=stride)
    assert_close64(out, ref)
    assert_differs(ref, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale))


@pytest.mark.parametrize("case", ["cls_reg", "segformer_grids", "float_full", "non_divisible"])
def test_grouped_attention_gradients_match_oracle(case):
    ql, kl, stride, mask_kind, three_d, scale = ATTN_CASES[case]
    q, k, v, mask = _attn_inputs(ql, kl, stride, mask_kind, three_d)
    leaves = [t.requires_grad_() for t in (q, k, v)] + ([mask.requires_grad_()] if mask is not None else [])
    gout = torch.randn(q.shape[:-1] + v.shape[-1:], dtype=torch.float64)
    out = grid.grouped_attention(q, k, v, mask, 0.0, scale, ql, kl, stride)
    got = torch.autograd.grad(out, leaves, gout)
    ref = oracle_sdpa(q, k, v, mask, scale, q_layout=ql, k_layout=kl, stride=stride)
    want = torch.autograd.grad(ref, leaves, gout)
    for g, w in zip(got, want):
        assert_close64(g, w)


@pytest.mark.parametrize("impl", ["masked_attention", "grouped_attention"])
def test_attention_forms_stride_one_is_plain_sdpa(impl):
    lay = L(1, 4, 6, 2)
    q, k, v, mask = _attn_inputs(lay, lay, 1, "float_full", False)
    out = getattr(grid, impl)(q, k, v, mask, 0.0, None, lay, lay, 1)
    assert_close64(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_attention_forms_float32():
    lay = L(1, 6, 10)
    q, k, v = (torch.randn(2, 2, lay.length, 8) for _ in range(3))
    ref = oracle_sdpa(q.double(), k.double(), v.double(), q_layout=lay, k_layout=lay, stride=2)
    for fn in (grid.masked_attention, grid.grouped_attention):
        out = fn(q, k, v, None, 0.0, None, lay, lay, 2)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_log_mask_is_what_the_oracle_adds():
    # grid_mask's False entries are exactly where the oracle adds -inf
    lay = L(1, 5, 7, 2)
    m = grid.grid_mask(lay, lay, (2, 3))
    logm = log_grid_mask(lay, lay, (2, 3))
    assert torch.equal(torch.isinf(logm), ~m)

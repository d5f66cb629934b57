"""GQA (``enable_gqa``) and MQA (key/value with one head, by broadcasting) keep their head mapping.

A grid rewrite must pair every query head with the key/value head the original site paired it
with (docs/design.md section 2). Float64 against the oracle (tests/oracle.py): a GQA oracle is SDPA with
``enable_gqa`` and the oracle mask; MQA broadcasts as the model itself does. Each model is run in
the spellings that keep the regrouping at the attention call (a cls token, move_regrouping=False,
a mask) and the one that moves it (no prefix tokens, the default).
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import ViT, build, image
from oracle import assert_close64, assert_differs, oracle_mask, oracle_sdpa

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx import TokenLayout  # noqa: E402
from gridattn_fx.grid import grouped_attention, masked_attention  # noqa: E402

DIM = 16
HEAD_DIM = 4


def rewrite(model, inputs, **opts):
    opts.setdefault("min_image_tokens", 0)
    opts.setdefault("stride", 2)
    return gridattn_fx.rewrite(model, inputs, **opts)


def _oracle_scores_mask(mod, mask, dtype, device):
    ql, kl, stride = mod.oracle
    return oracle_mask(mask, ql, kl, stride, dtype, device)


# --- models --------------------------------------------------------------------------------------

class KvHeadsAttention(nn.Module):
    """q with ``q_heads`` heads, k/v with ``kv_heads``: SDPA with ``enable_gqa`` (HF transformers'
    sdpa path), or with one k/v head plain SDPA broadcasting (``gqa=False``, MQA) or the manual
    matmul chain (``manual=True``, timm MobileNetV4 MultiQueryAttention2d unfused)."""

    def __init__(self, q_heads=4, kv_heads=2, gqa=True, manual=False):
        super().__init__()
        self.q_heads, self.kv_heads, self.gqa, self.manual = q_heads, kv_heads, gqa, manual
        self.q = nn.Linear(DIM, q_heads * HEAD_DIM)
        self.kv = nn.Linear(DIM, 2 * kv_heads * HEAD_DIM)
        self.proj = nn.Linear(q_heads * HEAD_DIM, DIM)
        self.oracle = None

    def forward(self, x, attn_mask=None):
        B, L, _ = x.shape
        q = self.q(x).reshape(B, L, self.q_heads, HEAD_DIM).transpose(1, 2)
        k, v = self.kv(x).reshape(B, L, 2, self.kv_heads, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)
        if self.oracle is not None:
            attn_mask = _oracle_scores_mask(self, attn_mask, q.dtype, q.device)
        if self.manual:
            attn = (q * HEAD_DIM ** -0.5) @ k.transpose(-2, -1)
            if attn_mask is not None:
                attn = attn + attn_mask
            o = attn.softmax(dim=-1) @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=self.gqa)
        return self.proj(o.transpose(1, 2).reshape(B, L, -1))


class Block(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.attn = attn

    def forward(self, x, attn_mask=None):
        return x + self.attn(self.norm(x), attn_mask)


class TokenModel(nn.Module):
    """Conv patch embedding, optional cls token, then the given attention blocks."""

    def __init__(self, *attns, n_cls=1):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, DIM, 2, 2)
        self.cls_token = nn.Parameter(torch.randn(1, n_cls, DIM)) if n_cls else None
        self.blocks = nn.ModuleList([Block(a) for a in attns])

    def forward(self, img, attn_mask=None):
        x = self.patch_embed(img).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x, attn_mask)
        return x


class MultiQueryAttention2d(nn.Module):
    """timm MobileNetV4's MultiQueryAttention2d (no kv stride): 1x1 conv projections on NCHW
    features, one key/value head shared by every query head through broadcasting."""

    def __init__(self, heads=4, manual=False):
        super().__init__()
        self.heads, self.manual = heads, manual
        self.query = nn.Conv2d(DIM, heads * HEAD_DIM, 1)
        self.key = nn.Conv2d(DIM, HEAD_DIM, 1)
        self.value = nn.Conv2d(DIM, HEAD_DIM, 1)
        self.output = nn.Conv2d(heads * HEAD_DIM, DIM, 1)
        self.oracle = None

    def forward(self, x):
        B, C, H, W = x.shape
        q = self.query(x).reshape(B, self.heads, HEAD_DIM, -1).transpose(-1, -2)   # (B, h, N, d)
        k = self.key(x).reshape(B, HEAD_DIM, -1).unsqueeze(1).transpose(-1, -2)      # (B, 1, N, d)
        v = self.value(x).reshape(B, HEAD_DIM, -1).unsqueeze(1).transpose(-1, -2)    # (B, 1, N, d)
        mask = None if self.oracle is None else _oracle_scores_mask(self, None, q.dtype, q.device)
        if self.manual:
            attn = (q * HEAD_DIM ** -0.5) @ k.transpose(-1, -2)
            if mask is not None:
                attn = attn + mask
            o = attn.softmax(dim=-1) @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        o = o.transpose(1, 2).reshape(B, H, W, -1).permute(0, 3, 1, 2)
        return x + self.output(o)


class ConvMqaNet(nn.Module):
    def __init__(self, manual=False):
        super().__init__()
        self.stem = nn.Conv2d(3, DIM, 2, 2)
        self.attn = MultiQueryAttention2d(manual=manual)

    def forward(self, img):
        return self.attn(self.stem(img))


def _site_paths(model, kind=(KvHeadsAttention, MultiQueryAttention2d)):
    return [name for name, m in model.named_modules() if isinstance(m, kind)]


def check(model, inputs, layout, expect_sites, **opts):
    """Rewrite, then: every attention site rewritten as expected, output == oracle (float64),
    and the oracle differs from dense attention (the test has teeth). Returns the report."""
    gm, report = rewrite(model, inputs, **opts)
    assert report.failure is None, report.failure
    assert len(report.sites) == expect_sites, str(report)
    for s in report.sites:
        assert s.decision == "rewritten", f"{s.module_path}: {s.reason}\n{report}"
        assert s.flops_after < s.flops_before, str(report)
    stride = opts["stride"]
    paths = [name for name, m in model.named_modules() if getattr(m, "oracle", "absent") is None]
    with torch.no_grad():
        got = gm(*inputs)
        dense = model(*inputs)
        for p in paths:
            model.get_submodule(p).oracle = (layout, layout, stride)
        try:
            expected = model(*inputs)
        finally:
            for p in paths:
                model.get_submodule(p).oracle = None
    assert_close64(got, expected)
    assert_differs(expected, dense)
    return report


# --- GQA -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("q_heads,kv_heads", [(4, 2), (4, 1), (6, 3)])
def test_gqa_with_cls_token(q_heads, kv_heads):
    torch.manual_seed(0)
    model = build(TokenModel, KvHeadsAttention(q_heads, kv_heads))
    report = check(model, (image(2, 8, 12),), (1, 4, 6), 1, stride=2)
    assert "attention call" in report.sites[0].regrouping


@pytest.mark.parametrize("move", [False, True])
def test_gqa_without_prefix_moved_and_at_the_call(move):
    torch.manual_seed(1)
    model = build(TokenModel, KvHeadsAttention(4, 2), n_cls=0)
    report = check(model, (image(2, 8, 12),), (0, 4, 6), 1, stride=2, move_regrouping=move)
    regrouping = report.sites[0].regrouping
    assert ("attention call" not in regrouping) if move else ("move_regrouping=False" in regrouping), regrouping


@pytest.mark.parametrize("stride", [2, (2, 3)])
@pytest.mark.parametrize("mask_kind", ["bool_2d", "additive_per_head"])
def test_gqa_with_mask(mask_kind, stride):
    torch.manual_seed(2)
    model = build(TokenModel, KvHeadsAttention(4, 2))
    L = 1 + 4 * 6
    if mask_kind == "bool_2d":
        mask = torch.rand(L, L) > 0.3
        mask[torch.arange(L), torch.arange(L)] = True  # no fully masked rows
    else:  # one bias per query head: the mask's head axis is the query heads'
        mask = torch.randn(2, 4, L, L, dtype=torch.float64)
    check(model, (image(2, 8, 12), mask), (1, 4, 6), 1, stride=stride)


def test_gqa_two_kv_heads_next_to_a_plain_site_both_rewritten():
    """_cost used to raise on (B, 4, ...) vs (B, 2, ...): the whole pass fell back."""
    torch.manual_seed(3)
    model = build(TokenModel, KvHeadsAttention(4, 2), KvHeadsAttention(2, 2, gqa=False))
    report = check(model, (image(2, 8, 12),), (1, 4, 6), 2, stride=2)
    gqa_site, plain_site = report.sites
    # FLOPs count query heads: 2 * B * Hq * Lq * Lk * (d + dv)
    assert gqa_site.flops_before == 2 * 2 * 4 * 25 * 25 * (2 * HEAD_DIM)
    assert plain_site.flops_before == 2 * 2 * 2 * 25 * 25 * (2 * HEAD_DIM)


@pytest.mark.parametrize("shapes", [
    ((2, 4), (2, 2)), ((2, 4), (2, 1)), ((2, 4), (1, 2)), ((4,), (2,)), ((2, 3, 6), (2, 3, 2)),
])
@pytest.mark.parametrize("layout", [TokenLayout(1, 4, 6), TokenLayout(0, 5, 3, 2), TokenLayout(1, 4, 6, 0, True)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_public_grouped_and_masked_attention_with_gqa(shapes, layout, with_mask):
    torch.manual_seed(4)
    (q_lead, kv_lead), n, f64 = shapes, layout.length, torch.float64
    q = torch.randn(*q_lead, n, 5, dtype=f64)
    k, v = torch.randn(*kv_lead, n, 5, dtype=f64), torch.randn(*kv_lead, n, 3, dtype=f64)
    mask = torch.randn(q_lead[-1], n, n, dtype=f64) if with_mask else None
    lay = (layout.prefix, layout.height, layout.width, layout.suffix, layout.transposed)
    expected = F.scaled_dot_product_attention(q, k, v, oracle_mask(mask, lay, lay, 2, f64), enable_gqa=True)
    repeated = [x.repeat_interleave(q_lead[-1] // kv_lead[-1], -3) for x in (k, v)]
    assert_close64(oracle_sdpa(q, *repeated, mask, q_layout=lay, k_layout=lay, stride=2), expected)
    for attend in (grouped_attention, masked_attention):
        got = attend(q, k, v, mask, q_layout=layout, k_layout=layout, stride=2, enable_gqa=True)
        assert_close64(got, expected, msg=attend.__name__)


# --- MQA by broadcasting -------------------------------------------------------------------------

@pytest.mark.parametrize("manual", [False, True])
def test_mqa_broadcast_with_cls_token(manual):
    torch.manual_seed(5)
    model = build(TokenModel, KvHeadsAttention(4, 1, gqa=False, manual=manual))
    report = check(model, (image(2, 8, 12),), (1, 4, 6), 1, stride=2)
    assert report.sites[0].form == ("manual-matmul" if manual else "sdpa")


@pytest.mark.parametrize("manual", [False, True])
@pytest.mark.parametrize("move", [False, True])
def test_mqa_broadcast_conv_multi_query_attention(manual, move):
    torch.manual_seed(6)
    model = build(ConvMqaNet, manual=manual)
    report = check(model, (image(2, 8, 12),), (0, 4, 6), 1, stride=2, move_regrouping=move)
    if not move:
        assert "move_regrouping=False" in report.sites[0].regrouping


@pytest.mark.parametrize("shapes", [
    ((2, 4), (2, 1)), ((2, 4), (1, 4)), ((2, 1), (2, 4)), ((1, 4), (2, 1)), ((2, 3, 4), (1, 3, 1)),
])
@pytest.mark.parametrize("with_mask", [False, True])
def test_public_grouped_attention_broadcasts_like_sdpa(shapes, with_mask):
    torch.manual_seed(7)
    (q_lead, kv_lead), layout, f64 = shapes, TokenLayout(1, 4, 6), torch.float64
    n = layout.length
    q = torch.randn(*q_lead, n, 5, dtype=f64)
    k, v = torch.randn(*kv_lead, n, 5, dtype=f64), torch.randn(*kv_lead, n, 3, dtype=f64)
    mask = (torch.rand(n, n) > 0.3) | torch.eye(n, dtype=torch.bool) if with_mask else None
    expected = oracle_sdpa(q, k, v, mask, q_layout=(1, 4, 6), k_layout=(1, 4, 6), stride=2)
    got = grouped_attention(q, k, v, mask, q_layout=layout, k_layout=layout, stride=2)
    assert_close64(got, expected)


def test_plain_vit_unchanged_by_the_broadcast_support():
    """The usual site (q, k, v of one shape) still matches the oracle (guards the fold order)."""
    torch.manual_seed(8)
    model = build(ViT, depth=1, n_cls=1)
    x = image(2, 8, 12)
    gm, report = rewrite(model, (x,))
    assert [s.decision for s in report.sites] == ["rewritten"]
    with torch.no_grad():
        model.blocks[0].attn.oracle = ((1, 4, 6), (1, 4, 6), 2)
        expected = model(x)
        model.blocks[0].attn.oracle = None
        assert_close64(gm(x), expected)
    assert math.isfinite(float(gm(x).sum()))


def test_gqa_and_mqa_compiled_with_the_backend():
    """Through torch.compile(backend="gridattn") (inductor): both sites rewritten, output == oracle."""
    torch.manual_seed(9)
    model = build(TokenModel, KvHeadsAttention(4, 2), KvHeadsAttention(4, 1, gqa=False))
    x = image(2, 8, 12)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="gridattn", options={"stride": 2, "min_image_tokens": 0})
    with torch.no_grad():
        got = compiled(x)
        report = gridattn_fx.last_report()
        assert report.failure is None and len(report.rewritten) == 2, str(report)
        for p in _site_paths(model):
            model.get_submodule(p).oracle = ((1, 4, 6), (1, 4, 6), 2)
        try:
            expected = model(x)
        finally:
            for p in _site_paths(model):
                model.get_submodule(p).oracle = None
    assert_close64(got, expected)

"""Hand-written attention forms: every spelling real models use is found, rewritten to
exactly the oracle, and forms that are not attention are left alone.

Each module below writes ``softmax(scale * q @ k^T + bias) @ v`` one way. Its oracle path (eager
only) adds the independently built log grid mask to the scores right before the softmax, so the
reference is the model's own arithmetic restricted by M, not our SDPA-based rewrite.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from oracle import assert_close64, assert_differs, assert_equal_exact, log_grid_mask, oracle_mask, oracle_mode

gridattn_fx = pytest.importorskip("gridattn_fx")

DIM, HEADS = 16, 2
HD = DIM // HEADS


class FormAttention(nn.Module):
    """Conv patch embed (optional cls token), qkv projection, then one hand-written form."""

    def __init__(self, form, grid=(6, 8), cls=0):
        super().__init__()
        self.form, self.grid, self.cls = form, grid, cls
        self.embed = nn.Conv2d(3, DIM, 2, 2)
        self.cls_token = nn.Parameter(torch.randn(1, cls, DIM)) if cls else None
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        L = grid[0] * grid[1] + cls
        self.table = nn.Parameter(torch.randn(1, HEADS, L, L))
        self.rel_h = nn.Parameter(torch.randn(grid[0], grid[0], HD))
        self.rel_w = nn.Parameter(torch.randn(grid[1], grid[1], HD))
        self.oracle = None

    def _oracle(self, scores):
        if self.oracle is None:
            return scores
        ql, kl, stride, *assignment = self.oracle  # a 4th entry: a shuffle assignment pair
        return scores + oracle_mask(None, ql, kl, stride, scores.dtype, None, *assignment)

    def forward(self, img, mask=None):
        x = self.embed(img).flatten(2).transpose(1, 2)
        B = x.shape[0]
        if self.cls:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], 1)
        L = x.shape[1]
        q, k, v = self.qkv(x).reshape(B, L, 3, HEADS, HD).permute(2, 0, 3, 1, 4).unbind(0)
        o = getattr(self, "form_" + self.form)(q, k, v, mask)
        return self.proj(o.transpose(1, 2).reshape(B, L, DIM))

    # --- the forms ---------------------------------------------------------------------------
    def form_timm(self, q, k, v, mask):  # timm / SAM / Swin: scale q first
        q = q * HD ** -0.5
        attn = q @ k.transpose(-2, -1)
        attn = self._oracle(attn).softmax(dim=-1)
        return F.dropout(attn, 0.0, False) @ v

    def form_scale_scores(self, q, k, v, mask):
        attn = torch.matmul(q, k.transpose(-1, -2)) * (HD ** -0.5)
        return F.softmax(self._oracle(attn), dim=-1) @ v

    def form_div_sqrt(self, q, k, v, mask):
        attn = (q @ k.mT) / math.sqrt(HD)
        return torch.softmax(self._oracle(attn), -1) @ v

    def form_scale_k_permute(self, q, k, v, mask):
        attn = q @ (k * 0.3).permute(0, 1, 3, 2)
        return torch.matmul(self._oracle(attn).softmax(-1), v)

    def form_no_scale(self, q, k, v, mask):
        return self._oracle(q @ k.transpose(-2, -1)).softmax(-1) @ v

    def form_baddbmm(self, q, k, v, mask):  # diffusers AttnProcessor: heads folded into batch
        B, H, L, D = q.shape
        q3, k3, v3 = (t.reshape(B * H, L, D) for t in (q, k, v))
        empty = torch.empty(B * H, L, L, dtype=q.dtype)
        scores = torch.baddbmm(empty, q3, k3.transpose(-1, -2), beta=0, alpha=D ** -0.5)
        probs = self._oracle(scores).softmax(dim=-1)
        return torch.bmm(probs, v3).reshape(B, H, L, D)

    def form_baddbmm_mask(self, q, k, v, mask):  # diffusers with an attention mask as the input
        B, H, L, D = q.shape
        q3, k3, v3 = (t.reshape(B * H, L, D) for t in (q, k, v))
        bias = self.table.expand(B, -1, -1, -1).reshape(B * H, L, L)
        scores = torch.baddbmm(bias, q3, k3.transpose(-1, -2), beta=1, alpha=D ** -0.5)
        return torch.bmm(self._oracle(scores).softmax(dim=-1), v3).reshape(B, H, L, D)

    def form_bmm(self, q, k, v, mask):  # bmm for both products, scale on the scores
        B, H, L, D = q.shape
        q3, k3, v3 = (t.reshape(B * H, L, D) for t in (q, k, v))
        probs = self._oracle(torch.bmm(q3, k3.transpose(1, 2)) * D ** -0.5).softmax(-1)
        return torch.bmm(probs, v3).reshape(B, H, L, D)

    def form_einsum(self, q, k, v, mask):
        attn = torch.einsum("bhid,bhjd->bhij", q, k) * HD ** -0.5
        return torch.einsum("bhij,bhjd->bhid", self._oracle(attn).softmax(-1), v)

    def form_table_bias(self, q, k, v, mask):  # learned (1, heads, L, L) bias, e.g. Swin/BEiT-style
        attn = (q * HD ** -0.5) @ k.transpose(-2, -1) + self.table
        return self._oracle(attn).softmax(-1) @ v

    def form_masked_fill(self, q, k, v, mask):  # HF-style boolean padding mask
        attn = (q @ k.transpose(-2, -1)) * HD ** -0.5
        attn = attn.masked_fill(mask, float("-inf"))
        return self._oracle(attn).softmax(-1) @ v

    def form_where(self, q, k, v, mask):
        attn = (q @ k.transpose(-2, -1)) * HD ** -0.5
        attn = torch.where(~mask, attn, float("-inf"))
        return self._oracle(attn).softmax(-1) @ v

    def form_float_softmax(self, q, k, v, mask):  # casts around the softmax
        attn = (q * HD ** -0.5) @ k.transpose(-2, -1)
        return self._oracle(attn).float().softmax(-1).type_as(q) @ v

    def form_sam_relpos(self, q, k, v, mask):  # official SAM: decomposed rel-pos through a 5-D view
        B, H, L, D = q.shape
        qh, qw = self.grid
        q3, k3, v3 = (t.reshape(B * H, L, D) for t in (q, k, v))
        attn = (q3 * D ** -0.5) @ k3.transpose(-2, -1)
        r_q = q3.reshape(B * H, qh, qw, D)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, self.rel_h)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, self.rel_w)
        attn = (attn.view(B * H, qh, qw, qh, qw) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).view(
            B * H, L, L)
        return (self._oracle(attn).softmax(dim=-1) @ v3).reshape(B, H, L, D)

    def form_sdpa_relpos(self, q, k, v, mask):  # timm samvit / HF: the same bias passed to SDPA
        B, H, L, D = q.shape
        qh, qw = self.grid
        r_q = q.reshape(B * H, qh, qw, D)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, self.rel_h)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, self.rel_w)
        bias = (rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).reshape(B, H, L, L)
        if self.oracle is not None:
            bias = self._oracle(bias)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    # --- look-alikes that are not attention over tokens ----------------------------------------
    def form_wrong_axis(self, q, k, v, mask):
        return (q @ k.transpose(-2, -1)).softmax(dim=-2) @ v

    def form_non_key_operand(self, q, k, v, mask):  # scores against a learned matrix, not keys
        L = q.shape[-2]
        w = self.table[0, 0, :HD, :L]
        return (q @ w).softmax(-1) @ v

    def form_probs_returned(self, q, k, v, mask):  # attention maps used elsewhere: keep exact
        probs = (q @ k.transpose(-2, -1)).softmax(-1)
        self_out = probs @ v
        return self_out + probs.mean() * 0


REWRITTEN_FORMS = {
    "timm": "manual-matmul",
    "scale_scores": "manual-matmul",
    "div_sqrt": "manual-matmul",
    "scale_k_permute": "manual-matmul",
    "no_scale": "manual-matmul",
    "baddbmm": "manual-baddbmm",
    "bmm": "manual-bmm",
    "baddbmm_mask": "manual-baddbmm",
    "einsum": "manual-einsum",
    "table_bias": "manual-matmul",
    "masked_fill": "manual-matmul",
    "where": "manual-matmul",
    "float_softmax": "manual-matmul",
    "sam_relpos": "manual-matmul+relpos",
    "sdpa_relpos": "sdpa+relpos",
}


def _inputs(form, grid, cls=0, batch=2):
    torch.manual_seed(1)
    img = torch.randn(batch, 3, 2 * grid[0], 2 * grid[1], dtype=torch.float64)
    L = grid[0] * grid[1] + cls
    mask = torch.zeros(batch, 1, 1, L, dtype=torch.bool)
    mask[0, ..., 3] = True  # hide one key of the first image (never a whole row)
    return (img, mask) if form in ("masked_fill", "where") else (img,)


def _model(form, grid=(6, 8), cls=0):
    torch.manual_seed(0)
    return FormAttention(form, grid, cls).double().eval()


@pytest.mark.parametrize("implementation", ["grouped", "masked"])
@pytest.mark.parametrize("form", sorted(REWRITTEN_FORMS))
def test_form_is_rewritten_exactly(form, implementation):
    grid = (6, 8)
    cls = 0 if "relpos" in form else 1
    model, inputs = _model(form, grid, cls), _inputs(form, grid, cls)
    gm, report = gridattn_fx.rewrite(model, inputs, stride=2, min_image_tokens=0, implementation=implementation)
    assert len(report.sites) == 1, str(report)
    site = report.sites[0]
    assert site.decision == "rewritten", str(report)
    assert site.form == REWRITTEN_FORMS[form]
    layout = (cls, *grid, 0, False)
    with oracle_mode(model, layout, layout, 2):
        expected = model(*inputs)
    out = gm(*inputs)
    # The model's own softmax runs in float32 (.float()); the rewritten SDPA keeps float64, so the
    # two agree to float32 precision only - the rewrite is the more precise of the two.
    tol = dict(atol=1e-6, rtol=1e-5) if form == "float_softmax" else {}
    assert_close64(out, expected, **tol)
    assert_differs(out, model(*inputs))


@pytest.mark.parametrize("form", ["timm", "baddbmm", "sam_relpos", "sdpa_relpos", "masked_fill"])
def test_form_non_divisible_grid_and_stride_2x4(form):
    grid = (5, 7)
    model, inputs = _model(form, grid), _inputs(form, grid)
    gm, report = gridattn_fx.rewrite(model, inputs, stride=(2, 4), min_image_tokens=0)
    assert report.sites[0].decision == "rewritten", str(report)
    layout = (0, *grid, 0, False)
    with oracle_mode(model, layout, layout, (2, 4)):
        expected = model(*inputs)
    assert_close64(gm(*inputs), expected)


@pytest.mark.parametrize("form", ["wrong_axis", "non_key_operand", "probs_returned"])
def test_lookalikes_are_never_rewritten(form):
    model, inputs = _model(form), _inputs(form, (6, 8))
    gm, report = gridattn_fx.rewrite(model, inputs, stride=2, min_image_tokens=0)
    assert not report.rewritten, str(report)
    assert_equal_exact(gm(*inputs), model(*inputs))
    if form == "wrong_axis":
        assert not report.sites  # a softmax over queries is not attention at all
    else:
        assert report.sites and all(s.reason for s in report.sites)


def test_stride_one_leaves_manual_forms_bit_identical():
    model, inputs = _model("sam_relpos"), _inputs("sam_relpos", (6, 8))
    gm, report = gridattn_fx.rewrite(model, inputs, stride=1, min_image_tokens=0)
    assert report.sites[0].decision == "skipped" and "stride 1" in report.sites[0].reason
    assert_equal_exact(gm(*inputs), model(*inputs))


@pytest.mark.parametrize("form", ["sam_relpos", "sdpa_relpos"])
def test_relpos_bias_is_computed_per_group_not_as_full_matrix(form):
    """The grouped graph must never build an L x L bias (the whole point of grid attention)."""
    grid = (16, 16)
    model, inputs = _model(form, grid), _inputs(form, grid, batch=1)
    gm, report = gridattn_fx.rewrite(model, inputs, stride=2, min_image_tokens=0)
    L = grid[0] * grid[1]
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
    biggest = max(n.meta["val"].numel() for n in gm.graph.nodes
                  if isinstance(n.meta.get("val"), torch.Tensor))
    # full per-head scores would be B*H*L*L; grouped ones are a quarter of that
    assert biggest <= HEADS * L * L // 4, biggest


# --- nn.MultiheadAttention -------------------------------------------------------------------------
class ClipTower(nn.Module):
    """CLIP-style vision tower: sequence-first tokens (L, B, E) through nn.MultiheadAttention."""

    def __init__(self, batch_first=False, need_weights=False, kdim=None):
        # kdim != DIM gives nn.MultiheadAttention separate q/k/v projection weights
        super().__init__()
        self.batch_first, self.need_weights = batch_first, need_weights
        self.conv1 = nn.Conv2d(3, DIM, 2, 2)
        self.class_embedding = nn.Parameter(torch.randn(DIM))
        self.ln = nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.kv_proj = nn.Linear(DIM, kdim) if kdim else nn.Identity()
        self.oracle = None

    def forward(self, img):
        x = self.conv1(img).flatten(2).permute(0, 2, 1)  # (B, L, E)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln(torch.cat([cls, x], dim=1))
        if not self.batch_first:
            x = x.permute(1, 0, 2)  # (L, B, E)
        mask = None
        if self.oracle is not None:
            ql, kl, stride = self.oracle
            mask = log_grid_mask(ql, kl, stride, x.dtype)
        kv = self.kv_proj(x)
        out, weights = self.attn(x, kv, kv, need_weights=self.need_weights, attn_mask=mask)
        return out if weights is None else (out, weights)


@pytest.mark.parametrize("batch_first,kdim", [(False, None), (True, None), (False, 8)],
                         ids=["seq_first", "batch_first", "separate_projections"])
def test_multihead_attention_is_expanded_and_rewritten(batch_first, kdim):
    torch.manual_seed(0)
    model = ClipTower(batch_first, kdim=kdim).double().eval()
    (img,) = _inputs("timm", (6, 8))
    gm, report = gridattn_fx.rewrite(model, (img,), stride=2, min_image_tokens=0)
    site = report.site("attn")
    assert (site.decision, site.form) == ("rewritten", "nn.MultiheadAttention"), str(report)
    assert site.q_layout == gridattn_fx.TokenLayout(1, 6, 8)
    with oracle_mode(model, (1, 6, 8, 0, False), (1, 6, 8, 0, False), 2):
        expected = model(img)
    assert_close64(gm(img), expected)


def test_multihead_attention_with_used_weights_is_left_alone():
    torch.manual_seed(0)
    model = ClipTower(need_weights=True).double().eval()
    (img,) = _inputs("timm", (6, 8))
    gm, report = gridattn_fx.rewrite(model, (img,), stride=2, min_image_tokens=0)
    site = report.site("attn")
    assert site.decision == "skipped" and "weights" in site.reason, str(report)
    for got, want in zip(gm(img), model(img)):
        assert_equal_exact(got, want)

"""Keys pooled along the token sequence (layout/analysis.py ``_pool1d``), NextViT's efficient attention:
``AvgPool1d(k, k)`` over raster tokens is the image reduced k times along its rows when every window
lies in one row (the row length a multiple of k); windows that straddle rows are no image."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gridattn_fx
from oracle import assert_close64, assert_differs, assert_equal_exact, log_grid_mask

DIM, HEADS = 16, 2


class PooledKeys(nn.Module):
    def __init__(self, k, pool="avg"):
        super().__init__()
        self.patch = nn.Conv2d(3, DIM, 2, 2)
        self.q, self.kv = nn.Linear(DIM, DIM), nn.Linear(DIM, 2 * DIM)
        self.pool = nn.AvgPool1d(k, k) if pool == "avg" else nn.MaxPool1d(k, k)
        self.norm = nn.BatchNorm1d(DIM)

    def forward(self, img, attn_mask=None):
        x = self.patch(img).flatten(2).transpose(1, 2)
        b, n, c = x.shape
        q = self.q(x).view(b, n, HEADS, -1).transpose(1, 2)
        r = self.norm(self.pool(x.transpose(1, 2))).transpose(1, 2)
        k, v = self.kv(r).view(b, r.shape[1], 2, HEADS, -1).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_keys_pooled_within_rows_are_a_reduced_image(pool):
    torch.manual_seed(0)
    model = PooledKeys(3, pool).double().eval()
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)   # 4 x 6 tokens; keys 4 x 2
    gm, report = gridattn_fx.rewrite(model, (x,), stride=2, min_image_tokens=1)
    (site,) = report.sites
    assert site.decision == "rewritten" and (str(site.q_layout), str(site.k_layout)) == ("4x6", "4x2"), str(report)
    with torch.no_grad():
        got = gm(x)
        want = model(x, attn_mask=log_grid_mask((0, 4, 6), (0, 4, 2), 2))
    assert_close64(got, want)
    assert_differs(got, model(x))


def test_windows_straddling_rows_are_no_image():
    torch.manual_seed(0)
    model = PooledKeys(4).double().eval()
    x = torch.randn(1, 3, 8, 12, dtype=torch.float64)   # rows of 6 tokens, windows of 4
    gm, report = gridattn_fx.rewrite(model, (x,), stride=2, min_image_tokens=1)
    (site,) = report.sites
    assert site.decision == "skipped" and "straddle the rows of 6 tokens" in site.reason, site.reason
    with torch.no_grad():
        assert_equal_exact(gm(x), model(x))


class UnfoldPatches(nn.Module):
    """Patchify by ``F.unfold`` (im2col): of the model input itself, or of a conv's output."""

    def __init__(self, of="input"):
        super().__init__()
        self.of = of
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.embed = nn.Linear(3 * 4, DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)

    def forward(self, img, attn_mask=None):
        x = img if self.of == "input" else self.conv(img)
        x = self.embed(F.unfold(x, kernel_size=2, stride=2).transpose(1, 2))
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("of", ["input", "conv"])
def test_unfold_patchify_against_oracle(of):
    torch.manual_seed(0)
    model = UnfoldPatches(of).double().eval()
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)   # 4 x 6 patches
    gm, report = gridattn_fx.rewrite(model, (x,), stride=2, min_image_tokens=1)
    (site,) = report.sites
    assert site.decision == "rewritten" and str(site.q_layout) == "4x6", str(report)
    assert ("patchified by unfold" in site.evidence) == (of == "input"), site.evidence
    with torch.no_grad():
        got = gm(x)
        assert_close64(got, model(x, attn_mask=log_grid_mask((0, 4, 6), (0, 4, 6), 2)))
        assert_differs(got, model(x))

"""Non-image tokens whose number is data-dependent (docs/design.md section 2): text tokens kept by a
``nonzero`` of a mask and glued behind the image (Mochi's attention processor), captured with
``torch._dynamo.config.capture_dynamic_output_shape_ops``. Their count is an unbacked SymInt: no
guard can be installed on it, and one compiled graph serves every count, zero included. The image
part is proven and static, so the site is rewritten; every result is compared in float64 with the
model run eagerly under the grid mask of the call's own layout.
"""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gridattn_fx
from gridattn_fx import GridAttnConfig
from gridattn_fx.frontends.backend import compile_with_pass
from oracle import assert_close64, assert_differs, log_grid_mask

HEADS, HEAD_DIM, TEXT = 2, 8, 6
DIM = HEADS * HEAD_DIM


class KeptText(nn.Module):
    """Patch-embedded image tokens, then the text tokens the mask keeps; joint self-attention.
    ``attn_mask`` is the oracle's way in (eager only)."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, DIM, 2, stride=2)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, image, text, keep, attn_mask=None):
        x = self.patch(image).flatten(2).transpose(1, 2)                     # (1, H*W, D)
        kept = text[:, torch.nonzero(keep.flatten()).flatten()]              # (1, n, D), n data-dependent
        seq = torch.cat([x, kept], dim=1)
        q, k, v = self.qkv(seq).view(1, -1, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).flatten(2))


def _inputs(kept: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(kept)
    keep = torch.zeros(1, TEXT, dtype=torch.bool)
    keep[:, torch.randperm(TEXT, generator=g)[:kept]] = True
    return (torch.randn(1, 3, 16, 12, generator=g, dtype=dtype), torch.randn(1, TEXT, DIM, generator=g, dtype=dtype),
            keep)


def _oracle(model, inputs, kept: int):
    layout = (0, (8, 6), kept)
    with torch.no_grad():
        return model(*inputs, attn_mask=log_grid_mask(layout, layout, 2, dtype=inputs[0].dtype))


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    return KeptText().to(dtype).eval()


def _compiled(model, implementation="grouped"):
    config = GridAttnConfig(stride=2, strict=True, min_image_tokens=0, implementation=implementation)
    torch._dynamo.reset()
    gridattn_fx.report_history(clear=True)
    return torch.compile(model, backend=lambda gm, ex: compile_with_pass(gm, ex, config, lambda g, i: g.forward))


@pytest.mark.parametrize("implementation", ["grouped", "masked"])
def test_one_graph_serves_every_count_of_kept_tokens(implementation):
    model = _model()
    compiled = _compiled(model, implementation)
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        for kept in (4, 1, 0, TEXT):
            inputs = _inputs(kept)
            got = compiled(*inputs)
            assert got.shape == (1, 48 + kept, DIM)
            assert_close64(got, _oracle(model, inputs, kept))
            with torch.no_grad():
                assert_differs(got, model(*inputs))
    reports = gridattn_fx.report_history(clear=True)
    assert len(reports) == 1, "a data-dependent count must not recompile"
    (site,) = reports[0].sites
    assert site.decision == "rewritten", site.reason
    assert str(site.q_layout) == "8x6+?" and "u0: data-dependent" in site.reason, site.reason
    assert site.flops_before is None and site.flops_after is None  # no value to count them with
    assert "1 site(s) of unknown cost not counted" in str(reports[0])


def test_through_inductor():
    """Inductor lowers the rewritten graph without a guard on the count (one spare query row for the
    text queries, a copy of the image tokens in the standard layout)."""
    model = _model(torch.float32)
    compiled = torch.compile(model, backend="gridattn", options={"stride": 2, "min_image_tokens": 0})
    gridattn_fx.report_history(clear=True)
    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), \
            warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the original graph warns
        for kept in (3, 0):
            inputs = _inputs(kept, torch.float32)
            torch.testing.assert_close(compiled(*inputs), _oracle(model, inputs, kept), atol=1e-5, rtol=1e-5)
    (report,) = gridattn_fx.report_history(clear=True)
    assert report.failure is None and len(report.rewritten) == 1


def test_without_the_setting_the_break_is_named():
    """Dynamo breaks at the nonzero without the setting: the report names the break and its hint,
    and the backend warns that attention in the uncaptured code runs dense."""
    model = _model(torch.float32)
    compiled = torch.compile(model, backend="gridattn", options={"stride": 2, "min_image_tokens": 0})
    gridattn_fx.report_history(clear=True)
    torch._dynamo.reset()
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="capture_dynamic_output_shape_ops = True"):
        compiled(*_inputs(3, torch.float32))
    reports = gridattn_fx.report_history(clear=True)
    assert any("capture_dynamic_output_shape_ops" in b for r in reports for b in r.graph_breaks)
    assert "graph break before this graph: " in "\n".join(map(str, reports))


class KeptTextMasked(KeptText):
    """The same joint attention with a boolean mask over the kept sequence: the mask's sizes are
    data-dependent too, and a mask is regrouped only with known sizes."""

    def forward(self, image, text, keep, attn_mask=None):
        x = self.patch(image).flatten(2).transpose(1, 2)
        kept = text[:, torch.nonzero(keep.flatten()).flatten()]
        seq = torch.cat([x, kept], dim=1)
        q, k, v = self.qkv(seq).view(1, -1, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)
        n = seq.size(1)
        mask = torch.ones(n, n, dtype=torch.bool, device=seq.device).tril(diagonal=n)  # all true, (n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).flatten(2))


def test_a_mask_with_data_dependent_sizes_leaves_the_site_untouched():
    torch.manual_seed(0)
    model = KeptTextMasked().double().eval()
    compiled = _compiled(model)
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        inputs = _inputs(3)
        got = compiled(*inputs)
        assert torch.equal(got, model(*inputs))
    (site,) = [s for r in gridattn_fx.report_history(clear=True) for s in r.sites]
    assert site.decision == "skipped" and "attn_mask has data-dependent sizes" in site.reason, site.reason

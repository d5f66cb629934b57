"""Layouts from position values (layout/positions.py): tokens packed outside the model whose grid the
model knows only from their coordinates (Flux's ``img_ids``) or from a coordinate grid it builds
(LTX-Video's ``meshgrid`` of ``arange``s), and the run-time check that keeps a layout read from
values true (frontends/position_guard.py).

Every rewritten result is compared in float64 with the model run eagerly under the grid mask.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gridattn_fx
from gridattn_fx import GridAttnConfig
from gridattn_fx.frontends.backend import compile_with_pass
from gridattn_fx.layout.positions import PositionGrid, position_grid
from oracle import assert_close64, assert_differs, log_grid_mask

HEADS, HEAD_DIM = 2, 8


def raster_ids(h, w, lead=0.0):
    """Flux-style ids: one row (lead, r, c) per token, row-major."""
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.full((h * w,), lead), r.flatten().double(), c.flatten().double()], dim=1)


# --- reading a grid from values ---------------------------------------------------------------------

def test_raster_ids_are_a_grid():
    assert position_grid(raster_ids(3, 5)) == PositionGrid(0, (3, 5), (1, 2), (0, 1))


def test_column_major_ids_are_the_transposed_grid():
    ids = raster_ids(3, 5).view(3, 5, 3).transpose(0, 1).reshape(15, 3)  # columns outermost
    assert position_grid(ids) == PositionGrid(0, (3, 5), (1, 2), (1, 0))


def test_video_and_scaled_coordinates():
    f, h, w = torch.meshgrid(torch.arange(2), torch.arange(3), torch.arange(4), indexing="ij")
    coords = torch.stack([f.flatten() * 0.32, h.flatten() * 32.0 - 40, w.flatten() / 7], dim=1)
    assert position_grid(coords) == PositionGrid(0, (2, 3, 4), (0, 1, 2), (0, 1, 2))
    assert position_grid(coords.unsqueeze(0).repeat(2, 1, 1)) == PositionGrid(1, (2, 3, 4), (0, 1, 2), (0, 1, 2))


@pytest.mark.parametrize("case", ["shuffled", "repeated", "one-row", "batch-differs", "five-columns", "text"])
def test_values_that_are_no_grid(case):
    ids = raster_ids(4, 4)
    if case == "shuffled":
        ids = ids[torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    elif case == "repeated":
        ids = torch.cat([ids, ids[:1]])
    elif case == "one-row":
        ids = raster_ids(1, 16)
    elif case == "batch-differs":
        ids = torch.stack([ids, raster_ids(2, 8)])
    elif case == "five-columns":
        ids = torch.cat([ids, ids[:, :2]], dim=1)
    else:
        ids = torch.zeros(8, 3)  # Flux's txt_ids
    assert position_grid(ids) is None


# --- a model whose tokens are placed only by their ids ------------------------------------------------

class PackedRope(nn.Module):
    """A Flux-like block: packed tokens, text tokens in front, a rotary table built from
    ``cat(txt_ids, img_ids)``, joint SDPA self-attention. ``attn_mask`` is the oracle's way in."""

    def __init__(self, dim=HEADS * HEAD_DIM):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.txt = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("freqs", 1.0 / (100.0 ** (torch.arange(0, HEAD_DIM // 2, 2) / (HEAD_DIM // 2))))

    def rope(self, x, table):
        cos, sin = table.cos(), table.sin()
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def forward(self, x, text, img_ids, txt_ids, attn_mask=None):
        b = x.shape[0]
        ids = torch.cat([txt_ids, img_ids], dim=0)
        table = torch.cat([torch.outer(ids[:, 1], self.freqs), torch.outer(ids[:, 2], self.freqs)], dim=-1)
        qkv = torch.cat([self.txt(text), self.qkv(x)], dim=1).view(b, -1, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.rope(q, table), self.rope(k, table)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).flatten(2))


TEXT = 3


def _inputs(h, w, dtype=torch.float64):
    g = torch.Generator().manual_seed(h * 100 + w)
    return (torch.randn(2, h * w, HEADS * HEAD_DIM, generator=g, dtype=dtype),
            torch.randn(2, TEXT, HEADS * HEAD_DIM, generator=g, dtype=dtype),
            raster_ids(h, w).to(dtype), torch.zeros(TEXT, 3, dtype=dtype))


def _oracle(model, inputs, h, w, stride=2):
    with torch.no_grad():
        return model(*inputs, attn_mask=log_grid_mask((TEXT, h, w), (TEXT, h, w), stride))


def _eager_backend(config):
    return lambda gm, example_inputs: compile_with_pass(gm, example_inputs, config, lambda g, i: g.forward)


def _model():
    torch.manual_seed(0)
    return PackedRope().double().eval()


def _sites():
    return [s for r in gridattn_fx.report_history(clear=True) for s in r.sites]


def test_layout_read_from_position_ids_against_oracle():
    model = _model()
    torch._dynamo.reset()
    gridattn_fx.report_history(clear=True)
    compiled = torch.compile(model, backend=_eager_backend(GridAttnConfig(stride=2, min_image_tokens=1, strict=True)))
    inputs = _inputs(4, 6)
    with torch.no_grad():
        got = compiled(*inputs)
        plain = model(*inputs)
    reports = gridattn_fx.report_history(clear=True)
    (site,) = [s for r in reports for s in r.sites]
    assert site.decision == "rewritten" and site.layout_source == "position values", str(reports[0])
    assert str(site.q_layout) == f"{TEXT}+4x6" and "position values of model input" in site.evidence
    assert reports[0].position_inputs, "the report names the inputs the graph checks"
    assert_close64(got, _oracle(model, inputs, 4, 6))
    assert_differs(got, plain)


class VideoRope(PackedRope):
    """Coordinates (frame, row, column) per token, in any storage order, batched ids."""

    def forward(self, x, text, ids, attn_mask=None):
        b = x.shape[0]
        ids = torch.cat([torch.zeros(TEXT, 3, dtype=ids.dtype), ids[0]])
        table = torch.cat([torch.outer(ids[:, c], self.freqs[:1]) for c in range(3)]
                          + [torch.outer(ids[:, 0], self.freqs[1:2])], dim=-1)
        qkv = torch.cat([self.txt(text), self.qkv(x)], dim=1).view(b, -1, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.rope(q, table), self.rope(k, table)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_video_coordinates_in_any_storage_order_against_oracle(order):
    """Three varying columns: a video; tokens stored in ``order`` (outermost first), text prefix
    tokens with zero coordinates (a constant column for them would not be a grid: their positions
    only join through the cat in the graph)."""
    torch.manual_seed(0)
    model = VideoRope().double().eval()
    shape = (2, 3, 4)
    storage = [shape[a] for a in order]
    grids = torch.meshgrid(*[torch.arange(n) for n in storage], indexing="ij")
    coords = [None] * 3
    for position, axis in enumerate(order):
        coords[axis] = grids[position].flatten().double()
    ids = torch.stack(coords, dim=1).unsqueeze(0).repeat(2, 1, 1)  # (batch, tokens, 3)
    x, text = _inputs(4, 6)[:2]
    torch._dynamo.reset()
    gridattn_fx.report_history(clear=True)
    compiled = torch.compile(model, backend=_eager_backend(GridAttnConfig(stride=2, min_image_tokens=1, strict=True)))
    with torch.no_grad():
        got = compiled(x, text, ids)
    (site,) = _sites()
    assert site.decision == "rewritten" and site.q_layout.image_shape == shape and site.q_layout.order == order, (
        site.reason)
    mask = log_grid_mask((TEXT, shape, 0, order), (TEXT, shape, 0, order), 2)
    with torch.no_grad():
        assert_close64(got, model(x, text, ids, attn_mask=mask))


def test_equal_length_other_aspect_gets_its_own_grid_through_inductor():
    """16 x 32 and 32 x 16 tokens: same shapes, so Dynamo reuses its graph; the position check
    compiles a variant for each grid, and each call equals its own oracle."""
    model = _model()
    torch._dynamo.reset()
    gridattn_fx.report_history(clear=True)
    compiled = torch.compile(model, backend="gridattn", options={"stride": 2, "min_image_tokens": 1, "strict": True})
    layouts = []
    for h, w in [(16, 32), (32, 16), (16, 32)]:
        inputs = _inputs(h, w)
        inputs = (inputs[0], inputs[1], raster_ids(h, w).double(), inputs[3])
        with torch.no_grad():
            got = compiled(*inputs)
        layouts += [str(s.q_layout) for s in _sites()]
        torch.testing.assert_close(got, _oracle(model, inputs, h, w), atol=1e-9, rtol=1e-9)
    # One compile per grid: the third call reuses the first variant.
    assert layouts == [f"{TEXT}+16x32", f"{TEXT}+32x16"], layouts


def test_positions_that_are_no_grid_run_dense():
    model = _model()
    torch._dynamo.reset()
    gridattn_fx.report_history(clear=True)
    compiled = torch.compile(model, backend=_eager_backend(GridAttnConfig(stride=2, min_image_tokens=1)))
    inputs = _inputs(4, 4)
    with torch.no_grad():
        compiled(*inputs)
        shuffled = (inputs[0], inputs[1], inputs[2][torch.randperm(16)], inputs[3])
        got = compiled(*shuffled)
        plain = model(*shuffled)
    sites = _sites()
    assert [s.decision for s in sites] == ["rewritten", "skipped"], [s.reason for s in sites]
    assert torch.equal(got, plain)


def test_rewrite_api_does_not_read_values():
    """``gridattn_fx.rewrite`` returns a graph module that nothing checks at run time: a layout
    read from values would be unchecked there, so it is not read."""
    model = _model()
    _gm, report = gridattn_fx.rewrite(model, _inputs(4, 4), stride=2, min_image_tokens=1)
    assert [s.decision for s in report.sites] == ["skipped"], str(report)


def test_variant_limit_falls_back_to_dense(monkeypatch):
    from gridattn_fx.frontends import checked_graph

    monkeypatch.setattr(checked_graph.CheckedGraph.__init__, "__defaults__", (2,))
    model = _model()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=_eager_backend(GridAttnConfig(stride=2, min_image_tokens=1)))
    grids = [(2, 12), (12, 2), (4, 6)]
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="2 variants"):
        for h, w in grids:
            inputs = _inputs(h, w)
            inputs = (_inputs(4, 6)[0], _inputs(4, 6)[1], raster_ids(h, w).double(), inputs[3])
            got = compiled(*inputs)
    assert torch.equal(got, model(*inputs))


# --- a coordinate grid built in the graph -------------------------------------------------------------

class MeshgridRope(PackedRope):
    """LTX-Video's form: positions from ``meshgrid(arange(H), arange(W))`` inside the model."""

    def forward(self, x, text, h: int, w: int, attn_mask=None):
        rows, cols = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
        grid = torch.stack([rows, cols], dim=0).flatten(1).transpose(0, 1)
        img_ids = torch.cat([torch.zeros(h * w, 1, dtype=x.dtype), grid], dim=1)
        return super().forward(x, text, img_ids, torch.zeros(TEXT, 3, dtype=x.dtype), attn_mask)


@pytest.mark.parametrize("indexing", ["ij", "xy"])
def test_coordinate_grid_built_in_the_graph(indexing):
    torch.manual_seed(0)
    model = MeshgridRope().double().eval()
    if indexing == "xy":  # the first two axes swapped: not read as a grid
        model.forward = lambda x, text, h, w, attn_mask=None: PackedRope.forward(
            model, x, text, torch.cat([torch.zeros(h * w, 1, dtype=x.dtype), torch.stack(
                torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="xy"),
                dim=0).flatten(1).transpose(0, 1)], dim=1), torch.zeros(TEXT, 3, dtype=x.dtype), attn_mask)
    torch._dynamo.reset()
    gridattn_fx.report_history(clear=True)
    x, text = _inputs(4, 6)[:2]
    compiled = torch.compile(model, backend=_eager_backend(GridAttnConfig(stride=2, min_image_tokens=1)))
    with torch.no_grad():
        got = compiled(x, text, 4, 6)
        plain = model(x, text, 4, 6)
    (site,) = _sites()
    if indexing == "xy":
        assert site.decision == "skipped" and torch.equal(got, plain)
        return
    assert site.decision == "rewritten" and "coordinate grid" in site.evidence, site.reason
    with torch.no_grad():
        oracle = model(x, text, 4, 6, attn_mask=log_grid_mask((TEXT, 4, 6), (TEXT, 4, 6), 2))
    assert_close64(got, oracle)


def test_decreasing_arange_is_no_grid():
    class Reversed(MeshgridRope):
        def forward(self, x, text, h: int, w: int, attn_mask=None):
            rows, cols = torch.meshgrid(torch.arange(h - 1, -1, -1, dtype=x.dtype),
                                        torch.arange(w, dtype=x.dtype), indexing="ij")
            grid = torch.stack([rows, cols], dim=0).flatten(1).transpose(0, 1)
            img_ids = torch.cat([torch.zeros(h * w, 1, dtype=x.dtype), grid], dim=1)
            return PackedRope.forward(self, x, text, img_ids, torch.zeros(TEXT, 3, dtype=x.dtype), attn_mask)

    model = Reversed().double().eval()
    torch._dynamo.reset()
    gridattn_fx.report_history(clear=True)
    x, text = _inputs(4, 6)[:2]
    with torch.no_grad():
        torch.compile(model, backend=_eager_backend(GridAttnConfig(stride=2, min_image_tokens=1)))(x, text, 4, 6)
    assert [s.decision for s in _sites()] == ["skipped"]

"""gridattn_fx.prepare: layouts remembered from a whole-model proof for regional compilation and
graph breaks, declared layouts for tokens packed outside the model, and the patchify rule.

Every rewritten result is compared in float64 against the independent oracle (tests/oracle.py)
run eagerly on an untouched copy of the model, and against the whole-model gridattn compile.
"""

import copy

import pytest
import torch
import torch.nn as nn

import gridattn_fx
from gridattn_fx import ImageTokens
from models import DIM, Block, GraphBreakViT, ViT, build, image
from oracle import assert_close64, assert_differs, assert_equal_exact, oracle_mode, oracle_sdpa

OPTS = {"stride": 2, "min_image_tokens": 1, "strict": True}


def _regional(model, options=OPTS):
    for blk in model.blocks:
        blk.compile(backend="gridattn", options=options)
    return model


def _reports():
    return [s for r in gridattn_fx.report_history(clear=True) for s in r.sites]


def _oracle(model, x, layout, **kw):
    with oracle_mode(model, layout, stride=2), torch.no_grad():
        return model(x, **kw)


def test_regional_compile_after_prepare_equals_whole_model_and_oracle():
    model = build(ViT, depth=2, n_cls=1)
    ref = copy.deepcopy(model)
    x = image(2, 32, 32)  # patch 2: 16x16 tokens + cls
    whole = torch.compile(copy.deepcopy(model), backend="gridattn", options=OPTS)
    gridattn_fx.report_history(clear=True)
    with torch.no_grad():
        expected = whole(x)
    assert [s.layout_source for s in _reports()] == ["proven in this graph"] * 2

    assert gridattn_fx.prepare(model, (x,)) is model
    _regional(model)
    with torch.no_grad():
        got = model(x)
    sites = _reports()
    # One region graph serves both blocks (same code, same layouts): one report, named by the
    # block it was compiled for, in the whole model's paths.
    assert [(s.module_path, s.decision, s.layout_source) for s in sites] == [
        ("blocks.0.attn", "rewritten", "remembered by prepare")]
    assert "serves 2 modules" in sites[0].reason
    assert str(sites[0].q_layout) == "1+16x16"
    oracle = _oracle(ref, x, (1, 16, 16))
    assert_close64(got, expected)
    assert_close64(got, oracle)
    with torch.no_grad():
        assert_differs(got, ref(x))


def test_regional_compile_without_prepare_is_unchanged():
    model = build(ViT, depth=1, n_cls=1)
    x = image(1, 32, 32)
    _regional(model, dict(OPTS, strict=False))
    gridattn_fx.report_history(clear=True)
    with torch.no_grad():
        model(x)
    (site,) = _reports()
    assert site.decision == "skipped" and "no spatial source" in site.reason and site.layout_source == ""
    assert not hasattr(model, "_gridattn_prepared")


def test_stride_one_regional_is_identity():
    model = build(ViT, depth=2, n_cls=1)
    ref = copy.deepcopy(model)
    x = image(1, 32, 32)
    gridattn_fx.prepare(model, (x,))
    _regional(model, dict(OPTS, stride=1))
    with torch.no_grad():
        got, expected = model(x), ref(x)
    assert all(s.decision == "skipped" and "stride 1" in s.reason for s in _reports())
    assert_close64(got, expected, atol=1e-12, rtol=1e-12)


def test_graph_break_between_patch_embed_and_blocks():
    model = build(GraphBreakViT, depth=1, n_cls=0)
    ref = copy.deepcopy(model)
    x = image(1, 32, 32)
    oracle = _oracle(ref, x, (0, 16, 16))

    # The blocks' graph receives the tensor the patch embedding's graph returned: its layout is
    # handed over (crossgraph/break_handoff.py); prepare() remembers the same layout.
    plain = torch.compile(copy.deepcopy(model), backend="gridattn", options=OPTS)
    gridattn_fx.report_history(clear=True)
    with torch.no_grad():
        handed = plain(x)
    assert [(s.decision, s.layout_source) for s in _reports()] == [("rewritten", "handed over across a split")]
    assert_close64(handed, oracle)

    gridattn_fx.prepare(model, (x,))
    compiled = torch.compile(model, backend="gridattn", options=OPTS)
    with torch.no_grad():
        got = compiled(x)
    sites = _reports()
    assert [(s.module_path, s.decision) for s in sites] == [("blocks.0.attn", "rewritten")]
    assert sites[0].layout_source in ("remembered by prepare", "handed over across a split")
    assert_close64(got, oracle)


def test_rewrite_of_a_prepared_model_is_the_whole_model_rewrite():
    model = build(ViT, depth=1, n_cls=1)
    x = image(1, 32, 32)
    _gm, before = gridattn_fx.rewrite(model, (x,), **OPTS)
    gridattn_fx.prepare(model, (x,))
    gm, after = gridattn_fx.rewrite(model, (x,), **OPTS)
    assert [(s.module_path, s.decision, s.layout_source) for s in after.sites] == [
        (s.module_path, s.decision, "proven in this graph") for s in before.sites] == [
        ("blocks.0.attn", "rewritten", "proven in this graph")]
    with oracle_mode(model, (1, 16, 16), stride=2), torch.no_grad():
        expected = model(x)
    with torch.no_grad():
        got = gm(x)
    assert_close64(got[0] if isinstance(got, (tuple, list)) else got, expected)


def test_resolution_change_same_token_count_gets_each_grid():
    """16x16 and 8x32 tokens have the same count: the region must recompile, never reuse."""
    model = build(ViT, depth=1, n_cls=1)
    ref = copy.deepcopy(model)
    square, wide = image(1, 32, 32), image(1, 16, 64)
    gridattn_fx.prepare(model, (square,))
    _regional(model)
    for x, layout in ((square, (1, 16, 16)), (wide, (1, 8, 32)), (square, (1, 16, 16)), (wide, (1, 8, 32))):
        with torch.no_grad():
            got = model(x)
        assert_close64(got, _oracle(ref, x, layout), msg=f"grid {layout}")
    sites = _reports()
    # Each grid compiled for itself (how often depends on Dynamo's automatic-dynamic state; the
    # marked sizes keep every graph static), each rewritten with its own layout.
    assert {(str(s.q_layout), s.decision) for s in sites} == {("1+16x16", "rewritten"), ("1+8x32", "rewritten")}


def test_prepare_is_idempotent_and_undone():
    model = build(ViT, depth=2, n_cls=1)
    ref = copy.deepcopy(model)
    x = image(1, 32, 32)
    gridattn_fx.prepare(model, (x,))
    first = gridattn_fx.prepared_layouts(model)
    gridattn_fx.prepare(model, (x,))
    assert gridattn_fx.prepared_layouts(model) == first
    assert set(first) == {"blocks.0", "blocks.0.attn", "blocks.1", "blocks.1.attn"}
    assert len(model._forward_pre_hooks) == 1
    with torch.no_grad():
        assert_equal_exact(model(x), ref(x))  # eager calls are untouched
    gridattn_fx.unprepare(model)
    assert gridattn_fx.prepared_layouts(model) is None and not model._forward_pre_hooks
    assert all("forward" not in m.__dict__ and not any(k.startswith("_gridattn") for k in m.__dict__)
               for m in model.modules())
    _regional(model, dict(OPTS, strict=False))
    with torch.no_grad():
        assert_close64(model(x), ref(x))
    assert all(s.decision == "skipped" for s in _reports())


class TokenInput(nn.Module):
    """Input already tokens (cls + an image packed outside the model), like Flux's hidden_states;
    ``pos_ids`` (N, 3) hold each image token's (0, row, col), as Flux's img_ids."""

    def __init__(self, dim=DIM, depth=2):
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList([Block(dim) for _ in range(depth)])

    def forward(self, tokens, pos_ids):
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x)
        return x


def _pos_ids(h, w):
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).double()


@pytest.mark.parametrize("regional", [False, True])
def test_declared_layout_on_token_input(regional):
    model = build(TokenInput, depth=1)
    ref = copy.deepcopy(model)
    tokens = torch.randn(1, 1 + 16 * 16, DIM, dtype=torch.float64)
    gridattn_fx.prepare(model, (tokens, _pos_ids(16, 16)),
                        tokens=ImageTokens.from_position_ids("pos_ids", prefix=1))
    compiled = _regional(model) if regional else torch.compile(model, backend="gridattn", options=OPTS)
    gridattn_fx.report_history(clear=True)
    for h, w in ((16, 16), (8, 32)):
        tokens = torch.randn(1, 1 + h * w, DIM, dtype=torch.float64)
        with torch.no_grad():
            got = compiled(tokens, _pos_ids(h, w))
        with oracle_mode(ref, (1, h, w), stride=2), torch.no_grad():
            assert_close64(got, ref(tokens, None), msg=f"{h}x{w}")
    sites = _reports()
    assert {(str(s.q_layout), s.decision, s.layout_source) for s in sites} == {
        ("1+16x16", "rewritten", "declared"), ("1+8x32", "rewritten", "declared")}


def test_declarations_are_checked():
    model = build(TokenInput, depth=1)
    tokens = torch.randn(1, 1 + 64, DIM, dtype=torch.float64)
    ids = _pos_ids(8, 8)
    with pytest.raises(ValueError, match="'hidden_states'"):
        gridattn_fx.prepare(model, (tokens, ids), hidden_states=ImageTokens(height=8, width=8))
    with pytest.raises(ValueError, match="'tokens'.*65"):
        gridattn_fx.prepare(model, (tokens, ids), tokens=ImageTokens(height=8, width=8))  # forgot the cls
    with pytest.raises(ValueError, match="ImageTokens.height"):
        ImageTokens(height=0, width=8)
    with pytest.raises(TypeError, match="ImageTokens.width"):
        ImageTokens(height=8, width=2.5)
    with pytest.raises(TypeError, match="'tokens'"):
        gridattn_fx.prepare(model, (tokens, ids), tokens=(8, 8))
    with pytest.raises(ValueError, match="'pos_ids'.*raster"):
        gridattn_fx.prepare(model, (tokens, ids.flip(0)), tokens=ImageTokens.from_position_ids("pos_ids", prefix=1))
    assert not hasattr(model, "_gridattn_prepared")
    # Checked at every call, too.
    gridattn_fx.prepare(model, (tokens, ids), tokens=ImageTokens(height=8, width=8, prefix=1))
    with pytest.raises(ValueError, match="'tokens'"):
        model(torch.randn(1, 1 + 60, DIM, dtype=torch.float64), ids)


def test_prepare_with_failing_inputs_raises():
    model = build(ViT, depth=1)
    with pytest.raises(RuntimeError, match="prepare\\(\\).*ViT"):
        gridattn_fx.prepare(model, (torch.randn(1, 5, 32, 32, dtype=torch.float64),))
    with pytest.raises(TypeError, match="example_inputs"):
        gridattn_fx.prepare(model, torch.randn(1, 3, 32, 32))
    assert not hasattr(model, "_gridattn_prepared") and not model._forward_pre_hooks


# --- patchify inside a graph (Flux's _pack_latents) --------------------------------------------

class PackedAttention(nn.Module):
    """conv -> Flux's 2x2 _pack_latents (view/permute/reshape) -> attention over the patch grid."""

    def __init__(self, dim=DIM, swap=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.proj = nn.Linear(16, dim)
        self.attn = Block(dim).attn
        self.swap = swap

    def forward(self, img):
        x = self.conv(img)
        b, c, h, w = x.shape
        if self.swap:  # the inner factor first: rows of 2 halves, not of 2x2 patches
            x = x.view(b, c, 2, h // 2, 2, w // 2).permute(0, 3, 5, 1, 2, 4).reshape(b, (h // 2) * (w // 2), c * 4)
        else:
            x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        return self.attn(self.proj(x))


def test_patchify_is_a_layout_transform():
    model = build(PackedAttention)
    x = image(1, 16, 32)
    gm, report = gridattn_fx.rewrite(model, (x,), **OPTS)
    (site,) = report.sites
    assert site.decision == "rewritten" and str(site.q_layout) == "8x16" and "patchify" in site.evidence
    with torch.no_grad():
        got = gm(x)
    got = got[0] if isinstance(got, (tuple, list)) else got
    with oracle_mode(model, (0, 8, 16), stride=2), torch.no_grad():
        assert_close64(got, model(x))


def test_patchify_with_inner_factor_outside_is_not_a_grid():
    model = build(PackedAttention, swap=True)
    x = image(1, 16, 32)
    _gm, report = gridattn_fx.rewrite(model, (x,), **dict(OPTS, strict=False))
    (site,) = report.sites
    assert site.decision == "skipped", site.q_layout


# --- the marker against the graph's own proof ---------------------------------------------------

class MarkedViT(ViT):
    """A ViT whose patch tokens carry an explicit gridattn::layout_hint (as prepare() would put)."""

    def __init__(self, hint, **kw):
        super().__init__(**kw)
        self.hint = hint

    def forward(self, img):
        x = self.patch_embed(img).flatten(2).transpose(1, 2)
        x = torch.ops.gridattn.layout_hint.default(x, [1], list(self.hint), False, True)
        for blk in self.blocks:
            x = blk(x)
        return x


@pytest.mark.parametrize("hint, decision, words", [
    ((0, 16, 16, 0), "rewritten", "proven in this graph"),      # agrees: the graph's own proof wins
    ((0, 8, 32, 0), "skipped", "contradicts this graph's proof"),  # same count, other grid: dropped
])
def test_marker_checked_against_the_graph(hint, decision, words):
    model = build(MarkedViT, hint, depth=1, n_cls=0)
    x = image(1, 32, 32)
    gm, report = gridattn_fx.rewrite(model, (x,), **dict(OPTS, strict=False))
    (site,) = report.sites
    assert site.decision == decision, str(report)
    assert words in (site.layout_source if decision == "rewritten" else site.reason), str(report)
    assert not any("layout_hint" in str(n.target) for n in gm.graph.nodes)  # the marker is gone
    with torch.no_grad():
        got = gm(x)
    got = got[0] if isinstance(got, (tuple, list)) else got
    if decision == "rewritten":
        with oracle_mode(model, (0, 16, 16), stride=2), torch.no_grad():
            assert_close64(got, model(x))
    else:
        with torch.no_grad():
            assert_close64(got, model(x))


def test_marker_is_a_free_alias_for_other_backends():
    model = build(MarkedViT, (0, 16, 16, 0), depth=1, n_cls=0)
    x = image(1, 32, 32)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        assert_equal_exact(compiled(x), model(x))


class TokensPlusConvPositions(TokenInput):
    """Declared tokens meet positions the graph proves from a conv: the two must agree."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.pos = nn.Conv2d(3, DIM, 2, 2)

    def forward(self, tokens, img):
        x = self.embed(tokens) + self.pos(img).flatten(2).transpose(1, 2)
        for blk in self.blocks:
            x = blk(x)
        return x


def test_declaration_contradicting_the_graph_raises():
    model = build(TokensPlusConvPositions, depth=1)
    tokens, img = torch.randn(1, 256, DIM, dtype=torch.float64), image(1, 32, 32)
    with pytest.raises(ValueError, match="declared input 'tokens'.*8x32.*16x16"):
        gridattn_fx.prepare(model, (tokens, img), tokens=ImageTokens(height=8, width=32))
    gridattn_fx.prepare(model, (tokens, img), tokens=ImageTokens(height=16, width=16))  # agrees: fine


# --- module paths of a region graph: the whole model's, decided alike for every module it serves ----

def _regional_reports(options, depth=2):
    model = build(ViT, depth=depth, n_cls=1)
    ref = copy.deepcopy(model)
    x = image(1, 32, 32)
    gridattn_fx.prepare(model, (x,))
    _regional(model, dict(OPTS, **options))
    gridattn_fx.report_history(clear=True)
    with torch.no_grad():
        got = model(x)
    return got, ref, x, _reports()


def test_region_paths_let_path_options_select_a_shared_graph():
    # include / site_strides written for the whole model now reach a regional compile's graph.
    got, ref, x, (site,) = _regional_reports({"include": [r"^blocks\.\d+\.attn$"],
                                              "site_strides": {"blocks.0.attn": 4, "blocks.1.attn": 4}})
    assert (site.module_path, site.decision, site.stride) == ("blocks.0.attn", "rewritten", (4, 4)), site.reason
    with oracle_mode(ref, (1, 16, 16), stride=4), torch.no_grad():
        assert_close64(got, ref(x))


def test_region_shared_by_modules_the_options_tell_apart_stays_dense():
    # One graph serves blocks.0 and blocks.1; include selects only blocks.1: no single decision is
    # right for both, so the site stays dense (and says so) rather than applying one block's choice.
    with pytest.warns(RuntimeWarning, match="regional compilation"):
        got, ref, x, (site,) = _regional_reports({"include": [r"^blocks\.1\."]})
    assert site.decision == "skipped" and "decide `blocks.0.attn` (dense) and `blocks.1.attn` (grid 2x2)" in site.reason
    with torch.no_grad():
        assert_close64(got, ref(x))  # dense: the untouched model's result
    with pytest.warns(RuntimeWarning, match="regional compilation"):
        _, _, _, (site,) = _regional_reports({"site_strides": {"blocks.1.attn": 4}})
    assert site.decision == "skipped" and "(grid 2x2) and `blocks.1.attn` (grid 4x4)" in site.reason


def test_region_site_strides_keys_of_other_served_modules_are_not_unmatched():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "key ... matches no attention site" would raise
        _, _, _, (site,) = _regional_reports({"site_strides": {"blocks.0.attn": 2, "blocks.1.attn": 2}})
    assert site.decision == "rewritten"


class _RoundTripAttention(nn.Module):
    """Packed tokens viewed as an H x W image and flattened back before attention: the declared
    layout reaches the site through a Spatial fact and back into Tokens."""

    def __init__(self, side=8, dim=8):
        super().__init__()
        self.side = side
        self.proj = nn.Linear(dim, dim)

    def forward(self, hidden_states, oracle_layout=None):
        b, n, c = hidden_states.shape
        x = hidden_states.transpose(1, 2).reshape(b, c, self.side, self.side)
        x = self.proj(x.flatten(2).transpose(1, 2))
        q = x.unflatten(-1, (2, c // 2)).transpose(1, 2)
        if oracle_layout is not None:
            return oracle_sdpa(q, q, q, q_layout=oracle_layout, k_layout=oracle_layout, stride=2)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q)


class _RoundTrip(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _RoundTripAttention()

    def forward(self, hidden_states):
        return self.attn(hidden_states)


def test_declared_input_of_a_site_module_survives_a_reshape_round_trip():
    """The declared input goes straight into the module that holds the site (its marker is what
    that module's input is), and reaches the site through an image view: remembered, rewritten to
    the oracle, and reported as declared all the way."""
    model = _RoundTrip().double()
    x = torch.randn(1, 64, 8, dtype=torch.float64)
    gridattn_fx.prepare(model, (x,), hidden_states=ImageTokens(height=8, width=8))
    assert gridattn_fx.prepared_layouts(model) == {"attn": [(0, "0+8x8+0 tokens on axis 1 (declared)")]}
    gridattn_fx.report_history(clear=True)
    with torch.no_grad():
        got = torch.compile(model, backend="gridattn", options=OPTS)(x)
        expected = model.attn(x, oracle_layout=(0, 8, 8, 0))
        assert_differs(expected, model.attn(x))  # the grid is not the dense attention here
    assert_close64(got, expected)
    (site,) = _reports()
    assert (site.decision, str(site.q_layout), site.layout_source) == ("rewritten", "8x8", "declared"), site
    gridattn_fx.unprepare(model)


def test_a_site_fed_by_packed_tokens_names_the_declaration_that_rewrites_it():
    """No graph value proves packed tokens an image: the skip reason is the prepare() line, and that
    line rewrites the site (crossgraph/suggest.py)."""
    model = build(TokenInput, depth=1)
    tokens, ids = torch.randn(1, 1 + 8 * 8, DIM, dtype=torch.float64), _pos_ids(8, 8)
    _gm, report = gridattn_fx.rewrite(model, (tokens, ids), **OPTS)
    (site,) = report.sites
    line = 'gridattn_fx.prepare(model, inputs, tokens=ImageTokens.from_position_ids("pos_ids", prefix=1))'
    assert site.decision == "skipped" and line in site.reason, site.reason
    gridattn_fx.prepare(model, (tokens, ids), tokens=ImageTokens.from_position_ids("pos_ids", prefix=1))
    gridattn_fx.report_history(clear=True)
    with torch.no_grad():
        torch.compile(model, backend="gridattn", options=OPTS)(tokens, ids)
    assert [s.decision for s in _reports()] == ["rewritten"]


def test_text_tokens_get_no_declaration_hint():
    """Text or conditioning inputs (by name) are never offered as images: a wrong declaration is no fix."""

    class TextEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block(DIM)

        def forward(self, encoder_hidden_states):
            return self.block(encoder_hidden_states)

    text = torch.randn(1, 64, DIM, dtype=torch.float64)
    _gm, report = gridattn_fx.rewrite(build(TextEncoder), (text,), **OPTS)
    (site,) = report.sites
    assert site.decision == "skipped" and "declare" not in site.reason, site.reason

"""gridattn_fx.rewrite(): layout inference on real model shapes, policy decisions, the report.

rewrite() runs Dynamo capture + our pass without inductor, so these tests are cheap. Every
rewritten site is compared with the independent oracle (tests/oracle.py) through the models'
oracle hook, every skipped site with the untouched eager model, and every test also asserts the
report's decisions.
"""

import re
from dataclasses import dataclass, field

import pytest
import torch
import torch.fx

from models import (Attention, ChannelMixingReshape, CrossCovarianceAttention, ImageTextCross,
                    JointImageText, ManualViT, PermutedTokens, SamEncoder, SegFormerStage, SwinWindowAttention,
                    TextTransformer, TorchvisionViT, TwoImagesOneSequence, ViT, build, image, token_ids)
from oracle import (assert_close64, assert_differs, assert_equal_exact, layout_tuple,
                    oracle_mode, stride_tuple)

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx import TokenLayout  # noqa: E402


def rewrite(model, inputs, **opts):
    # test images are tiny; the default min_image_tokens=1024 would skip everything
    opts.setdefault("min_image_tokens", 0)
    return gridattn_fx.rewrite(model, inputs, **opts)


def site(report, path):
    return report.site(re.escape(path) + "$")


def expect_rewritten(report, path, q_layout, k_layout, stride, impl="grouped"):
    s = site(report, path)
    assert s.decision == "rewritten", f"{path}: {s.reason}\n{report}"
    assert s.q_layout == TokenLayout(*layout_tuple(q_layout)), str(report)
    assert s.k_layout == TokenLayout(*layout_tuple(k_layout)), str(report)
    assert tuple(s.stride) == stride_tuple(stride)
    assert s.form == "sdpa"
    assert isinstance(s.evidence, str) and s.evidence
    assert s.flops_before and s.flops_after
    if impl == "grouped":
        assert s.flops_after < s.flops_before
    else:  # the dense masked form saves nothing
        assert s.flops_after == s.flops_before
    return s


def expect_skipped(report, path, *words):
    s = site(report, path)
    assert s.decision == "skipped", f"{path} was rewritten\n{report}"
    reason = s.reason.lower()
    assert any(w in reason for w in words), f"{path}: reason {s.reason!r} lacks any of {words}"
    return s


def lint(gm):
    graph = getattr(gm, "graph", None)
    if graph is not None:
        graph.lint()


# ---------------------------------------------------------------------------------------------
# eligible sites: output == oracle, decisions and proven layouts in the report
# ---------------------------------------------------------------------------------------------
@dataclass
class Case:
    make: object                   # () -> model
    inputs: object                 # () -> tuple of inputs
    stride: object
    sites: dict = field(default_factory=dict)   # module path -> (q layout, k layout)


def _vit_sites(depth, lay):
    return {f"blocks.{i}.attn": (lay, lay) for i in range(depth)}


CASES = {
    # 1 cls + 4 registers, non-square 6 x 10 token image
    "vit_cls_reg_nonsquare": Case(lambda: build(ViT, n_cls=1, n_reg=4, grid=(6, 10)),
                                  lambda: (image(2, 12, 20),), 2, _vit_sites(2, (5, 6, 10))),
    # NHWC, heads folded into the batch, 3-D SDPA
    "sam_nhwc_3d": Case(lambda: build(SamEncoder, grid=(6, 10)),
                        lambda: (image(2, 12, 20),), 2,
                        {"blocks.0.attn": ((0, 6, 10), (0, 6, 10))}),
    # spatially reduced keys/values: Lq != Lk, each side on its own grid
    "segformer_sr": Case(lambda: build(SegFormerStage),
                         lambda: (image(2, 16, 24),), 2,
                         {"blocks.0.attn": ((0, 8, 12), (0, 4, 6))}),
    "segformer_odd": Case(lambda: build(SegFormerStage),
                          lambda: (image(1, 14, 20),), 2,
                          {"blocks.0.attn": ((0, 7, 10), (0, 3, 5))}),
    # image tokens then 7 text tokens: text is a suffix on both sides
    "joint_image_text": Case(lambda: build(JointImageText),
                             lambda: (image(2, 12, 20), token_ids(2, 7)), 2,
                             {"blocks.0.attn": ((0, 6, 10, 7), (0, 6, 10, 7))}),
    "tokens_25x25_stride2": Case(lambda: build(ViT, depth=1, patch=1, grid=(25, 25)),
                                 lambda: (image(1, 25, 25),), 2, _vit_sites(1, (1, 25, 25))),
    "nonsquare_nondivisible_stride2": Case(lambda: build(ViT, depth=1, grid=(7, 11)),
                                           lambda: (image(2, 14, 22),), 2, _vit_sites(1, (1, 7, 11))),
    "nonsquare_nondivisible_stride3": Case(lambda: build(ViT, depth=1, grid=(7, 11)),
                                           lambda: (image(2, 14, 22),), 3, _vit_sites(1, (1, 7, 11))),
    "stride_2x4": Case(lambda: build(ViT, depth=1, grid=(8, 12)),
                       lambda: (image(2, 16, 24),), (2, 4), _vit_sites(1, (1, 8, 12))),
    "stride_2x4_nondivisible": Case(lambda: build(ViT, depth=1, n_reg=2, grid=(6, 10)),
                                    lambda: (image(2, 12, 20),), (2, 4), _vit_sites(1, (3, 6, 10))),
    "stride_1x2": Case(lambda: build(ViT, depth=1, grid=(6, 10)),
                       lambda: (image(2, 12, 20),), (1, 2), _vit_sites(1, (1, 6, 10))),
    # column-major flatten: the grid is still on the image's rows and columns (asymmetric stride
    # tells a transposed layout from a W x H row-major one)
    "transposed": Case(lambda: build(ViT, depth=1, grid=(6, 10), transposed=True),
                       lambda: (image(2, 12, 20),), (2, 4), _vit_sites(1, (1, 6, 10, 0, True))),
    "prefix_and_suffix": Case(lambda: build(ViT, depth=1, n_cls=1, n_suffix=3, grid=(6, 10)),
                              lambda: (image(2, 12, 20),), 2, _vit_sites(1, (1, 6, 10, 3))),
    "custom_scale": Case(lambda: build(ViT, depth=1, grid=(6, 10), scale=0.2),
                         lambda: (image(2, 12, 20),), 2, _vit_sites(1, (1, 6, 10))),
    "no_prefix_batch3": Case(lambda: build(ViT, depth=1, n_cls=0, grid=(4, 6)),
                             lambda: (image(3, 8, 12),), 2, _vit_sites(1, (0, 4, 6))),
}


def _run_case(case, **opts):
    model = case.make()
    inputs = case.inputs()
    gm, report = rewrite(model, inputs, stride=case.stride, **opts)
    lint(gm)
    return model, inputs, gm, report


def _oracle_output(model, inputs, case):
    # every attention module of these models is a site; switch each to its own layouts
    switched = []
    for path, (ql, kl) in case.sites.items():
        mod = model.get_submodule(path)
        mod.oracle = (ql, kl, case.stride)
        switched.append(mod)
    try:
        return model(*inputs)
    finally:
        for mod in switched:
            mod.oracle = None


@pytest.mark.parametrize("name", list(CASES))
def test_rewrite_matches_oracle(name):
    case = CASES[name]
    model, inputs, gm, report = _run_case(case)
    assert report.failure is None, report.failure
    assert len(report.sites) == len(case.sites), str(report)
    for path, (ql, kl) in case.sites.items():
        expect_rewritten(report, path, ql, kl, case.stride)
    out = gm(*inputs)
    ref = _oracle_output(model, inputs, case)
    assert_close64(out, ref)
    assert_differs(ref, model(*inputs))


@pytest.mark.parametrize("name", ["vit_cls_reg_nonsquare", "sam_nhwc_3d", "segformer_odd",
                                  "joint_image_text", "transposed", "stride_2x4_nondivisible"])
def test_masked_implementation_equals_grouped(name):
    case = CASES[name]
    model, inputs, gm_g, rep_g = _run_case(case, implementation="grouped")
    gm_m, rep_m = rewrite(model, inputs, stride=case.stride, implementation="masked")
    assert _decisions(rep_g) == _decisions(rep_m)
    out_g, out_m = gm_g(*inputs), gm_m(*inputs)
    assert_close64(out_m, out_g)
    assert_close64(out_m, _oracle_output(model, inputs, case))


def _decisions(report):
    return sorted((s.module_path, s.decision, s.q_layout, s.k_layout,
                   None if s.stride is None else tuple(s.stride)) for s in report.sites)


def test_rewrite_other_inputs_same_shape():
    # the rewritten graph is a function of its inputs, not of the example it was built from
    case = CASES["vit_cls_reg_nonsquare"]
    model, inputs, gm, _ = _run_case(case)
    x2 = image(2, 12, 20)
    assert_close64(gm(x2), _oracle_output(model, (x2,), case))


def test_rewrite_input_gradient_matches_oracle():
    case = CASES["segformer_sr"]
    model, (x,), gm, report = _run_case(case)
    xg = x.clone().requires_grad_()
    gout = torch.randn_like(model(x))
    (g_rw,) = torch.autograd.grad(gm(xg), xg, gout)
    xo = x.clone().requires_grad_()
    (g_or,) = torch.autograd.grad(_oracle_output(model, (xo,), case), xo, gout)
    assert_close64(g_rw, g_or)


def test_rewrite_float32():
    model = ViT(depth=1, grid=(6, 10)).eval()
    x = image(2, 12, 20, dtype=torch.float32)
    gm, report = rewrite(model, (x,), stride=2)
    expect_rewritten(report, "blocks.0.attn", (1, 6, 10), (1, 6, 10), 2)
    out = gm(x)
    assert out.dtype == torch.float32
    with oracle_mode(model, (1, 6, 10), stride=2):
        ref = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# additive float and boolean attn_mask given to the model (B in B + log M)
# ---------------------------------------------------------------------------------------------
L_MASK = 1 + 6 * 10


def _bool_mask(shape):
    m = torch.rand(shape) > 0.5
    idx = torch.arange(L_MASK)
    m[..., idx, idx] = True  # the diagonal is always grid-allowed: no fully masked rows
    return m


MASKS = {
    "float_per_head": lambda: torch.randn(1, 2, L_MASK, L_MASK, dtype=torch.float64),
    "float_broadcast_2d": lambda: torch.randn(L_MASK, L_MASK, dtype=torch.float64),
    "float_per_batch": lambda: torch.randn(2, 1, L_MASK, L_MASK, dtype=torch.float64),
    "bool_per_batch": lambda: _bool_mask((2, 1, L_MASK, L_MASK)),
    "bool_2d": lambda: _bool_mask((L_MASK, L_MASK)),
}


@pytest.mark.parametrize("impl", ["grouped", "masked"])
@pytest.mark.parametrize("kind", list(MASKS))
def test_attn_mask_is_kept_and_restricted(kind, impl):
    model = build(ViT, depth=1, grid=(6, 10))
    x, mask = image(2, 12, 20), MASKS[kind]()
    gm, report = rewrite(model, (x, mask), stride=2, implementation=impl)
    assert report.failure is None, report.failure
    expect_rewritten(report, "blocks.0.attn", (1, 6, 10), (1, 6, 10), 2, impl)
    out = gm(x, mask)
    with oracle_mode(model, (1, 6, 10), stride=2):
        ref = model(x, mask)
    assert_close64(out, ref)
    assert_differs(ref, model(x, mask))


# ---------------------------------------------------------------------------------------------
# sites that must stay untouched
# ---------------------------------------------------------------------------------------------
def test_text_self_attention_untouched():
    model = build(TextTransformer)
    ids = token_ids(2, 256)
    gm, report = rewrite(model, (ids,), stride=2)
    s = expect_skipped(report, "blocks.0.attn", "no proven image layout")
    assert s.q_layout is None
    assert report.rewritten == []
    assert_equal_exact(gm(ids), model(ids))


def test_cross_attention_to_text_untouched():
    model = build(ImageTextCross)
    img, ids = image(2, 12, 20), token_ids(2, 9)
    gm, report = rewrite(model, (img, ids), stride=2)
    expect_rewritten(report, "blocks.0.attn", (0, 6, 10), (0, 6, 10), 2)
    s = expect_skipped(report, "cross", "no proven image layout", "cross")
    assert s.k_layout is None
    out = gm(img, ids)
    with oracle_mode(model, (0, 6, 10), stride=2, only=["blocks.0.attn"]):
        ref = model(img, ids)
    assert_close64(out, ref)


def test_causal_image_attention_untouched():
    model = build(ViT, depth=1, grid=(6, 10), causal=True)
    x = image(2, 12, 20)
    gm, report = rewrite(model, (x,), stride=2)
    expect_skipped(report, "blocks.0.attn", "causal")
    assert_equal_exact(gm(x), model(x))


@pytest.mark.parametrize("stride", [1, (1, 1)])
def test_stride_one_bit_for_bit(stride):
    model = build(ViT, n_reg=4, grid=(6, 10))
    x = image(2, 12, 20)
    gm, report = rewrite(model, (x,), stride=stride)
    assert report.rewritten == []
    for i in range(2):
        expect_skipped(report, f"blocks.{i}.attn", "stride 1")
    assert_equal_exact(gm(x), model(x))


# ---------------------------------------------------------------------------------------------
# look-alikes: tokens that come from an image but whose sequence axis is not (provably) one.
# A wrong proof here silently changes the model, so these must be skipped.
# ---------------------------------------------------------------------------------------------
LOOK_ALIKES = {
    "reshape_without_transpose": (lambda: build(ChannelMixingReshape), lambda: (image(2, 12, 20),)),
    "permuted_tokens": (lambda: build(PermutedTokens, 60), lambda: (image(2, 12, 20),)),
    "two_images": (lambda: build(TwoImagesOneSequence), lambda: (image(2, 12, 20), image(2, 12, 20))),
    "channel_attention": (lambda: build(CrossCovarianceAttention), lambda: (image(2, 12, 20),)),
}


@pytest.mark.parametrize("name", list(LOOK_ALIKES))
def test_look_alikes_untouched(name):
    make, inputs = LOOK_ALIKES[name]
    model, args = make(), inputs()
    gm, report = rewrite(model, args, stride=2)
    assert report.failure is None, report.failure
    assert len(report.sites) == 1
    s = report.sites[0]
    assert s.decision == "skipped", str(report)
    assert "no proven image layout" in s.reason.lower(), s.reason
    assert_equal_exact(gm(*args), model(*args))


def test_swin_windows_correct_either_way():
    # windows folded into the batch: skipping is fine; rewriting is only right with the
    # per-window 4 x 4 layout
    model = build(SwinWindowAttention, ws=4)
    x = image(2, 16, 24)
    gm, report = rewrite(model, (x,), stride=2)
    s = site(report, "attn")
    if s.decision == "rewritten":
        assert s.q_layout == TokenLayout(0, 4, 4) and s.k_layout == TokenLayout(0, 4, 4)
        with oracle_mode(model, (0, 4, 4), stride=2):
            assert_close64(gm(x), model(x))
    else:
        assert_equal_exact(gm(x), model(x))


@pytest.mark.parametrize("make,path,form", [
    (lambda: build(TorchvisionViT), "layers.0.self_attention", "nn.MultiheadAttention"),
    (lambda: build(ManualViT, grid=(6, 10)), "blocks.0.attn", "manual-matmul"),
], ids=["nn_multihead_attention", "manual_matmul_softmax"])
def test_other_attention_spellings_are_rewritten(make, path, form):
    model = make()
    x = image(2, 12, 20)
    gm, report = rewrite(model, (x,), stride=2)
    assert report.failure is None, report.failure
    hits = [s for s in report.sites if s.decision == "rewritten"]
    assert [(s.module_path, s.form) for s in hits] == [(path, form)], str(report)
    assert hits[0].q_layout == TokenLayout(1, 6, 10)
    with oracle_mode(model, (1, 6, 10), stride=2):
        assert_close64(gm(x), model(x))


# ---------------------------------------------------------------------------------------------
# policy: min_image_tokens, include, exclude
# ---------------------------------------------------------------------------------------------
def test_min_image_tokens_default_skips_small_images():
    model = build(ViT, depth=1, grid=(6, 10))
    x = image(2, 12, 20)
    gm, report = gridattn_fx.rewrite(model, (x,), stride=2)  # default min_image_tokens=1024
    s = expect_skipped(report, "blocks.0.attn", "min_image_tokens")
    # the layout is still proven and reported, only the policy said no
    assert s.q_layout == TokenLayout(1, 6, 10)
    assert_equal_exact(gm(x), model(x))


@pytest.mark.parametrize("threshold,decision", [(60, "rewritten"), (61, "skipped")])
def test_min_image_tokens_boundary(threshold, decision):
    # the threshold counts the query image's H * W (60), not the sequence length (61)
    model = build(ViT, depth=1, grid=(6, 10))
    x = image(1, 12, 20)
    gm, report = rewrite(model, (x,), stride=2, min_image_tokens=threshold)
    assert site(report, "blocks.0.attn").decision == decision
    if decision == "skipped":
        expect_skipped(report, "blocks.0.attn", "min_image_tokens")
        assert_equal_exact(gm(x), model(x))
    else:
        with oracle_mode(model, (1, 6, 10), stride=2):
            assert_close64(gm(x), model(x))


@pytest.mark.parametrize("opts,word", [({"include": [r"blocks\.0\."]}, "include"),
                                       ({"exclude": [r"blocks\.1"]}, "exclude")])
def test_include_exclude(opts, word):
    model = build(ViT, depth=2, grid=(6, 10))
    x = image(2, 12, 20)
    gm, report = rewrite(model, (x,), stride=2, **opts)
    expect_rewritten(report, "blocks.0.attn", (1, 6, 10), (1, 6, 10), 2)
    expect_skipped(report, "blocks.1.attn", word)
    with oracle_mode(model, (1, 6, 10), stride=2, only=["blocks.0.attn"]):
        ref = model(x)
    assert_close64(gm(x), ref)


def test_config_object_and_options():
    model = build(ViT, depth=1, grid=(6, 10))
    x = image(1, 12, 20)
    cfg = gridattn_fx.GridAttnConfig(stride=(2, 4), min_image_tokens=0)
    gm, report = gridattn_fx.rewrite(model, (x,), config=cfg)
    expect_rewritten(report, "blocks.0.attn", (1, 6, 10), (1, 6, 10), (2, 4))
    with oracle_mode(model, (1, 6, 10), stride=(2, 4)):
        assert_close64(gm(x), model(x))


# ---------------------------------------------------------------------------------------------
# graphs given as torch.fx.GraphModule
# ---------------------------------------------------------------------------------------------
def test_traced_attention_alone_has_no_layout():
    # the tokens arrive as a plain input: nothing proves they are an image
    attn = build(Attention)
    gm_in = torch.fx.symbolic_trace(attn)
    x = torch.randn(2, 64, 16, dtype=torch.float64)
    gm, report = rewrite(gm_in, (x,), stride=2)
    assert len(report.sites) == 1
    s = report.sites[0]
    assert s.decision == "skipped" and "no proven image layout" in s.reason.lower(), str(report)
    assert_equal_exact(gm(x), attn(x))


def test_traced_sam_rewritten_input_graph_untouched():
    # symbolic_trace graphs have no shapes until the pass propagates the example inputs
    model = build(SamEncoder, grid=(6, 10))
    x = image(2, 12, 20)
    traced = torch.fx.symbolic_trace(model)
    code = traced.code
    gm, report = rewrite(traced, (x,), stride=2)
    expect_rewritten(report, "blocks.0.attn", (0, 6, 10), (0, 6, 10), 2)
    with oracle_mode(model, (0, 6, 10), stride=2):
        assert_close64(gm(x), model(x))
    # the caller's GraphModule is not modified
    assert traced.code == code
    assert_equal_exact(traced(x), model(x))


def test_traced_vit_is_correct_either_way():
    # fx.symbolic_trace graphs carry no shapes; whatever the pass decides must be right
    model = build(ViT, depth=1, n_reg=2, grid=(6, 10))
    x = image(2, 12, 20)
    gm, report = rewrite(torch.fx.symbolic_trace(model), (x,), stride=2)
    assert report.failure is None, report.failure
    s = report.sites[0]
    if s.decision == "rewritten":
        assert s.q_layout == TokenLayout(3, 6, 10)
        with oracle_mode(model, (3, 6, 10), stride=2):
            assert_close64(gm(x), model(x))
    else:
        assert s.reason
        assert_equal_exact(gm(x), model(x))


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
def test_report_contents():
    model = build(ViT, depth=2, n_reg=4, grid=(6, 10))
    x = image(2, 12, 20)
    gm, report = rewrite(model, (x,), stride=2, exclude=[r"blocks\.1"])
    assert gridattn_fx.last_report() is report
    assert [s.module_path for s in report.sites] == ["blocks.0.attn", "blocks.1.attn"]
    s0, s1 = report.sites
    for s in report.sites:
        assert isinstance(s.node, str) and s.node
        assert s.form == "sdpa"
        assert tuple(s.q_shape) == (2, 2, 65, 8) and tuple(s.k_shape) == (2, 2, 65, 8)
        assert isinstance(s.flops_before, int) and s.flops_before > 0
        assert s.q_layout == TokenLayout(5, 6, 10)  # proven even where the policy skipped
    assert [s.decision for s in report.rewritten] == ["rewritten"]
    assert report.rewritten[0] is s0 or report.rewritten[0] == s0
    assert len(report.skipped) == 1 and report.skipped[0].module_path == "blocks.1.attn"
    assert s1.flops_after in (None, s1.flops_before)
    text = str(report)
    for word in ("blocks.0.attn", "blocks.1.attn", "rewritten", "skipped"):
        assert word in text
    with pytest.raises(Exception):
        report.site(r"blocks")  # two matches
    with pytest.raises(Exception):
        report.site(r"nothing_here")


def test_report_flops_scale_with_groups():
    # no prefix, divisible 8 x 12 image: every query attends to exactly 1/(Gh*Gw) of the keys
    model = build(ViT, depth=1, n_cls=0, grid=(8, 12))
    x = image(1, 16, 24)
    _, report = rewrite(model, (x,), stride=(2, 2))
    s = expect_rewritten(report, "blocks.0.attn", (0, 8, 12), (0, 8, 12), 2)
    assert s.flops_after == pytest.approx(s.flops_before / 4, rel=0.05)


class _SdpaRecorder(torch.overrides.TorchFunctionMode):
    """Records the cost of every SDPA call actually executed."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "scaled_dot_product_attention" in getattr(func, "__name__", ""):
            q, k, v = args[:3]
            bh = q.shape[:-2].numel()
            self.flops += 2 * bh * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", ["vit_cls_reg_nonsquare", "segformer_sr", "joint_image_text",
                                  "sam_nhwc_3d", "stride_2x4"])
@pytest.mark.parametrize("impl", ["grouped", "masked"])
def test_report_flops_match_executed_attention(name, impl):
    # the report's FLOPs are what the graph really runs: grouped really skips the masked pairs
    case = CASES[name]
    model, inputs, gm, report = _run_case(case, implementation=impl)
    with _SdpaRecorder() as before:
        model(*inputs)
    with _SdpaRecorder() as after:
        gm(*inputs)
    assert sum(s.flops_before for s in report.sites) == before.flops
    assert sum(s.flops_after for s in report.sites) == after.flops
    if impl == "grouped":
        assert after.flops < before.flops
    else:
        assert after.flops == before.flops


def test_sam_report_shapes_3d():
    model = build(SamEncoder, grid=(6, 10))
    x = image(2, 12, 20)
    _, report = rewrite(model, (x,), stride=2)
    s = expect_rewritten(report, "blocks.0.attn", (0, 6, 10), (0, 6, 10), 2)
    assert tuple(s.q_shape) == (2 * 2, 60, 8)

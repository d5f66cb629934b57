"""Shuffle distributing (docs/design.md section 1): a random group assignment per training call.

The drawn assignment is re-derived by re-seeding and drawing again with
``gridattn_fx.grid.draw_assignment``, then the independent oracle (tests/oracle.py, which reads
the assignment by its documented encoding) must agree with the rewritten graph, forward and backward.
"""

import warnings

import pytest
import torch

from models import ViT, build, image
from oracle import assert_close64, assert_differs, oracle_mode, oracle_sdpa, shuffled_token_groups, token_groups
from test_grid_functions import ATTN_CASES, _attn_inputs
from test_manual import REWRITTEN_FORMS, _inputs, _model

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx import TokenLayout, grid  # noqa: E402
from gridattn_fx.grid import GridPlan, RelPosSpec, draw_assignment  # noqa: E402

SHUFFLE = {"stride": 2, "min_image_tokens": 0, "distributing": "shuffle"}


def _plan(case):
    ql, kl, stride, mask_kind, three_d, scale = ATTN_CASES[case]
    q, k, v, mask = _attn_inputs(ql, kl, stride, mask_kind, three_d)
    plan = GridPlan.for_tensors(q, k, mask, ql, kl, stride, 0.0, scale)
    return plan, (q, k, v, mask), scale


# ---------------------------------------------------------------------------------------------
# the assignment and the oracle's reading of it
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,stride", [((0, 6, 10), (2, 2)), ((1, 7, 11, 2), (3, 3)),
                                           ((0, 6, 10, 0, True), (2, 4))])
def test_identity_assignment_is_straightforward(layout, stride):
    lay = TokenLayout(*layout)
    a, b, g = grid.assignment_shape(lay, stride)
    identity = torch.arange(g).expand(a, b, g)
    assert shuffled_token_groups(layout, stride, identity) == token_groups(layout, stride)


def test_every_group_holds_one_token_of_every_full_block():
    lay, stride = TokenLayout(0, 8, 12), (2, 4)
    groups = shuffled_token_groups(lay, stride, draw_assignment(lay, stride))
    seen = {}
    for t, g in enumerate(groups):
        r, c = divmod(t, 12)
        seen.setdefault(g, []).append((r // 2, c // 4))
    assert len(seen) == 8
    assert all(sorted(blocks) == sorted({(a, b) for a in range(4) for b in range(3)}) for blocks in seen.values())


def test_draws_are_reproducible_and_fresh():
    lay = TokenLayout(0, 8, 8)
    torch.manual_seed(3)
    first, second = draw_assignment(lay, 2), draw_assignment(lay, 2)
    torch.manual_seed(3)
    assert torch.equal(draw_assignment(lay, 2), first)
    assert not torch.equal(first, second)


# ---------------------------------------------------------------------------------------------
# eager grouped form vs the oracle, for the drawn assignment
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_shuffled_grouped_attention_matches_oracle(case):
    plan, (q, k, v, mask), scale = _plan(case)
    assignment = plan.draw()
    if plan.shares_grid:
        assert assignment[0] is assignment[1]  # q and k are the same tokens: one assignment
    out = grid.grouped_attention(q, k, v, mask, 0.0, scale, plan.q_layout, plan.k_layout, plan.stride,
                                 assignment=assignment)
    ref = oracle_sdpa(q, k, v, mask, scale, q_layout=plan.q_layout, k_layout=plan.k_layout,
                      stride=plan.stride, assignment=assignment)
    assert_close64(out, ref)
    straight = oracle_sdpa(q, k, v, mask, scale, q_layout=plan.q_layout, k_layout=plan.k_layout, stride=plan.stride)
    assert_differs(ref, straight)


@pytest.mark.parametrize("case", ["cls_reg", "segformer_odd", "float_full", "non_divisible", "transposed"])
def test_shuffled_gradients_match_oracle(case):
    plan, (q, k, v, mask), scale = _plan(case)
    assignment = plan.draw()
    leaves = [t.requires_grad_() for t in (q, k, v)] + ([mask.requires_grad_()] if mask is not None else [])
    gout = torch.randn(q.shape[:-1] + v.shape[-1:], dtype=torch.float64)
    out = grid.grouped_attention(q, k, v, mask, 0.0, scale, plan.q_layout, plan.k_layout, plan.stride,
                                 assignment=assignment)
    ref = oracle_sdpa(q, k, v, mask, scale, q_layout=plan.q_layout, k_layout=plan.k_layout,
                      stride=plan.stride, assignment=assignment)
    for g, w in zip(torch.autograd.grad(out, leaves, gout), torch.autograd.grad(ref, leaves, gout)):
        assert_close64(g, w)


def test_plans_reject_unsupported_shuffles():
    lay, col = TokenLayout(0, 4, 4), TokenLayout(0, 4, 4, 0, True)
    with pytest.raises(ValueError, match="rel"):
        GridPlan(q_layout=lay, k_layout=lay, stride=(2, 2), ndim=4, relpos=RelPosSpec(), shuffle=True)
    with pytest.raises(ValueError, match="same order"):
        GridPlan(q_layout=lay, k_layout=col, stride=(2, 2), ndim=4, shuffle=True)
    with pytest.raises(ValueError, match="without shuffle"):
        GridPlan(q_layout=lay, k_layout=lay, stride=(2, 2), ndim=4).grouped(*(torch.randn(1, 1, 16, 2) for _ in range(3)),
                                               assignment=(None, None))


# ---------------------------------------------------------------------------------------------
# through the pass: rewrite() and the compiled backend
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", sorted(f for f in REWRITTEN_FORMS if "relpos" not in f))
def test_rewrite_in_training_mode_shuffles_every_form(form):
    grid_hw, cls = (6, 8), 1
    model, inputs = _model(form, grid_hw, cls).train(), _inputs(form, grid_hw, cls)
    gm, report = gridattn_fx.rewrite(model, inputs, **SHUFFLE)
    assert report.distributing == "shuffle" and "shuffle distributing" in report.sites[0].reason, str(report)
    torch.manual_seed(11)
    out = gm(*inputs)
    torch.manual_seed(11)
    lay = TokenLayout(cls, *grid_hw)
    a = draw_assignment(lay, 2)
    # float_softmax: the model's own softmax runs in float32, the rewrite's in float64
    tol = dict(atol=1e-6, rtol=1e-5) if form == "float_softmax" else {}
    with oracle_mode(model, lay, lay, 2, assignment=(a, a)):
        assert_close64(out, model(*inputs), **tol)


@pytest.mark.parametrize("form", ["sam_relpos", "sdpa_relpos"])
def test_relpos_sites_train_with_straightforward_groups_and_say_so(form):
    model, inputs = _model(form).train(), _inputs(form, (6, 8))
    gm, report = gridattn_fx.rewrite(model, inputs, **SHUFFLE)
    site = report.sites[0]
    assert site.decision == "rewritten"
    assert "straightforward distributing (shuffle is not implemented for a decomposed rel-pos" in site.reason
    lay = (0, 6, 8, 0, False)
    with oracle_mode(model, lay, lay, 2):
        assert_close64(gm(*inputs), model(*inputs))


def test_rewrite_in_eval_mode_is_straightforward():
    model, inputs = _model("timm", (6, 8), 1).eval(), _inputs("timm", (6, 8), 1)
    gm, report = gridattn_fx.rewrite(model, inputs, **SHUFFLE)
    assert report.distributing == "straightforward" and "(inference)" in report.sites[0].reason
    torch.manual_seed(1)
    a = gm(*inputs)
    torch.manual_seed(2)
    assert torch.equal(a, gm(*inputs))


def _compiled_vit(**extra):
    model = build(ViT, depth=2, n_cls=1, grid=(8, 8)).train()
    return model, torch.compile(model, backend="gridattn", options={**SHUFFLE, **extra}, dynamic=False)


def test_compiled_training_step_matches_oracle_forward_and_gradients():
    # fallback_random: inductor draws with the eager generator, so re-seeding re-derives the draw
    model, compiled = _compiled_vit(fallback_random=True)
    x = image(2, 16, 16)
    params = list(model.parameters())
    gout = torch.randn(2, 65, 16, dtype=torch.float64)
    torch.manual_seed(5)
    out = compiled(x)
    got = torch.autograd.grad(out, params, gout)
    assert gridattn_fx.last_report().distributing == "shuffle"
    torch.manual_seed(5)
    lay = TokenLayout(1, 8, 8)
    draws = [draw_assignment(lay, 2) for _ in model.blocks]  # one draw per site, in graph order
    for blk, a in zip(model.blocks, draws):
        blk.attn.oracle = (lay, lay, 2, (a, a))
    want_out = model(x)
    want = torch.autograd.grad(want_out, params, gout)
    assert_close64(out, want_out)
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        assert_close64(g, w, msg=name)


def test_compiled_training_is_reproducible_without_recompiles_and_eval_is_straightforward(monkeypatch):
    model, compiled = _compiled_vit()  # inductor's own RNG this time
    x = image(2, 16, 16)
    calls = []
    import gridattn_fx.frontends.backend as backend_module

    original = backend_module.apply_pass

    def counting(gm, example_inputs, config, training=False, **kwargs):
        calls.append(training)
        return original(gm, example_inputs, config, training, **kwargs)

    monkeypatch.setattr(backend_module, "apply_pass", counting)
    torch.manual_seed(7)
    steps = [compiled(x) for _ in range(3)]
    torch.manual_seed(7)
    again = compiled(x)
    model.eval()
    inference = [compiled(x), compiled(x)]
    model.train()
    compiled(x)
    assert calls == [True, False], calls  # one graph per mode, none per step
    assert torch.equal(steps[0], again)
    assert not torch.equal(steps[0], steps[1])  # a fresh draw every call
    lay = TokenLayout(1, 8, 8)
    for blk in model.blocks:
        blk.attn.oracle = (lay, lay, 2)
    assert torch.equal(inference[0], inference[1])
    assert_close64(inference[0], model(x))


def test_shuffle_needs_a_module_to_know_the_mode(monkeypatch):
    import gridattn_fx.frontends.backend as backend_module

    monkeypatch.setattr(backend_module, "_warned", set())
    model = build(ViT, depth=1, n_cls=1, grid=(8, 8)).train()

    def fn(x):
        return model(x)

    compiled = torch.compile(fn, backend="gridattn", options=SHUFFLE, dynamic=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(image(1, 16, 16))
    report = gridattn_fx.last_report()
    assert report.distributing == "straightforward"
    assert any("training flag" in str(w.message) for w in caught), [str(w.message) for w in caught]

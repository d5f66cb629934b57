"""The `gridattn` torch.compile backend (Dynamo + our pass + inductor).

Inductor compiles cost seconds each on a 2-core machine, so only what needs the real backend is
here: entry point, agreement with rewrite(), recompiles across resolutions, backward, graph breaks,
stride 1 bit-for-bit, and the fallback when the pass fails.
"""

import importlib.metadata
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from models import GraphBreakViT, SegFormerStage, ViT, build, image
from oracle import assert_close64, assert_differs, assert_equal_exact, oracle_mode

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx import TokenLayout  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
OPTS = {"stride": 2, "min_image_tokens": 0}


def _decisions(report):
    return sorted((s.module_path, s.decision, s.q_layout, s.k_layout,
                   None if s.stride is None else tuple(s.stride)) for s in report.sites)


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    names = {ep.name: ep.value for ep in eps}
    assert "gridattn" in names, "package not installed: run `pip install -e . --no-deps`"
    assert "gridattn" in torch._dynamo.list_backends()


def test_entry_point_in_fresh_interpreter(tmp_path):
    # the user never imports gridattn_fx: torch.compile finds the backend by name
    script = textwrap.dedent(f"""
        import sys
        import torch
        sys.path.insert(0, {TESTS_DIR!r})
        from models import ViT, build, image
        from oracle import assert_close64, oracle_mode
        torch.manual_seed(0)
        m = build(ViT, depth=1, grid=(4, 6))
        x = image(2, 8, 12)
        assert "gridattn_fx" not in sys.modules
        out = torch.compile(m, backend="gridattn", options={OPTS!r})(x)
        assert "gridattn_fx" in sys.modules
        rep = sys.modules["gridattn_fx"].last_report()
        assert rep.site(r"blocks\\.0\\.attn").decision == "rewritten", str(rep)
        with oracle_mode(m, (1, 4, 6), stride=2):
            ref = m(x)
        assert_close64(out, ref)
        print("ENTRYPOINT_OK")
    """)
    # cwd elsewhere: the installed package (and its entry point) must be what is found
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=400)
    assert res.returncode == 0 and "ENTRYPOINT_OK" in res.stdout, res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------
# rewrite() and the backend agree
# ---------------------------------------------------------------------------------------------
AGREE = {
    "segformer_two_grids": (lambda: build(SegFormerStage), lambda: image(2, 16, 24), {},
                            {"blocks.0.attn": ((0, 8, 12), (0, 4, 6))}),
    "vit_one_excluded": (lambda: build(ViT, depth=2, n_reg=4, grid=(6, 10)), lambda: image(2, 12, 20),
                         {"exclude": [r"blocks\.1"]}, {"blocks.0.attn": ((5, 6, 10), (5, 6, 10))}),
}


@pytest.mark.parametrize("name", list(AGREE))
def test_backend_agrees_with_rewrite(name):
    make, inp, extra, oracle_sites = AGREE[name]
    model, x = make(), inp()
    opts = {**OPTS, **extra}
    # the backend object itself (not the name) and an inductor option riding along
    compiled = torch.compile(model, backend=gridattn_fx.backend,
                             options={**opts, "max_autotune": False})
    out_c = compiled(x)
    rep_c = gridattn_fx.last_report()
    gm, rep_r = gridattn_fx.rewrite(model, (x,), **opts)
    assert rep_c.failure is None and rep_r.failure is None
    assert _decisions(rep_c) == _decisions(rep_r)
    assert [s.reason for s in sorted(rep_c.sites, key=lambda s: s.module_path)] == \
        [s.reason for s in sorted(rep_r.sites, key=lambda s: s.module_path)]
    assert_close64(out_c, gm(x))
    for path, (ql, kl) in oracle_sites.items():
        model.get_submodule(path).oracle = (ql, kl, 2)
    try:
        ref = model(x)
    finally:
        for path in oracle_sites:
            model.get_submodule(path).oracle = None
    assert_close64(out_c, ref)


def test_backend_hard_case_through_inductor():
    # the hardest regrouping at once, fused by inductor: registers, column-major tokens, a stride
    # that does not divide the width (padding), and a boolean mask input per batch element
    model = build(ViT, depth=1, n_reg=2, grid=(6, 10), transposed=True)
    x = image(2, 12, 20)
    L = 3 + 60
    mask = torch.rand(2, 1, L, L) > 0.5
    mask[..., torch.arange(L), torch.arange(L)] = True
    out = torch.compile(model, backend="gridattn", options={**OPTS, "stride": (2, 4)})(x, mask)
    rep = gridattn_fx.last_report()
    s = rep.site(r"blocks\.0\.attn")
    assert s.decision == "rewritten", str(rep)
    assert s.q_layout == TokenLayout(3, 6, 10, 0, True)
    with oracle_mode(model, (3, 6, 10, 0, True), stride=(2, 4)):
        ref = model(x, mask)
    assert_close64(out, ref)
    assert_differs(ref, model(x, mask))


# ---------------------------------------------------------------------------------------------
# resolution changes between calls
# ---------------------------------------------------------------------------------------------
# (pixels H, W) -> token grid (H/2, W/2); all different so that every dim changes
RESOLUTIONS = [(12, 20), (16, 12), (20, 8)]


def _check_call(model, compiled, hw_px, allow_symbolic_skip):
    x = image(2, *hw_px)
    out = compiled(x)
    rep = gridattn_fx.last_report()
    assert rep.failure is None, rep.failure
    s = rep.site(r"blocks\.0\.attn")
    lay = (1, hw_px[0] // 2, hw_px[1] // 2)
    if s.decision == "rewritten":
        with oracle_mode(model, lay, stride=2):
            ref = model(x)
        assert_differs(ref, model(x))
    else:
        assert allow_symbolic_skip, f"static compile skipped: {s.reason}"
        assert "symbolic" in s.reason.lower(), s.reason
        ref = model(x)
    assert_close64(out, ref, msg=f"resolution {hw_px}, decision {s.decision}")
    return s


def test_resolution_change_static():
    model = build(ViT, depth=1, grid=None)
    compiled = torch.compile(model, backend="gridattn", options=OPTS, dynamic=False)
    for hw in RESOLUTIONS[:2]:
        s = _check_call(model, compiled, hw, allow_symbolic_skip=False)
        assert s.q_layout == TokenLayout(1, hw[0] // 2, hw[1] // 2)
    # back to the first resolution: the cached graph for it is still the right one
    _check_call(model, compiled, RESOLUTIONS[0], allow_symbolic_skip=False)


def test_resolution_change_dynamic_default():
    # second call recompiles with symbolic sizes: rewritten correctly for any size, or skipped
    # with a "symbolic" reason -- never a layout baked in from the example sizes
    model = build(ViT, depth=1, grid=None)
    compiled = torch.compile(model, backend="gridattn", options=OPTS)
    s = _check_call(model, compiled, RESOLUTIONS[0], allow_symbolic_skip=False)
    assert s.decision == "rewritten"
    for hw in RESOLUTIONS[1:]:
        _check_call(model, compiled, hw, allow_symbolic_skip=True)


def test_batch_change_dynamic_default():
    # a new batch size makes Dynamo recompile with a symbolic batch: the regrouping must follow
    # the actual batch (or the site is skipped as symbolic), at every later batch size too
    model = build(ViT, depth=1, n_reg=2, grid=(6, 10))
    compiled = torch.compile(model, backend="gridattn", options=OPTS)
    for batch in (2, 3, 5):
        x = image(batch, 12, 20)
        out = compiled(x)
        s = gridattn_fx.last_report().site(r"blocks\.0\.attn")
        if s.decision == "rewritten":
            assert s.q_layout == TokenLayout(3, 6, 10)
            with oracle_mode(model, (3, 6, 10), stride=2):
                ref = model(x)
        else:
            assert batch != 2 and "symbolic" in s.reason.lower(), s.reason
            ref = model(x)
        assert_close64(out, ref, msg=f"batch {batch}")


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------
def test_backward_matches_oracle():
    # eval(): inference grid distributing is deterministic; training mode may shuffle
    model = build(ViT, depth=2, n_reg=2, grid=(4, 6))
    params = [p for p in model.parameters()]
    x = image(2, 8, 12)
    gout = torch.randn(2, 3 + 24, 16, dtype=torch.float64)

    def grads(fn):
        xi = x.clone().requires_grad_()
        return torch.autograd.grad(fn(xi), [xi] + params, gout)

    compiled = torch.compile(model, backend="gridattn", options=OPTS)
    got = grads(compiled)
    rep = gridattn_fx.last_report()
    assert [s.decision for s in rep.sites] == ["rewritten", "rewritten"], str(rep)
    with oracle_mode(model, (3, 4, 6), stride=2):
        want = grads(model)
    names = ["input"] + [n for n, _ in model.named_parameters()]
    for name, g, w in zip(names, got, want):
        assert_close64(g, w, msg=name)
    assert_differs(want[0], grads(model)[0])


# ---------------------------------------------------------------------------------------------
# untouched paths through the backend
# ---------------------------------------------------------------------------------------------
def test_stride_one_bit_for_bit_through_inductor():
    # the same graph through plain inductor: the backend must not have changed anything
    model = build(ViT, depth=1, grid=(6, 10))
    x = image(2, 12, 20)
    out = torch.compile(model, backend="gridattn", options={"stride": 1, "min_image_tokens": 0})(x)
    rep = gridattn_fx.last_report()
    assert rep.rewritten == [] and "stride 1" in rep.site(r"blocks\.0\.attn").reason
    torch._dynamo.reset()
    ref = torch.compile(model, backend="inductor")(x)
    assert_equal_exact(out, ref)


def test_graph_break_hands_the_layout_over():
    """The patch embedding's graph returns the tokens; the blocks' graph, compiled after the break,
    receives that very tensor and inherits its layout (crossgraph/break_handoff.py)."""
    model = build(GraphBreakViT, depth=1, grid=None)
    x = image(2, 12, 20)
    out = torch.compile(model, backend="gridattn", options=OPTS)(x)
    rep = gridattn_fx.last_report()
    s = rep.site(r"blocks\.0\.attn")
    assert s.decision == "rewritten" and s.layout_source == "handed over across a split", str(rep)
    with oracle_mode(model, (0, 6, 10), stride=2):
        want = model(x)
    assert_close64(out, want)
    assert_differs(out, model(x))


_HOP = {"flip": False}


@torch._dynamo.disable
def _eager_hop(x):
    """Eager code between two graphs that Dynamo does not guard: sometimes another tensor."""
    return x.flip(1) if _HOP["flip"] else x


class EagerHopViT(GraphBreakViT):
    def forward(self, img):
        x = _eager_hop(self.patch_embed(img).flatten(2).transpose(1, 2))
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def test_handed_over_layout_is_checked_at_every_call():
    """The second call hands the blocks a tensor no graph returned (the tokens reversed): the
    compiled blocks must not assume the first call's layout; a dense variant runs."""
    model = build(EagerHopViT, depth=1, grid=None)
    x = image(2, 12, 20)
    compiled = torch.compile(model, backend="gridattn", options=OPTS)
    try:
        first = compiled(x)
        assert gridattn_fx.last_report().site(r"blocks\.0\.attn").decision == "rewritten"
        _HOP["flip"] = True
        second = compiled(x)
        assert gridattn_fx.last_report().site(r"blocks\.0\.attn").decision == "skipped"
        assert_close64(second, model(x))
        _HOP["flip"] = False
        with oracle_mode(model, (0, 6, 10), stride=2):
            want = model(x)
        assert_close64(compiled(x), want)
        assert_close64(first, want)
    finally:
        _HOP["flip"] = False


# ---------------------------------------------------------------------------------------------
# a failing pass never breaks the model
# ---------------------------------------------------------------------------------------------
def _break_the_pass(monkeypatch, tag):
    """Rewriting the first site works, the second raises: the pass fails half-way through.

    (pipeline.run_pass calls rewrite_site once per chosen site; a failure after a partial rewrite
    is the case that would leak a half-rewritten graph if the fallback reused the mutated one.)
    """
    from gridattn_fx.passes import pipeline

    real = pipeline.rewrite_site
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) >= 2:
            # a per-test message: the package may de-duplicate identical warnings
            raise RuntimeError(f"injected failure in the grid pass ({tag})")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "rewrite_site", flaky)
    return calls


def _warned(recwarn, caplog):
    return (any("gridattn" in str(w.message).lower() or "fall" in str(w.message).lower()
                for w in recwarn.list)
            or any(r.levelno >= logging.WARNING and r.name.startswith("gridattn_fx")
                   for r in caplog.records))


def test_pass_failure_falls_back_in_backend(monkeypatch, recwarn, caplog):
    _break_the_pass(monkeypatch, "backend")
    model = build(ViT, depth=2, grid=(4, 6))
    x = image(2, 8, 12)
    out = torch.compile(model, backend="gridattn", options=OPTS)(x)
    rep = gridattn_fx.last_report()
    assert rep.failure and "injected failure" in rep.failure
    # the sites are still reported, none as rewritten: the graph runs unmodified
    assert len(rep.sites) == 2 and rep.rewritten == [], str(rep)
    assert _warned(recwarn, caplog)
    assert_close64(out, model(x))


def test_pass_failure_falls_back_in_rewrite(monkeypatch, recwarn, caplog):
    _break_the_pass(monkeypatch, "rewrite")
    model = build(ViT, depth=2, grid=(4, 6))
    x = image(2, 8, 12)
    gm, rep = gridattn_fx.rewrite(model, (x,), **OPTS)
    assert rep.failure and "injected failure" in rep.failure
    # the sites are still reported, none as rewritten: the graph runs unmodified
    assert len(rep.sites) == 2 and rep.rewritten == [], str(rep)
    assert _warned(recwarn, caplog)
    assert_equal_exact(gm(x), model(x))


def test_pass_failure_strict_raises(monkeypatch):
    _break_the_pass(monkeypatch, "strict")
    model = build(ViT, depth=2, grid=(4, 6))
    x = image(2, 8, 12)
    with pytest.raises(Exception, match="injected failure"):
        gridattn_fx.rewrite(model, (x,), strict=True, **OPTS)
    compiled = torch.compile(model, backend="gridattn", options={**OPTS, "strict": True})
    with pytest.raises(Exception, match="injected failure"):
        compiled(x)


def test_rewritten_graph_stays_cacheable():
    # Inserted nodes carry fake values like Dynamo's own, so AOTAutogradCache does not bypass
    # the rewritten graph (it refuses method calls on nodes it cannot prove are tensors).
    from torch._dynamo.utils import counters

    model = build(ViT, depth=1, grid=(4, 6))
    counters.clear()
    with torch.no_grad():
        torch.compile(model, backend="gridattn", options={"stride": 2, "min_image_tokens": 0})(image(1, 8, 12))
    assert gridattn_fx.last_report().rewritten
    assert counters["aot_autograd"]["autograd_cache_bypass"] == 0, dict(counters["aot_autograd"])

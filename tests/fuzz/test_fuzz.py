"""Differential fuzzer in CI: a fixed set of seeded random models through
``gridattn_fx.rewrite`` (a few also through ``torch.compile(backend="gridattn")``), each compared
with the oracle of its true layout where the report says rewritten and with the untouched model
where it says skipped (tests/fuzz/check.py). Longer runs: tests/fuzz/README.md.

A case whose failures are all explained by a filed bug (check.KNOWN_BUGS) is an expected failure;
any other failure fails with the case's seed, spec text and report.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from . import check
from . import generator as gen

pytest.importorskip("gridattn_fx")

# ~0.4 s of CPU per case (100 cases + the compiled one: ~90 s CPU, measured with /usr/bin/time);
# GRIDATTN_FUZZ_CASES / GRIDATTN_FUZZ_SEED for longer runs.
CI_CASES = 100
CASES = int(os.environ.get("GRIDATTN_FUZZ_CASES", CI_CASES))
FIRST_SEED = int(os.environ.get("GRIDATTN_FUZZ_SEED", 0))
# Through torch.compile (inductor): slow on CPU (tens of seconds a case), so one case, chosen to
# have rewritten sites and no known bug; more with `python -m tests.fuzz --compiled`.
COMPILED_SEEDS = (205,)
# The same with dynamic=True (symbolic sizes from the first call): a seed whose flash-attn GQA site
# reads (B, L, H, D) projections of transposed tokens, where a strided split of the cluster's input
# read wrong values under inductor (grid/groupings.py _split_axis); more with
# `python -m tests.fuzz --compiled --dynamic`.
COMPILED_DYNAMIC_SEEDS = (524,)


def _known_categories(spec: gen.Spec) -> list[str]:
    """The KNOWN_BUGS categories check.categorize() can give this spec's failures."""
    forms = {b.form for b in spec.blocks}
    ops = {o[0] for b in spec.blocks for o in b.ops + b.kv_ops}
    cats = {
        "gqa": "sdpa_gqa" in forms,
        "mqa-broadcast-skipped": bool(forms & {"sdpa_mqa", "m_mqa"}),
        "cross-image": any(b.cross for b in spec.blocks),
        "inplace-reorder": bool(ops & set(gen.INPLACE_OPS)),
        "unreported-form": bool(forms & {"m_tensor_scale", "m_v_attnT"}),
    }
    return [c for c, hit in cats.items() if hit and c in check.KNOWN_BUGS]


def _param(seed: int, compiled: bool = False):
    spec = gen.random_spec(seed, compiled=compiled)
    cats = _known_categories(spec)
    # xfail ONLY for failures raised as KnownBugFailure (every failure of the case explained by a
    # filed bug); a new failure in the same case still fails.
    marks = [pytest.mark.xfail(raises=check.KnownBugFailure, strict=False,
                               reason="known bugs: " + "; ".join(check.KNOWN_BUGS[c] for c in cats))] if cats else []
    return pytest.param(spec, id=f"seed{seed}", marks=marks)


def _run(spec: gen.Spec):
    result = check.run_case(spec)
    if result.ok:
        return result
    if result.only_known:
        raise check.KnownBugFailure(result.describe())
    pytest.fail(result.describe(), pytrace=False)


@pytest.mark.parametrize("spec", [_param(s) for s in range(FIRST_SEED, FIRST_SEED + CASES)])
def test_fuzz_rewrite(spec):
    _run(spec)


@pytest.mark.parametrize("spec", [_param(s, compiled=True) for s in COMPILED_SEEDS]
                         + [_param(s, compiled="dynamic") for s in COMPILED_DYNAMIC_SEEDS])
def test_fuzz_compiled(spec):
    result = _run(spec)
    assert "rewritten" in result.decisions.values(), "compiled fuzz seeds are meant to exercise a rewrite"


# --- the fuzzer itself ---------------------------------------------------------------------------
def test_ci_seeds_cover_the_vocabulary():
    """The fixed seed set exercises every layout, op, form, mask kind, stride and dtype."""
    specs = [gen.random_spec(s) for s in range(FIRST_SEED, FIRST_SEED + CASES)]
    if CASES < CI_CASES:
        pytest.skip("coverage is asserted for the CI seed set or larger")
    seen = {
        "tokenizer": {s.tokenizer for s in specs},
        "embed": {s.embed for s in specs},
        "op": {o[0] for s in specs for b in s.blocks for o in b.ops + b.kv_ops},
        "form": {b.form for s in specs for b in s.blocks},
        "kernel": {b.kernel for s in specs for b in s.blocks if b.form.startswith("op_")},
        "mask": {b.mask.split(":")[0] for s in specs for b in s.blocks}
        | {b.mask.split(":")[1] for s in specs for b in s.blocks if b.mask != "none"},
        "stride": {repr(s.stride) for s in specs},
        "dtype": {s.dtype for s in specs},
        "layout": {("prefix" if s.prefix else "") + ("suffix" if s.suffix else "") or "none" for s in specs}
        | {"square" if s.height == s.width else "nonsquare" for s in specs},
    }
    want = {
        "tokenizer": set(gen.TOKENIZERS),
        "embed": set(gen.EMBEDDINGS),
        "op": set(gen.ALL_OPS),
        "form": set(gen.FORMS),
        "kernel": set(gen.OP_KERNELS),
        "mask": {"none", "bool", "add"} | set(gen.MASK_SHAPES),
        "stride": {repr(s) for s in gen.STRIDES},
        "dtype": set(gen.DTYPES),
        "layout": {"prefix", "suffix", "prefixsuffix", "none", "square", "nonsquare"},
    }
    for key in want:
        assert want[key] <= seen[key], f"{key} never generated: {want[key] - seen[key]}"
    assert any(b.cross for s in specs for b in s.blocks)
    assert any(not s.move_regrouping for s in specs) and any(s.implementation == "masked" for s in specs)


def test_ci_seeds_cover_the_video_vocabulary():
    """The fixed seed set holds video cases of every embedding, tokenizer and video stride, real
    videos and single frames, both temporal patches, window grouping on images and videos, and the
    2-D ops' video twins."""
    specs = [gen.random_spec(s) for s in range(FIRST_SEED, FIRST_SEED + CASES)]
    if CASES < CI_CASES:
        pytest.skip("coverage is asserted for the CI seed set or larger")
    videos = [s for s in specs if s.frames]
    assert {s.embed for s in videos} == set(gen.VIDEO_EMBEDDINGS)
    assert {s.tokenizer for s in videos if s.embed == "conv3d_video"} == set(gen.VIDEO_TOKENIZERS)
    assert {repr(s.stride) for s in videos} == {repr(g) for g in gen.VIDEO_STRIDES}
    assert {s.frames == 1 for s in videos} == {True, False} and {s.tpatch for s in videos} == {1, 2}
    assert {(bool(s.frames), s.grouping) for s in specs if isinstance(s.grouping, str)} == {
        (v, g) for v in (False, True) for g in gen.GROUPINGS}
    assert {s.grouping for s in specs if isinstance(s.grouping, tuple)} == set(gen.HEAD_GROUPINGS)
    ops = {o[0] for s in videos for b in s.blocks for o in b.ops + b.kv_ops}
    assert {"conv_roundtrip", "sr_conv"} <= ops and ops & set(gen.REORDER_OPS) and ops & set(gen.BREAK_OPS)


def test_specs_and_models_are_deterministic():
    a, b = gen.random_spec(7), gen.random_spec(7)
    assert a == b and a.text() == b.text()
    assert eval(a.text(), {"Spec": gen.Spec, "BlockSpec": gen.BlockSpec}) == a
    (m1, x1, _), (m2, x2, _) = gen.build(a), gen.build(a)
    assert torch.equal(x1[0], x2[0])
    for p1, p2 in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(p1, p2)


def test_ground_truth_layouts():
    row = [(r, c) for r in range(2) for c in range(3)]
    col = [(r, c) for c in range(3) for r in range(2)]
    cls, reg = ("p", 0), ("e", 1)
    assert gen.classify_image([cls] + row, (2, 3))[:2] == (1, 0)
    assert gen.classify_image(col + [reg], (2, 3))[:2] == (0, 1)
    assert "mirrored" in gen.classify_image(([cls] + row)[::-1], (2, 3))[2]   # flip: suffix now
    assert gen.classify_image(row[1:] + row[:1], (2, 3)) is None                # roll by one
    assert gen.classify_image(row[:3] + [cls] + row[3:], (2, 3)) is None       # not contiguous
    assert gen.classify_image([row[1], row[0]] + row[2:], (2, 3)) is None       # a swap
    assert gen.classify_image(row + row, (2, 3)) is None                      # every token twice
    reduced = [(0, 0, 1), (0, 1, 1)]
    assert gen.classify_image([cls] + reduced, {0: (2, 3), 1: (1, 2)})[:2] == (1, 0)
    assert gen.classify_image(row[:3] + reduced, {0: (2, 3), 1: (1, 2)}) is None  # two images


def test_video_ground_truth():
    """Video tokens are Voxels, never image pixels; the order after a video tokenizer is read off the
    tokenizer itself, the storage order of (t, h, w) and mirroring are recognised, a scramble is no
    video, and groups come from (t, r, c) with the stride normalised to rank 3."""
    dims = (2, 3, 2)
    row = gen.traced_order("conv3d_video", "v_nchw", dims)
    assert row == [gen.Voxel(t, r, c) for t in range(2) for r in range(3) for c in range(2)]
    assert all(gen._is_pixel(v) and not isinstance(v, tuple) for v in row)
    assert gen.traced_order("conv3d_video", "v_nhwc", dims) == row
    assert gen.traced_order("conv3d_frames_merged", "nchw", dims) == row
    assert gen.traced_order("frames_conv2d", "nhwc_flat", dims) == row
    th = gen.traced_order("conv3d_video", "v_th", dims)
    assert th == [gen.Voxel(t, r, c) for r in range(3) for t in range(2) for c in range(2)]
    assert "storage (h, t, w)" in gen.classify_image(th, dims)[2]
    assert "storage (t, w, h)" in gen.classify_image(gen.traced_order("frames_conv2d", "nchw_T", dims), dims)[2]
    mirrored = gen.classify_image(gen.traced_order("conv3d_video", "v_mirror", dims), dims)
    assert mirrored[3] and "mirrored t" in mirrored[2]
    assert gen.classify_image(gen.traced_order("conv3d_video", "v_scramble", dims), dims) is None
    cls = ("p", 0)
    assert gen.classify_image([cls] + row, dims)[:2] == (1, 0)
    assert gen.classify_image(row[1:] + row[:1], dims) is None
    assert gen.classify_image([cls] + row[:6], {0: (1, 3, 2)})[:2] == (1, 0)   # a single frame
    # a video token is no image token of the same numbers: a 2-D image of the 3 x 2 frame is not found
    assert gen.classify_image(row[:6], {0: (3, 2)}) is None
    truth = gen.SiteTruth("a", 0, gen.BlockSpec(), [cls] + th, [cls] + th, False,
                          gen.classify_image([cls] + th, dims), gen.classify_image([cls] + th, dims),
                          (), (), 1, levels={0: dims})
    m = torch.isfinite(truth.log_mask((2, 2, 2), torch.float64))
    for i, a in enumerate(th):
        for j, b in enumerate(th):
            same = (a.t % 2, a.r % 2, a.c % 2) == (b.t % 2, b.r % 2, b.c % 2)
            assert bool(m[i + 1, j + 1]) == same
    assert m[0].all() and m[:, 0].all()
    flat = torch.isfinite(truth.log_mask(2, torch.float64))   # an int stride: every group spans all frames
    assert bool(flat[1 + th.index(gen.Voxel(0, 0, 0)), 1 + th.index(gen.Voxel(1, 2, 0))])
    window = replace(truth, grouping="window")
    wm = torch.isfinite(window.log_mask((1, 2, 2), torch.float64))   # tiles of ceil(3/2) = 2 rows, 1 column
    assert bool(wm[1 + th.index(gen.Voxel(0, 0, 0)), 1 + th.index(gen.Voxel(1, 1, 0))])
    assert not bool(wm[1 + th.index(gen.Voxel(0, 1, 0)), 1 + th.index(gen.Voxel(0, 2, 0))])
    assert replace(window, q_image=mirrored, k_image=mirrored).is_image_self_attention is False


VIDEO_SPEC = gen.Spec(seed=3, height=4, width=4, frames=4, tpatch=2, prefix=1, embed="conv3d_video",
                      tokenizer="v_nchw", blocks=(gen.BlockSpec(form="m_qscale"), gen.BlockSpec(ops=(("ln", 0),))),
                      stride=(2, 2, 2))


@pytest.mark.parametrize("embed,tokenizer", [("conv3d_video", "v_nchw"), ("conv3d_video", "v_th"),
                                             ("conv3d_frames_merged", "nhwc"), ("frames_conv2d", "nchw_T")])
@pytest.mark.parametrize("grouping", ["grid", "window"])
def test_video_cases_are_rewritten_exactly(embed, tokenizer, grouping):
    """Real videos (T = 4, temporal patch 2 where a Conv3d embeds) through each embedding, row-major
    and with the axes stored in another order, at stride (2, 2, 2): rewritten and equal to the oracle
    of the true (t, r, c) of every token."""
    spec = replace(VIDEO_SPEC, embed=embed, tokenizer=tokenizer, grouping=grouping,
                   tpatch=1 if embed == "frames_conv2d" else 2)
    result = check.run_case(spec)
    assert result.ok, result.describe()
    assert set(result.decisions.values()) == {"rewritten"}, result.describe()
    assert "2x2x2" in result.report


def test_the_checker_has_video_teeth(monkeypatch):
    """A checker that dropped the temporal stride, or read the (h, t, w) tokens as row-major, must
    be caught."""
    assert check.run_case(VIDEO_SPEC).ok
    truth_mask = gen.SiteTruth.log_mask
    with monkeypatch.context() as m:
        m.setattr(gen.SiteTruth, "log_mask", lambda self, stride, dtype: truth_mask(self, (1, 2, 2), dtype))
        result = check.run_case(VIDEO_SPEC)
        assert result.failures and {f.kind for f in result.failures} == {"wrong-result"}, result.describe()
    spec = replace(VIDEO_SPEC, tokenizer="v_th", stride=(2, 1, 2))  # T == H: only the strides tell t from h
    assert check.run_case(spec).ok
    monkeypatch.setattr(gen, "traced_order", lambda embed, tokenizer, dims: gen._raster(dims, 0))
    result = check.run_case(spec)
    assert result.failures and {f.kind for f in result.failures} == {"wrong-result"}, result.describe()


def test_the_checker_has_teeth(monkeypatch):
    """A checker that compared rewritten sites with the untouched model must be caught."""
    spec = gen.Spec(seed=5, height=6, width=8, prefix=1, blocks=(gen.BlockSpec(form="m_qscale"),), stride=2)
    assert check.run_case(spec).ok
    truth_mask = gen.SiteTruth.log_mask
    monkeypatch.setattr(gen.SiteTruth, "log_mask", lambda self, stride, dtype: truth_mask(self, 1, dtype))
    result = check.run_case(spec)
    assert [f.kind for f in result.failures] == ["wrong-result"], result.describe()

"""Differential fuzzer in CI (issue 12 item 9): a fixed set of seeded random models through
``gridattn_fx.rewrite`` (a few also through ``torch.compile(backend="gridattn")``), each compared
with the oracle of its true layout where the report says rewritten and with the untouched model
where it says skipped (tests/fuzz/check.py). Longer runs: tests/fuzz/README.md.

A case whose failures are all explained by a filed bug (check.KNOWN_BUGS) is an expected failure;
any other failure fails with the case's seed, spec text and report.
"""

from __future__ import annotations

import os

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


@pytest.mark.parametrize("spec", [_param(s, compiled=True) for s in COMPILED_SEEDS])
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
        "mask": {"none", "bool", "add"} | set(gen.MASK_SHAPES),
        "stride": {repr(s) for s in gen.STRIDES},
        "dtype": set(gen.DTYPES),
        "layout": {"prefix", "suffix", "prefixsuffix", "none", "square", "nonsquare"},
    }
    for key in want:
        assert want[key] <= seen[key], f"{key} never generated: {want[key] - seen[key]}"
    assert any(b.cross for s in specs for b in s.blocks)
    assert any(not s.move_regrouping for s in specs) and any(s.implementation == "masked" for s in specs)


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


def test_the_checker_has_teeth(monkeypatch):
    """A checker that compared rewritten sites with the untouched model must be caught."""
    spec = gen.Spec(seed=5, height=6, width=8, prefix=1, blocks=(gen.BlockSpec(form="m_qscale"),), stride=2)
    assert check.run_case(spec).ok
    truth_mask = gen.SiteTruth.log_mask
    monkeypatch.setattr(gen.SiteTruth, "log_mask", lambda self, stride, dtype: truth_mask(self, 1, dtype))
    result = check.run_case(spec)
    assert [f.kind for f in result.failures] == ["wrong-result"], result.describe()

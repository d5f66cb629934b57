"""Run the gridattn pass on one generated case and compare it with the ground truth.

For every case (tests/fuzz/generator.py):
- every attention module appears in the report exactly once, and no other site does;
- a site whose true tokens are not one image (reordered tokens, cross-image) is never rewritten;
- the rewritten graph's output equals the model run eagerly with the oracle mask ``B + log M`` of
  the TRUE layout at exactly the sites the report says rewritten (no site rewritten: the untouched
  model), float64 to the oracle tolerance, float32 looser;
- sites the pass is expected to prove (only order-keeping ops on the provenance path, a stride
  > 1, at least 2 tokens per group along each axis) are rewritten.
Failures explained by a bug already filed (KNOWN_BUGS) carry that category, so the test can mark
them expected-to-fail; anything else is a new finding.
"""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass, field

import torch

from oracle import ATOL, RTOL, stride_tuple

from . import generator as gen

# Categories of filed, still-open bugs (key -> issue and item). Empty: the five categories the
# fuzzer first found are fixed, and every case must pass.
KNOWN_BUGS: dict[str, str] = {
    # Not this project's: plain torch.compile(backend="inductor") of the untouched model already
    # differs from eager (seen on seeds 226 and 228 of the dynamic compiled runs, torch 2.13.0+cpu:
    # in-place index_copy_ / cumsum chains).
    "inductor": "inductor miscompiles the untouched model itself",
    # With symbolic sizes some proofs need a bound the ShapeEnv cannot decide (a slice that drops
    # tokens at a symbolic offset): the site stays dense, which is safe but not required to work.
    "symbolic-proof": "a proof that needs an undecidable symbolic bound: dense with symbolic sizes",
}

# (atol, rtol): rewrite() keeps the model's dtype; inductor reorders float arithmetic.
REWRITE_TOL = {"float64": (ATOL, RTOL), "float32": (2e-5, 1e-4)}
COMPILED_TOL = {"float64": (1e-8, 1e-7), "float32": (1e-4, 1e-3)}


class KnownBugFailure(AssertionError):
    """Every failure of the case is explained by an entry of KNOWN_BUGS."""


@dataclass
class Failure:
    kind: str            # pass-failed | missing-site | extra-site | unsound-rewrite | wrong-result |
    #                      missed-rewrite | crash
    block: int | None
    message: str
    category: str | None = None   # a KNOWN_BUGS key, when a filed bug explains it

    def __str__(self):
        where = f"site stages.{self.block}" if self.block is not None else "case"
        # a category whose bug is fixed (no longer in KNOWN_BUGS) explains nothing: the failure is new
        cat = f" [known: {self.category}]" if self.category in KNOWN_BUGS else " [NEW]"
        return f"{self.kind} at {where}{cat}: {self.message}"


@dataclass
class Result:
    spec: gen.Spec
    failures: list = field(default_factory=list)
    decisions: dict = field(default_factory=dict)    # block -> "rewritten" / "skipped" / "missing"
    report: str = ""
    truths: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def only_known(self) -> bool:
        return bool(self.failures) and all(f.category in KNOWN_BUGS for f in self.failures)

    def describe(self) -> str:
        lines = [f"fuzz case seed={self.spec.seed}",
                 f"  rerun: python -m tests.fuzz --seed {self.spec.seed} --cases 1 -v"
                 + (" --compiled" if self.spec.compiled else "") + (" --dynamic" if self.spec.compiled == "dynamic" else "")
                 + "   (a generated spec; any spec: python -m tests.fuzz -v --spec \"<spec text>\")",
                 f"  spec: {self.spec.text()}"]
        for t in self.truths:
            lines.append(f"  {t.path}: form={t.spec.form} mask={t.spec.mask} heads={t.spec.heads} "
                         f"true layout: {t.describe()}; decision: {self.decisions.get(t.block)}; "
                         f"ops on the path: {[o[0] for o in t.ops_before]}")
        lines += [f"  FAIL {f}" for f in self.failures]
        lines.append("  report:\n    " + self.report.replace("\n", "\n    "))
        return "\n".join(lines)


def categorize(spec: gen.Spec, truth: gen.SiteTruth | None, kind: str) -> str | None:
    if truth is None:  # a crash (rewrite() raised) is always a new finding
        if kind == "pass-failed" and any(b.form == "sdpa_gqa" for b in spec.blocks):
            return "gqa"
        return None
    form = truth.spec.form
    ops = {o[0] for o in truth.ops_before + truth.kv_ops}
    if form == "sdpa_gqa" and kind in ("wrong-result", "pass-failed"):
        return "gqa"
    if form in ("sdpa_mqa", "m_mqa") and kind == "missed-rewrite":
        return "mqa-broadcast-skipped"
    if truth.cross and kind == "unsound-rewrite":
        return "cross-image"
    # the proof does not see the reorder: a non-image rewritten, or an image whose prefix became a
    # suffix (roll by -1) rewritten with the old layout
    if ops & set(gen.INPLACE_OPS) and kind in ("unsound-rewrite", "wrong-result") and not truth.cross:
        return "inplace-reorder"
    if form in ("m_tensor_scale", "m_v_attnT") and kind in ("missing-site", "missed-rewrite"):
        return "unreported-form"
    if spec.compiled == "dynamic" and kind == "missed-rewrite":
        return "symbolic-proof"
    return None


def expects_rewrite(spec: gen.Spec, truth: gen.SiteTruth) -> bool:
    """Whether the pass must prove and rewrite this site (conservative: skipping anything else is
    allowed, rewriting it wrongly is not)."""
    names = {o[0] for o in truth.ops_before + truth.kv_ops} - {"tokenize", "cat"}
    if isinstance(spec.grouping, tuple) and not _heads_split(spec, truth):
        return False
    if spec.frames:
        return _expects_video_rewrite(spec, truth, names)
    gh, gw = stride_tuple(spec.stride)
    one_token_groups = spec.height < 2 * gh and spec.width < 2 * gw
    return (truth.is_image_self_attention and (gh, gw) != (1, 1)
            and spec.height >= gh and spec.width >= gw and not one_token_groups
            and spec.tokenizer != "mirror" and names <= set(gen.KEEP_OPS)
            # documented as unsupported (the report says so): MHA given an attn_mask
            and not (truth.spec.form.startswith("mha") and truth.spec.mask != "none"))


def _heads_split(spec: gen.Spec, truth: gen.SiteTruth) -> bool:
    """Per-head groupings must apply (conservatively): plain SDPA on (B, H, L, d) whose heads split
    into the spec's sets, with no mask that differs per head. Other forms may stay dense."""
    shape = truth.spec.mask.split(":")[-1]
    return (truth.spec.form in ("sdpa", "sdpa_scale", "sdpa_mqa") and truth.spec.heads % len(spec.grouping) == 0
            and shape not in ("1HLL", "H1L"))


def _expects_video_rewrite(spec: gen.Spec, truth: gen.SiteTruth, names: set) -> bool:
    """expects_rewrite for a video case: every video embedding (Conv3d, frames folded into the batch
    and merged back) with a tokenizer that stores the axes in some order the proof records
    (VIDEO_PROVABLE_TOKENIZERS; per frame: any 2-D order but a mirrored one), only order-keeping ops,
    and a stride, normalised to the video's rank (a single frame is its image), that is > 1 on some
    axis, no larger than any axis, and leaves >= 2 tokens per group."""
    dims = spec.video_shape if spec.frames > 1 else (spec.height, spec.width)
    g = stride_tuple(spec.stride, len(dims))
    provable = (spec.tokenizer in gen.VIDEO_PROVABLE_TOKENIZERS if spec.embed == "conv3d_video"
                else spec.tokenizer != "mirror")
    return (truth.is_image_self_attention and any(x > 1 for x in g) and provable
            and all(n >= x for n, x in zip(dims, g)) and not all(n < 2 * x for n, x in zip(dims, g))
            and names <= set(gen.KEEP_OPS)
            # GAP (not a soundness bug): a row or column axis of size 1 (a 4x1x4 video at stride
            # (2, 1, 2)) loses the layout at the reshape that makes tokens ("lost at flatten"):
            # layout/analysis.py's reshape groups skip size-1 axes, so the Spatial fact's axis has no
            # group; only a size-1 frame axis is dropped on purpose (a single frame is its image)
            and min(spec.height, spec.width) > 1
            and not (truth.spec.form.startswith("mha") and truth.spec.mask != "none"))


def site_block(module_path: str) -> int | None:
    m = re.match(r"stages\.(\d+)\.attn(\.|$)", module_path or "")
    return int(m.group(1)) if m else None


def _close(actual, expected, tol) -> str | None:
    if isinstance(expected, tuple):
        if not isinstance(actual, tuple) or len(actual) != len(expected):
            return f"output structure {type(actual).__name__} differs from {len(expected)} outputs"
        problems = [(i, _close(a, e, tol)) for i, (a, e) in enumerate(zip(actual, expected))]
        return "; ".join(f"output {i}: {p}" for i, p in problems if p) or None
    atol, rtol = tol
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not torch.allclose(actual, expected, atol=atol, rtol=rtol):
        err = (actual - expected).abs().max().item()
        rel = err / max(expected.abs().max().item(), 1e-30)
        return f"max abs error {err:.3g} (relative {rel:.3g}; tolerance atol={atol}, rtol={rtol})"
    return None


def _expected(model, inputs, truths, stride, rewritten_blocks):
    sound = {b for b in rewritten_blocks if truths[b].is_image_self_attention}
    gen.set_oracle(model, truths, stride, sound)
    try:
        return model(*inputs)
    finally:
        gen.set_oracle(model, truths, stride, set())


def _options(spec: gen.Spec, **extra) -> dict:
    return dict(stride=spec.stride, min_image_tokens=0, move_regrouping=spec.move_regrouping,
                implementation=spec.implementation, grouping=spec.grouping, **extra)


def _rewrite(model, inputs, spec, **extra):
    import gridattn_fx

    return gridattn_fx.rewrite(model, inputs, **_options(spec, **extra))


def _compiled(model, inputs, spec):
    import gridattn_fx

    torch._dynamo.reset()
    gridattn_fx.report_history(clear=True)
    dynamic = True if spec.compiled == "dynamic" else None   # symbolic sizes from the first call
    model.breaking = True   # the spec's graph breaks (Dynamo only)
    try:
        out = torch.compile(model, backend="gridattn", options=_options(spec), dynamic=dynamic)(*inputs)
    finally:
        model.breaking = False
    reports = gridattn_fx.report_history(clear=True)
    return out, reports


def run_case(spec: gen.Spec) -> Result:
    model, inputs, truths = gen.build(spec)
    result = Result(spec, truths=truths)
    with torch.no_grad():
        model(*inputs)  # the generated model itself must run (an error here is the generator's)
        try:
            gm, report = _rewrite(model, inputs, spec)
            result.report = str(report)
            out = gm(*inputs)
        except Exception as err:  # a crash of the pass on a valid model is a finding too
            result.failures.append(Failure("crash", None, "rewrite() raised: " + "".join(
                traceback.format_exception_only(type(err), err)).strip(), categorize(spec, None, "crash")))
            return result
        _check_report(result, spec, truths, report.sites, report.failure)
        rewritten = {b for b, d in result.decisions.items() if d == "rewritten"}
        expected = _expected(model, inputs, truths, spec.stride, rewritten)
        tol = REWRITE_TOL[spec.dtype]
        problem = _close(out, expected, tol)
        if problem:
            _localize(result, model, inputs, spec, truths, rewritten, problem, tol)
        if spec.compiled:
            _check_compiled(result, model, inputs, spec, truths)
    return result


def _check_report(result, spec, truths, sites, failure):
    if failure:
        result.failures.append(Failure("pass-failed", None, failure, categorize(spec, None, "pass-failed")))
    seen: dict[int, list] = {}
    for s in sites:
        b = site_block(s.module_path)
        if b is None or b >= len(truths):
            result.failures.append(Failure("extra-site", None, f"report names a site {s.module_path!r} "
                                           f"({s.form}) that is no attention module of the model"))
            continue
        seen.setdefault(b, []).append(s)
    for t in truths:
        rows = seen.get(t.block, [])
        if not rows:
            result.decisions[t.block] = "missing"
            # a pass that failed as a whole may report no sites: that is the pass failure's fault
            result.failures.append(Failure(
                "missing-site", t.block, f"{t.spec.form} site not in the report" + (
                    " (the pass failed)" if failure else ""),
                categorize(spec, None, "pass-failed") if failure else categorize(spec, t, "missing-site")))
            continue
        if len(rows) > 1:
            result.failures.append(Failure("extra-site", t.block, f"{len(rows)} report rows for one site: "
                                           f"{[(r.module_path, r.form) for r in rows]}"))
        row = rows[0]
        result.decisions[t.block] = row.decision
        if row.decision == "rewritten" and not t.is_image_self_attention:
            result.failures.append(Failure(
                "unsound-rewrite", t.block, f"rewritten as {row.q_layout}/{row.k_layout} but the true "
                f"layout is {t.describe()}; reason {row.reason!r}", categorize(spec, t, "unsound-rewrite")))
        elif row.decision != "rewritten" and not failure and expects_rewrite(spec, t):
            result.failures.append(Failure(
                "missed-rewrite", t.block, f"{t.spec.form} on {t.describe()} skipped: {row.reason!r}",
                categorize(spec, t, "missed-rewrite")))


def _localize(result, model, inputs, spec, truths, rewritten, problem, tol):
    """The output differs from the oracle: find which rewritten site is wrong by rewriting one at a
    time (include=<that site>)."""
    blamed = False
    for b in sorted(rewritten):
        t = truths[b]
        if not t.is_image_self_attention:
            blamed = True  # already reported as an unsound rewrite
            continue
        gm, report = _rewrite(model, inputs, spec, include=[rf"^stages\.{b}\.attn(\.|$)"])
        decided = {site_block(s.module_path): s.decision for s in report.sites}
        if decided.get(b) != "rewritten":
            continue
        one = _close(gm(*inputs), _expected(model, inputs, truths, spec.stride, {b}), tol)
        if one:
            blamed = True
            result.failures.append(Failure("wrong-result", b, f"{t.spec.form} on {t.describe()}: {one}",
                                           categorize(spec, t, "wrong-result")))
    if not blamed:
        result.failures.append(Failure("wrong-result", None, f"whole model differs from the expected "
                                       f"output ({'oracle' if rewritten else 'untouched model'}): {problem}"))


def _inductor_alone_is_wrong(model, inputs, spec) -> bool:
    torch._dynamo.reset()
    dynamic = True if spec.compiled == "dynamic" else None
    out = torch.compile(model, backend="inductor", dynamic=dynamic)(*inputs)
    return _close(out, model(*inputs), COMPILED_TOL[spec.dtype]) is not None


def _check_compiled(result, model, inputs, spec, truths):
    try:
        out, reports = _compiled(model, inputs, spec)
    except Exception as err:
        result.failures.append(Failure("crash", None, "torch.compile(backend='gridattn') raised: " + "".join(
            traceback.format_exception_only(type(err), err)).strip()))
        return
    # With symbolic sizes Dynamo may compile a frame twice in one call (a float attribute traced as a
    # SymFloat, then specialized): the graph compiled last for a site is the one that ran.
    sites = list({s.module_path: s for r in reports for s in r.sites}.values())
    failure = "; ".join(r.failure for r in reports if r.failure) or None
    sub = Result(spec, truths=truths)
    _check_report(sub, spec, truths, sites, failure)
    for f in sub.failures:
        f.message = "(compiled) " + f.message
    result.failures += sub.failures
    result.report += "\n(compiled)\n" + "\n".join(str(r) for r in reports)
    rewritten = {b for b, d in sub.decisions.items() if d == "rewritten"}
    problem = _close(out, _expected(model, inputs, truths, spec.stride, rewritten), COMPILED_TOL[spec.dtype])
    if problem and _inductor_alone_is_wrong(model, inputs, spec):
        result.failures.append(Failure("wrong-result", None, "(compiled) " + problem + "; so is plain inductor",
                                       "inductor"))
    elif problem:
        blame = [b for b in rewritten if truths[b].spec.form == "sdpa_gqa"]
        result.failures.append(Failure("wrong-result", blame[0] if blame else None, "(compiled) " + problem,
                                       categorize(spec, truths[blame[0]], "wrong-result") if blame else None))

"""Choose a stride per site under an error budget, by measuring each site's effect on the output.

``calibrate`` captures the model once, then for every eligible site (by module path) and every
candidate stride runs the graph with only that site rewritten and measures the output deviation
against the unmodified graph. Deviations of different sites are treated as additive (a first-order
estimate, and an upper bound for a norm-based error by the triangle inequality) to pick the set of
strides that saves the most attention FLOPs within the budget; the chosen combination is then
measured as a whole, and upgrades are undone until the measured error fits. What is returned was
measured, not estimated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config.options import GridAttnConfig
from ..frontends.api import capture
from ..grid import Stride, format_stride, normalize_stride
from ..passes.pipeline import run_pass

logger = logging.getLogger("gridattn_fx")

Metric = Callable[[object, object], float]


def relative_error(reference, candidate) -> float:
    """||candidate - reference|| / ||reference|| over every tensor of the outputs (float64)."""
    ref = [t.detach() for t in torch.utils._pytree.tree_leaves(reference) if isinstance(t, torch.Tensor)]
    out = [t.detach() for t in torch.utils._pytree.tree_leaves(candidate) if isinstance(t, torch.Tensor)]
    num = sum(float((a.double() - b.double()).square().sum()) for a, b in zip(ref, out))
    den = sum(float(a.double().square().sum()) for a in ref)
    return (num / den) ** 0.5 if den else num ** 0.5


@dataclass
class SiteOption:
    """One measured choice: ``path`` at ``stride`` alone, its error and the attention FLOPs it saves."""

    path: str
    stride: Stride
    error: float
    saved_flops: int


@dataclass
class Calibration:
    """The result: per-site strides, and everything measured to choose them."""

    site_strides: dict[str, Stride]
    error: float                    # measured error of the chosen combination
    budget: float
    flops_before: int               # attention FLOPs of the eligible sites, unmodified
    saved_flops: int                # attention FLOPs the chosen strides save
    options_measured: list[SiteOption] = field(default_factory=list)
    uniform: dict[Stride, tuple[float, int]] = field(default_factory=dict)   # stride -> (error, saved)
    base: GridAttnConfig = field(default_factory=GridAttnConfig)

    @property
    def config(self) -> GridAttnConfig:
        """The base config with these per-site strides (other sites stay at stride 1)."""
        return self.base.with_options(stride=1, site_strides=dict(self.site_strides))

    @property
    def options(self) -> dict:
        """``torch.compile(model, backend="gridattn", options=calibration.options)``."""
        return self.config.to_options()

    def __str__(self) -> str:
        lines = [f"{'site':<40} {'stride':>7} {'error alone':>12} {'GFLOP saved':>12}"]
        measured = {(o.path, o.stride): o for o in self.options_measured}
        for path, stride in self.site_strides.items():
            o = measured.get((path, stride))
            err = f"{o.error:.2e}" if o else "0"
            saved = f"{o.saved_flops / 1e9:.3f}" if o else "0.000"
            lines.append(f"{path:<40} {format_stride(stride):<7} {err:>12} {saved:>12}")
        lines.append(
            f"calibrated: error {self.error:.3e} (budget {self.budget:.3e}), attention FLOPs saved "
            f"{self.saved_flops / 1e9:.3f} of {self.flops_before / 1e9:.3f} GFLOP "
            f"({100 * self.saved_flops / max(self.flops_before, 1):.1f}%)"
        )
        for stride, (err, saved) in self.uniform.items():
            fits = "within" if err <= self.budget else "over"
            lines.append(f"uniform {format_stride(stride)}: error {err:.3e} ({fits} budget), saves "
                         f"{saved / 1e9:.3f} GFLOP ({100 * saved / max(self.flops_before, 1):.1f}%)")
        return "\n".join(lines)


def _samples(sample_inputs) -> list[tuple]:
    """One call's arguments, or a list of several calls' argument tuples."""
    if isinstance(sample_inputs, torch.Tensor):
        return [(sample_inputs,)]
    items = list(sample_inputs)
    if items and all(isinstance(s, (tuple, list)) for s in items):
        return [tuple(s) for s in items]
    return [tuple(items)]


class _Measurer:
    """Runs the captured graph with a config on every sample and scores it against the reference."""

    def __init__(self, gm, samples, metric: Metric, base: GridAttnConfig):
        self.gm, self.samples, self.metric, self.base = gm, samples, metric, base
        with torch.no_grad():
            self.reference = [gm(*s) for s in samples]

    def __call__(self, site_strides: dict[str, Stride]):
        """(mean error, report) with exactly ``site_strides`` applied; None if the pass failed."""
        config = self.base.with_options(stride=1, site_strides=site_strides, strict=True)
        try:
            new_gm, report = run_pass(self.gm, self.samples[0], config)
        except Exception:
            logger.debug("calibration: the pass failed for %s", site_strides, exc_info=True)
            return None
        with torch.no_grad():
            errors = [float(self.metric(ref, new_gm(*s))) for ref, s in zip(self.reference, self.samples)]
        return sum(errors) / len(errors), report


def _saved(report, path: str | None = None) -> int:
    return sum((s.flops_before or 0) - (s.flops_after or 0)
               for s in report.rewritten if path is None or s.module_path == path)


def calibrate(model, sample_inputs, budget: float = 0.01, strides=(1, 2, 4), metric: Metric | None = None,
              config: GridAttnConfig | None = None, **options) -> Calibration:
    """Per-site strides that save the most attention FLOPs with a measured error within ``budget``.

    ``sample_inputs``: the arguments of one call, or a list of argument tuples (same shapes).
    ``metric(reference_output, output) -> float``: the error to bound; default :func:`relative_error`
    of the final output. Other options (``min_image_tokens``, ``include``, ``preset``...) select the
    eligible sites as in the backend. Returns a :class:`Calibration`; pass ``.options`` to
    ``torch.compile(..., backend="gridattn", options=...)``.
    """
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or budget < 0:
        raise ValueError(f"calibrate: budget must be a non-negative number, got {budget!r}")
    try:
        # a (1, 1, 1) video stride is stride 1 too
        candidates = sorted(s for s in {normalize_stride(s) for s in strides} if any(g != 1 for g in s))
    except TypeError as err:
        raise TypeError(f"calibrate: strides: {err}") from None
    if not candidates:
        raise ValueError(f"calibrate: strides {strides!r} offer nothing but stride 1")
    samples = _samples(sample_inputs)
    if len({tuple(tuple(getattr(t, "shape", ())) for t in s) for s in samples}) != 1:
        raise ValueError("calibrate: all samples must have the same shapes (the graph is captured once)")
    base = (config or GridAttnConfig()).with_options(**options)
    if model.training:
        raise ValueError("calibrate: put the model in eval() mode (calibration measures inference)")

    gm = capture(model, samples[0])
    measure = _Measurer(gm, samples, metric or relative_error, base)

    # Every eligible site at every candidate stride, alone.
    _, probe = run_pass(gm, samples[0], base.with_options(stride=candidates[0], site_strides={}))
    paths = list(dict.fromkeys(s.module_path for s in probe.rewritten))
    flops_before = sum(s.flops_before or 0 for s in probe.rewritten)
    measured: list[SiteOption] = []
    for path in paths:
        for stride in candidates:
            result = measure({path: stride})
            if result is None or not any(s.module_path == path for s in result[1].rewritten):
                continue  # e.g. the image is smaller than this stride
            measured.append(SiteOption(path, stride, result[0], _saved(result[1], path)))

    # Starting points: the additive estimate, and every uniform stride whose measured error fits.
    starts = [_choose(paths, measured, budget)]
    uniform = {}
    for stride in candidates:
        res = measure({p: stride for p in paths})
        if res is None:
            continue
        uniform[stride] = (res[0], _saved(res[1]))
        if res[0] <= budget:
            starts.append({p: next((o for o in measured if o.path == p and o.stride == stride), None)
                           for p in paths})
    best = None
    for start in starts:
        chosen, (error, report) = _extend(_repair(start, measure, budget), measured, measure, budget)
        saved = _saved(report) if report is not None else 0
        if best is None or saved > best[2]:
            best = (chosen, error, saved)
    chosen, error, saved = best
    site_strides = {p: (chosen[p].stride if chosen.get(p) else (1, 1)) for p in paths}
    return Calibration(site_strides, error, float(budget), flops_before, saved, measured, uniform, base)


Choice = dict  # module path -> the SiteOption applied there, or None (stride 1)


def _strides(chosen: Choice) -> dict[str, Stride]:
    return {p: o.stride for p, o in chosen.items() if o is not None}


def _repair(chosen: Choice, measure, budget: float) -> Choice:
    """Undo the least efficient upgrades until the measured error of the whole choice fits."""
    chosen = dict(chosen)
    while _strides(chosen):
        result = measure(_strides(chosen))
        if result is not None and result[0] <= budget:
            break
        worst = max((o for o in chosen.values() if o is not None),
                    key=lambda o: o.error / max(o.saved_flops, 1))
        chosen[worst.path] = None
    return chosen


def _extend(chosen: Choice, measured, measure, budget: float):
    """Try the remaining upgrades, most FLOPs per unit of error first, keeping each whose measured
    combined error still fits. Returns the choice and its (error, report)."""
    result = measure(_strides(chosen)) if _strides(chosen) else (0.0, None)
    for o in sorted(measured, key=lambda o: -o.saved_flops / max(o.error, 1e-30)):
        current = chosen[o.path]
        if o.saved_flops <= (current.saved_flops if current else 0):
            continue
        trial = {**chosen, o.path: o}
        res = measure(_strides(trial))
        if res is not None and res[0] <= budget:
            chosen, result = trial, res
    return chosen, result


def _choose(paths, measured: list[SiteOption], budget: float) -> dict[str, SiteOption | None]:
    """Greedy multiple-choice knapsack: repeatedly take the upgrade (a site to a larger stride) with
    the most FLOPs saved per unit of added error that still fits the (additive) budget."""
    chosen: dict[str, SiteOption | None] = {p: None for p in paths}
    spent = 0.0
    while True:
        best, best_ratio = None, -1.0
        for o in measured:
            current = chosen[o.path]
            gain = o.saved_flops - (current.saved_flops if current else 0)
            cost = o.error - (current.error if current else 0.0)
            if gain <= 0 or spent + cost > budget:
                continue
            ratio = gain / max(cost, 1e-30)
            if ratio > best_ratio:
                best, best_ratio = o, ratio
        if best is None:
            return chosen
        current = chosen[best.path]
        spent += best.error - (current.error if current else 0.0)
        chosen[best.path] = best

"""Choose a stride and a grouping per site, by measuring each site's effect on the output.

``calibrate`` captures the model once, then for every eligible site (by module path) and every
candidate (stride, grouping) runs the graph with only that site rewritten and measures the output
deviation against the unmodified graph. Under an error budget it saves the most FLOPs; under a
FLOPs cap (``max_flops_ratio``) it looks for the least error (:func:`_least_error_within`). Deviations of different sites are treated as additive (a first-order
estimate, and an upper bound for a norm-based error by the triangle inequality) to pick the set of
strides that saves the most attention FLOPs within the budget; the chosen combination is then
measured as a whole, and upgrades are undone until the measured error fits. What is returned was
measured, not estimated.
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config.options import GridAttnConfig
from ..config.sites import SiteOptions, check_grouping, check_shared_pool
from ..frontends.api import capture
from ..grid import Stride, format_stride, normalize_stride
from ..passes.pipeline import run_pass
from ..report import choice_cell

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
    """One measured choice: ``path`` at ``stride`` with ``grouping`` alone, its error and the
    attention FLOPs it saves."""

    path: str
    stride: Stride
    error: float
    saved_flops: int
    grouping: object = "grid"      # a grouping name, or a tuple of them per head set
    shared_pool: int = 0           # shared tokens pooled over p x p windows (0: none)

    @property
    def label(self) -> str:
        return choice_cell(self.stride, _grouping_name(self.grouping), self.shared_pool)

    @property
    def compact(self) -> str:
        return compact_choice(self.stride, _grouping_name(self.grouping), self.shared_pool)

    @property
    def key(self) -> tuple:
        return self.stride, self.grouping, self.shared_pool


def compact_choice(stride, grouping: str = "grid", shared_pool: int = 0) -> str:
    """A site's choice in one token, as :meth:`Calibration.describe` lists it: ``grid:2x2``,
    ``window|grid:2x2+pool4``."""
    return f"{grouping}:{format_stride(stride)}" + (f"+pool{shared_pool}" if shared_pool else "")


def _grouping_name(grouping) -> str:
    return "|".join(grouping) if isinstance(grouping, tuple) else grouping


Choice = dict  # module path -> the SiteOption applied there, or None (dense)


@dataclass
class Calibration:
    """The result: the option chosen per site (None: dense), and everything measured to choose it."""

    chosen: Choice
    error: float                    # measured error of the chosen combination
    budget: float
    flops_before: int               # attention FLOPs of the eligible sites, unmodified
    saved_flops: int                # attention FLOPs the chosen options save
    options_measured: list[SiteOption] = field(default_factory=list)
    # every uniform configuration measured: (stride, grouping, shared_pool) -> (error, saved)
    uniform_by_grouping: dict[tuple, tuple[float, int]] = field(default_factory=dict)
    base: GridAttnConfig = field(default_factory=GridAttnConfig)
    max_flops_ratio: float | None = None

    @property
    def site_strides(self) -> dict[str, Stride]:
        """Every eligible site's stride, (1, 1) where it stays dense."""
        return {p: o.stride if o else (1, 1) for p, o in self.chosen.items()}

    @property
    def site_groupings(self) -> dict[str, object]:
        """The grouping of every rewritten site whose grouping is not the grid."""
        return {p: o.grouping for p, o in self.chosen.items() if o and o.grouping != "grid"}

    @property
    def site_pools(self) -> dict[str, int]:
        """The shared_pool of every rewritten site that has shared pooled tokens."""
        return {p: o.shared_pool for p, o in self.chosen.items() if o and o.shared_pool}

    @property
    def uniform(self) -> dict[Stride, tuple[float, int]]:
        """Uniform grid strides without shared tokens: stride -> (error, saved)."""
        return {s: v for (s, g, k), v in self.uniform_by_grouping.items() if g == "grid" and not k}

    @property
    def flops_ratio(self) -> float:
        """Attention FLOPs of the chosen configuration over those of dense attention, at the
        eligible sites."""
        return (self.flops_before - self.saved_flops) / max(self.flops_before, 1)

    @property
    def config(self) -> GridAttnConfig:
        """The base config with these per-site strides and groupings (other sites stay at stride 1)."""
        return self.base.with_options(stride=1, site_strides=self.site_strides, site_groupings=self.site_groupings,
                                      sites={p: SiteOptions(shared_pool=k) for p, k in self.site_pools.items()})

    @property
    def options(self) -> dict:
        """``torch.compile(model, backend="gridattn", options=calibration.options)``."""
        return self.config.to_options()

    def describe(self) -> str:
        """The chosen option of every site in one token:
        ``blocks.0.attn=grid:2x2,blocks.1.attn=window|grid:2x2+pool4,blocks.2.attn=dense``."""
        return ",".join(f"{p}={o.compact if o else 'dense'}" for p, o in self.chosen.items())

    def __str__(self) -> str:
        lines = [f"{'site':<40} {'choice':>18} {'error alone':>12} {'GFLOP saved':>12}"]
        for path, o in self.chosen.items():
            err, saved = (f"{o.error:.2e}", f"{o.saved_flops / 1e9:.3f}") if o else ("0", "0.000")
            lines.append(f"{path:<40} {o.label if o else 'dense':>18} {err:>12} {saved:>12}")
        goal = (f"least error within {self.max_flops_ratio:.3f} of the dense attention FLOPs"
                if self.max_flops_ratio is not None else f"budget {self.budget:.3e}")
        lines.append(
            f"calibrated: error {self.error:.3e} ({goal}), attention FLOPs saved "
            f"{self.saved_flops / 1e9:.3f} of {self.flops_before / 1e9:.3f} GFLOP "
            f"({100 * self.saved_flops / max(self.flops_before, 1):.1f}%, flops_ratio {self.flops_ratio:.3f})"
        )
        for (stride, grouping, pool), (err, saved) in self.uniform_by_grouping.items():
            fits = "within" if err <= self.budget else "over"
            lines.append(f"uniform {choice_cell(stride, _grouping_name(grouping), pool)}: error {err:.3e} "
                         f"({fits} budget), saves {saved / 1e9:.3f} GFLOP "
                         f"({100 * saved / max(self.flops_before, 1):.1f}%)")
        return "\n".join(lines)


def _samples(sample_inputs) -> list[tuple]:
    """One call's arguments, or a list of several calls' argument tuples."""
    if isinstance(sample_inputs, torch.Tensor):
        return [(sample_inputs,)]
    items = list(sample_inputs)
    if items and all(isinstance(s, (tuple, list)) for s in items):
        return [tuple(s) for s in items]
    return [tuple(items)]


def _site_options(chosen: Choice) -> dict[str, SiteOptions]:
    return {p: SiteOptions(stride=o.stride, grouping=o.grouping, shared_pool=o.shared_pool)
            for p, o in chosen.items() if o is not None}


class _Measurer:
    """Runs the captured graph with a config on every sample and scores it against the reference."""

    def __init__(self, gm, samples, metric: Metric, base: GridAttnConfig):
        self.gm, self.samples, self.metric, self.base = gm, samples, metric, base
        with torch.no_grad():
            self.reference = [gm(*s) for s in samples]
        self.cache: dict = {}

    def __call__(self, chosen: Choice):
        """(mean error, report) with exactly ``chosen`` applied; None if the pass failed. Each
        configuration is measured once."""
        key = tuple(sorted((p, *o.key) for p, o in chosen.items() if o is not None))
        if key not in self.cache:
            self.cache[key] = self._measure(_site_options(chosen))
        return self.cache[key]

    def _measure(self, sites):
        config = self.base.with_options(stride=1, sites=sites, site_strides={}, site_groupings={}, strict=True)
        try:
            with warnings.catch_warnings():  # a candidate a site cannot take is a measurement, not news
                warnings.simplefilter("ignore")
                new_gm, report = run_pass(self.gm, self.samples[0], config)
        except Exception:
            logger.debug("calibration: the pass failed for %s", sites, exc_info=True)
            return None
        with torch.no_grad():
            errors = [float(self.metric(ref, new_gm(*s))) for ref, s in zip(self.reference, self.samples)]
        return sum(errors) / len(errors), report


def _saved(report, path: str | None = None) -> int:
    return sum((s.flops_before or 0) - (s.flops_after or 0)
               for s in report.rewritten if path is None or s.module_path == path)


def _candidates(strides, groupings, shared_pools) -> list[tuple]:
    """Every (stride, grouping, shared_pool) to try, stride 1 left out (it is the dense choice)."""
    try:
        # a (1, 1, 1) video stride is stride 1 too
        stride_set = sorted(s for s in {normalize_stride(s) for s in strides} if any(g != 1 for g in s))
    except TypeError as err:
        raise TypeError(f"calibrate: strides: {err}") from None
    if not stride_set:
        raise ValueError(f"calibrate: strides {strides!r} offer nothing but stride 1")
    if isinstance(groupings, str) or not groupings:
        raise TypeError(f"calibrate: groupings must be a non-empty list of groupings, got {groupings!r}")
    names = list(dict.fromkeys(check_grouping(g, "calibrate: groupings") for g in groupings))
    if isinstance(shared_pools, int) or not shared_pools:
        raise TypeError(f"calibrate: shared_pools must be a non-empty list of ints, got {shared_pools!r}")
    pools = list(dict.fromkeys(check_shared_pool(p, "calibrate: shared_pools") for p in shared_pools))
    return [(s, g, p) for s in stride_set for g in names for p in pools]


def calibrate(model, sample_inputs, budget: float = 0.01, strides=(1, 2, 4), metric: Metric | None = None,
              config: GridAttnConfig | None = None, groupings=("grid",), max_flops_ratio: float | None = None,
              shared_pools=(0,), **options) -> Calibration:
    """Per-site strides and groupings chosen from measurements on ``sample_inputs``.

    Two goals:

    * by default, the most attention FLOPs saved with a measured error within ``budget``;
    * with ``max_flops_ratio`` (e.g. 0.25, the FLOPs of stride 2 everywhere), the least measured
      error among configurations whose attention FLOPs are at most that fraction of dense
      attention's at the eligible sites (``budget`` is then not used).

    ``groupings``: the groupings each site may take at each stride ("grid", "window", or a tuple of
    them per head set such as ``("grid", "window")``); ``shared_pools``: with or without shared
    pooled tokens (0: without; p: pooled over p x p windows). Every site may also stay dense.
    ``sample_inputs``: the arguments of one call, or a list of argument tuples (same shapes).
    ``metric(reference_output, output) -> float``: the error to bound; default :func:`relative_error`
    of the final output. Other options (``min_image_tokens``, ``include``, ``preset``...) select the
    eligible sites as in the backend. Returns a :class:`Calibration`; pass ``.options`` to
    ``torch.compile(..., backend="gridattn", options=...)``.
    """
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or budget < 0:
        raise ValueError(f"calibrate: budget must be a non-negative number, got {budget!r}")
    if max_flops_ratio is not None and (isinstance(max_flops_ratio, bool) or not isinstance(max_flops_ratio, (int, float))
                                        or not 0 < max_flops_ratio <= 1):
        raise ValueError(f"calibrate: max_flops_ratio must be a number in (0, 1], got {max_flops_ratio!r}")
    candidates = _candidates(strides, groupings, shared_pools)
    samples = _samples(sample_inputs)
    if len({tuple(tuple(getattr(t, "shape", ())) for t in s) for s in samples}) != 1:
        raise ValueError("calibrate: all samples must have the same shapes (the graph is captured once)")
    base = (config or GridAttnConfig()).with_options(**options)
    if model.training:
        raise ValueError("calibrate: put the model in eval() mode (calibration measures inference)")

    gm = capture(model, samples[0])
    measure = _Measurer(gm, samples, metric or relative_error, base)

    # Every eligible site with every candidate, alone.
    _, probe = run_pass(gm, samples[0], base.with_options(stride=candidates[0][0], grouping="grid", shared_pool=0,
                                                          sites={}, site_strides={}, site_groupings={}))
    paths = list(dict.fromkeys(s.module_path for s in probe.rewritten))
    flops_before = sum(s.flops_before or 0 for s in probe.rewritten)
    measured: list[SiteOption] = []
    for path in paths:
        for stride, grouping, pool in candidates:
            option = SiteOption(path, stride, 0.0, 0, grouping, pool)
            result = measure({path: option})
            if result is None or not any(s.module_path == path for s in result[1].rewritten):
                continue  # e.g. the image is smaller than this stride, or the heads do not split
            option.error, option.saved_flops = result[0], _saved(result[1], path)
            measured.append(option)

    uniform: dict[tuple, tuple] = {}
    uniform_choices = []
    for candidate in candidates:
        choice = {p: next((o for o in measured if o.path == p and o.key == candidate), None) for p in paths}
        res = measure(choice) if any(choice.values()) else None
        if res is not None:
            uniform[candidate] = (res[0], _saved(res[1]))
            uniform_choices.append((choice, res))

    if max_flops_ratio is not None:
        chosen, (error, report) = _least_error_within(paths, measured, measure, flops_before, max_flops_ratio,
                                                      uniform_choices)
        saved = _saved(report) if report is not None else 0
    else:
        # Starting points: the additive estimate, and every uniform configuration whose error fits.
        starts = [_choose(paths, measured, budget)] + [c for c, res in uniform_choices if res[0] <= budget]
        best = None
        for start in starts:
            chosen, (error, report) = _extend(_repair(start, measure, budget), measured, measure, budget)
            saved = _saved(report) if report is not None else 0
            if best is None or saved > best[2] or (saved == best[2] and error < best[1]):
                best = (chosen, error, saved)
        chosen, error, saved = best
    return Calibration({p: chosen.get(p) for p in paths}, error, float(budget), flops_before, saved, measured,
                       uniform, base, max_flops_ratio)


def _least_error_within(paths, measured, measure, flops_before: int, cap: float, uniform_choices,
                        finalists: int = 4, max_combinations: int = 200_000):
    """The least measured error among the choices whose attention FLOPs fit ``cap`` x dense.

    Errors of single sites are added up as an estimate (the first-order model :func:`calibrate`
    uses for budgets); the ``finalists`` best estimates and every uniform configuration that fits
    are then measured as a whole, and the best measurement wins. Returns (choice, (error, report)).
    """
    need = flops_before * (1 - cap)   # FLOPs the choice must save
    options = [[None] + [o for o in measured if o.path == p] for p in paths]
    combos = math.prod(len(o) for o in options)
    scored = []
    if combos <= max_combinations:
        for combo in itertools.product(*options):
            saved = sum(o.saved_flops for o in combo if o is not None)
            if saved >= need - 1e-6 * flops_before:
                scored.append((sum(o.error for o in combo if o is not None), -saved, combo))
        scored.sort(key=lambda t: (t[0], t[1]))
    else:  # too many to enumerate: per site, the least error among the options that save its share
        most = [max((o.saved_flops for o in opts[1:]), default=0) for opts in options]
        share = [need * m / max(sum(most), 1) for m in most]
        combo = tuple(min((o for o in opts[1:] if o.saved_flops >= s), key=lambda o: o.error, default=None)
                      for opts, s in zip(options, share))
        scored.append((0.0, 0, combo))
    trials = [dict(zip(paths, combo)) for _, _, combo in scored[:finalists]]
    trials += [c for c, res in uniform_choices if _saved(res[1]) >= need - 1e-6 * flops_before]
    best = None
    for chosen in trials:
        res = measure(chosen) if any(chosen.values()) else (0.0, None)
        if res is None:
            continue
        saved = _saved(res[1]) if res[1] is not None else 0
        if saved < need - 1e-6 * flops_before:
            continue   # the sites interact: the whole saves less than the parts (not expected)
        if best is None or res[0] < best[1][0]:
            best = (chosen, res)
    if best is None:
        raise ValueError(f"calibrate: no measured configuration fits max_flops_ratio={cap} "
                         f"(candidates: {sorted({o.label for o in measured})})")
    return best


def _repair(chosen: Choice, measure, budget: float) -> Choice:
    """Undo the least efficient upgrades until the measured error of the whole choice fits."""
    chosen = dict(chosen)
    while any(chosen.values()):
        result = measure(chosen)
        if result is not None and result[0] <= budget:
            break
        worst = max((o for o in chosen.values() if o is not None),
                    key=lambda o: o.error / max(o.saved_flops, 1))
        chosen[worst.path] = None
    return chosen


def _extend(chosen: Choice, measured, measure, budget: float):
    """Try the remaining upgrades, most FLOPs per unit of error first, keeping each whose measured
    combined error still fits. Returns the choice and its (error, report)."""
    result = measure(chosen) if any(chosen.values()) else (0.0, None)
    for o in sorted(measured, key=lambda o: -o.saved_flops / max(o.error, 1e-30)):
        current = chosen[o.path]
        if o.saved_flops < (current.saved_flops if current else 0) or (
                current is not None and o.saved_flops == current.saved_flops and o.error >= current.error):
            continue
        trial = {**chosen, o.path: o}
        res = measure(trial)
        if res is not None and res[0] <= budget and (current is None or o.saved_flops > current.saved_flops
                                                     or res[0] < result[0]):
            chosen, result = trial, res
    return chosen, result


def _choose(paths, measured: list[SiteOption], budget: float) -> dict[str, SiteOption | None]:
    """Greedy multiple-choice knapsack: repeatedly take the upgrade (a site to another option) with
    the most FLOPs saved per unit of added error that still fits the (additive) budget; at equal
    FLOPs, the option with less error."""
    chosen: dict[str, SiteOption | None] = {p: None for p in paths}
    spent = 0.0
    while True:
        best, best_key = None, None
        for o in measured:
            current = chosen[o.path]
            gain = o.saved_flops - (current.saved_flops if current else 0)
            cost = o.error - (current.error if current else 0.0)
            if gain < 0 or (gain == 0 and cost >= 0) or spent + cost > budget:
                continue
            key = (gain > 0, gain / max(cost, 1e-30) if gain > 0 else -cost)
            if best_key is None or key > best_key:
                best, best_key = o, key
        if best is None:
            return chosen
        current = chosen[best.path]
        spent += best.error - (current.error if current else 0.0)
        chosen[best.path] = best

"""The whole pass on one graph: find sites, prove layouts, decide, rewrite, re-check."""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from ..config import GridAttnConfig
from ..config.sites import names_site
from ..crossgraph.break_handoff import fact_key, handed_facts, output_facts
from ..crossgraph.hints import strip_layout_hints
from ..crossgraph.region import find_region
from ..crossgraph.split_handoff import inherited_facts, leave_facts
from ..grid import format_stride
from ..ir.graphs import copy_graph_module, ensure_values, fake_evaluation
from ..ir.module_paths import module_path
from ..ir.values import value_of as _val
from ..layout.analysis import LayoutAnalysis
from ..layout.facts import LayoutSource, _hint, layout_source
from ..layout.positions import read_position_inputs
from ..patterns import AttentionSite, find_attention_sites
from ..reasons import Skip, SkipKind
from ..report import REWRITTEN, SKIPPED, Report, SiteReport
from .local_groups import LocalGroups, apply_local_groups, check_group_order, plan_local_groups
from .motion import apply_motion, check_motion, plan_motion
from .policy import decide
from .rewrite import plan_sizes, rewrite_site

logger = logging.getLogger("gridattn_fx")


def _check_replacement(site: AttentionSite, plan, implementation: str) -> None:
    """Run the replacement on the site's fake values: same shape and dtype as the original output."""
    values = [_val(n) for n in site.inputs]
    expected = _val(site.output)
    mode = getattr(values[0], "fake_mode", None)
    if mode is None:
        return
    if plan_sizes(plan):
        # Symbolic sizes: checked at the sizes the graph was traced with, on static fake tensors.
        # (Symbolic fake evaluation of the regrouping costs seconds of sympy per site; the trace
        # in rewrite_site takes the size decisions and their guards.)
        mode = FakeTensorMode()
        with mode:
            values = [torch.empty([_stand_in(d) for d in v.shape], dtype=v.dtype, device=v.device)
                      if isinstance(v, torch.Tensor) else v for v in values]
        plan = replace(plan, q_layout=plan.q_layout.map_sizes(_stand_in), k_layout=plan.k_layout.map_sizes(_stand_in))
    with fake_evaluation(mode):
        got = site.build(plan, implementation)(*values)
    # Symbolic sizes are compared at their traced values: a sanity check (the grouping is exact by
    # construction), and the replacement's size expressions need not simplify to the original's.
    if len(got.shape) != len(expected.shape) or got.dtype != expected.dtype or any(
            _stand_in(a) != _stand_in(b) for a, b in zip(got.shape, expected.shape)):
        raise RuntimeError(
            f"grid rewrite of {site.output.name} would change its output from "
            f"{tuple(expected.shape)}/{expected.dtype} to {tuple(got.shape)}/{got.dtype}"
        )


def _stand_in(size, unknown: int = 3) -> int:
    """A size at the value it was traced with; a data-dependent one (an unbacked SymInt, no traced
    value) evaluated with each of its unknowns at ``unknown``, the same for all, so that equal
    expressions stay equal through the check."""
    hint = _hint(size)
    if hint is not None or not isinstance(size, torch.SymInt):
        return hint
    env = size.node.shape_env
    expr, known = size.node.expr, (env.backed_var_to_val if hasattr(env, "backed_var_to_val")
                                        else env.var_to_val)
    return int(expr.xreplace({s: known.get(s, unknown) for s in expr.free_symbols}))


class ReplacementCheckFailed(Exception):
    """The site's replacement did not pass its check on fake values; nothing was changed."""


def is_dynamo_restart(err: BaseException) -> bool:
    """Dynamo's restarts (``RestartAnalysis`` and its subclasses, e.g. ``TensorifyScalarRestartAnalysis``)
    are control flow - Dynamo traces the frame again - not failures: never catch them as one."""
    try:
        from torch._dynamo.exc import RestartAnalysis
    except ImportError:  # pragma: no cover - every supported torch has it
        return False
    return isinstance(err, RestartAnalysis)


def _rewrite(gm: fx.GraphModule, site: AttentionSite, plan, config: GridAttnConfig) -> str:
    """Rewrite one site, with its regrouping moved to the neighbouring per-token ops where that is
    exact (passes/motion.py); returns where the regrouping went, for the report. Raises
    :class:`ReplacementCheckFailed` (graph untouched) when the replacement fails its check."""
    why = "move_regrouping=False" if not config.move_regrouping else (
        "implementation='masked'" if config.implementation != "grouped" else "")
    if not why and site.value_dim % plan.ndim != plan.ndim - 2:
        # passes/motion.py tracks v on axis -2: a channels-first v (``v @ P^T``) or a (batch, tokens,
        # heads, features) op's stays put
        why = ("the value and output are channels-first (v @ P^T)" if site.value_dim % plan.ndim == plan.ndim - 1
               else "the op's tensors are (batch, tokens, heads, features)")
    if not why:
        try:
            motion, why = plan_motion(gm, site, plan)
            if motion is not None:
                pregrouped = replace(plan, pregrouped=True)
                check_motion(gm, site, pregrouped, motion, config.implementation)
        except Exception as err:  # nothing is changed yet: keep the regrouping at the site
            if config.strict or is_dynamo_restart(err):
                raise
            motion, why = None, f"moving it failed its check ({type(err).__name__}: {err})"
        if motion is not None:
            apply_motion(gm, site, pregrouped, motion, config.implementation)
            return motion.describe(site.output)
    try:
        _check_replacement(site, plan, config.implementation)
    except Exception as err:
        if is_dynamo_restart(err):
            raise
        raise ReplacementCheckFailed(f"{type(err).__name__}: {err}") from err
    rewrite_site(gm, site, plan, config.implementation)
    return f"regrouping at the attention call ({why})"


# new_gm.meta key: what the rewrite relies on that Dynamo does not guard (RuntimeChecks' fields).
RUNTIME_CHECKS = "gridattn_runtime_checks"


def run_pass(gm: fx.GraphModule, example_inputs, config: GridAttnConfig,
             report: Report | None = None, training: bool = False,
             checked: bool = False) -> tuple[fx.GraphModule, Report]:
    """Rewrite a copy of ``gm``; decisions are added to ``report`` as they are made, so a caller
    that catches a failure still has every site found up to that point.

    ``training``: the graph belongs to a module in training mode (shuffle distributing applies).
    ``checked``: layouts may be read from the values of position-id inputs (layout/positions.py)
    and from earlier graphs' outputs handed over across a graph break (crossgraph/break_handoff.py);
    only for a caller that runs the result only on inputs for which ``new_gm.meta[RUNTIME_CHECKS]``
    holds (frontends/checked_graph.py).
    """
    report = report if report is not None else Report(implementation=config.implementation, preset=config.preset)
    region = find_region(gm, example_inputs)
    new_gm = copy_graph_module(gm)
    ensure_values(new_gm, example_inputs)
    # prepare()'s markers come off first: everything below sees the graph it would see without them.
    hints, hint_conflicts = strip_layout_hints(new_gm)
    sites = find_attention_sites(new_gm)
    positions = read_position_inputs(new_gm, example_inputs) if checked and sites else {}
    handed = handed_facts(new_gm, example_inputs) if checked else {}
    layouts = LayoutAnalysis(new_gm, {s.output: (s.query, s.query_dim) for s in sites if s.build is not None},
                             inherited_facts(new_gm), hints, hint_conflicts, positions, handed)
    leave_facts(new_gm, layouts.facts)  # before the rewrite: output names are still the original ones
    outputs = output_facts(new_gm, layouts.facts) if checked else {}
    chosen, shared_graph, served_paths, stride_warnings, locals_ = [], [], [], {}, []
    for site in sites:
        relative = module_path(site.output)
        path = region.full_path(relative) if region else relative
        paths = region.paths(relative) if region else [path]  # the site in every module this graph serves
        served_paths += paths
        check_group_order(site, layouts, path)
        local = plan_local_groups(site, layouts, config, path) if len(paths) == 1 and not training else None
        if isinstance(local, LocalGroups):
            report.sites.append(_local_row(site, path, local, layouts))
            locals_.append((site, local))
            continue
        if len(paths) > 1:
            d, disagreement = _decide_shared(site, layouts, config, paths, training)
            if disagreement:
                shared_graph.append(f"{path}: {disagreement}")
        else:
            d = decide(site, layouts, config, path, training)
        if isinstance(local, str) and not d.rewrite:
            d = replace(d, reason=local)
        row = _site_row(site, path, d, layouts)
        report.sites.append(row)
        if d.stride_warning:
            stride_warnings.setdefault(d.stride_warning, []).append(path or site.output.name)
        if d.rewrite:
            chosen.append((row, site, d.plan))
    if shared_graph:
        _warn(f"gridattn: graph #{report.graph}: " + "; ".join(shared_graph))
    if stride_warnings:  # once per graph (a triple on 2-D sites applies its (Gh, Gw))
        _warn(f"gridattn: graph #{report.graph}: " + "; ".join(
            f"{text} ({', '.join(paths)})" for text, paths in stride_warnings.items()))
    _check_site_keys(report, config, served_paths)
    rewritten = []
    for site, local in locals_:
        apply_local_groups(new_gm, site, local)
        rewritten.append(site)
    for row, site, plan in chosen:
        try:
            row.regrouping = _rewrite(new_gm, site, plan, config)
        except ReplacementCheckFailed as err:  # the graph is untouched so far: leave this one site alone
            if config.strict:
                raise err.__cause__ from None
            row.decision, row.flops_after = SKIPPED, row.flops_before
            row.reason = f"replacement failed its check, site left alone ({err})"
            row.skip = SkipKind.REPLACEMENT_FAILED
            report.site_failures.append(f"{row.module_path or row.node}: {err}")
            continue
        rewritten.append(site)
    if report.site_failures:
        _warn(f"gridattn: graph #{report.graph}: {len(report.site_failures)} attention site(s) chosen for a "
              f"rewrite stay dense because their replacement failed its check: "
              + "; ".join(report.site_failures))
    if checked:
        _note_runtime_checks(new_gm, report, example_inputs, positions, handed, outputs, layouts, rewritten)
    if rewritten:
        new_gm.graph.lint()
        new_gm.recompile()
    return new_gm, report


def _note_runtime_checks(gm: fx.GraphModule, report: Report, example_inputs, positions: dict, handed: dict,
                         outputs: dict, layouts: LayoutAnalysis, rewritten: list[AttentionSite]) -> None:
    """What the compiled graph must check at every call: the position inputs, as soon as a
    rewritten site or a recorded output relies on position values; the handed-over inputs, as soon
    as one relies on a handed-over fact (a fact does not say which of several inputs it came from,
    so every one read is checked)."""
    relied_on = [layouts.facts.get(n) for s in rewritten for n in (s.query, s.key)] + list(outputs.values())
    sources = {f.source for f in relied_on if f is not None}
    index = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    checks = {"positions": {}, "handed": {}, "outputs": outputs}
    if LayoutSource.POSITIONS in sources:
        checks["positions"] = {index[n]: example_inputs[index[n]].detach().clone() for n in positions}
        report.position_inputs = [n.name for n in positions]
    if LayoutSource.HANDED_OVER in sources:
        checks["handed"] = {index[n]: fact_key(f) for n, f in handed.items()}
    gm.meta[RUNTIME_CHECKS] = checks


def _site_row(site: AttentionSite, path: str, d, layouts: LayoutAnalysis) -> SiteReport:
    """The report's row for one decided site."""
    return SiteReport(
        node=site.output.name,
        module_path=path,
        form=site.form,
        q_shape=tuple(site.q_shape or ()),
        k_shape=tuple(site.k_shape or ()),
        q_layout=d.q_layout,
        k_layout=d.k_layout,
        evidence=d.evidence,
        decision=REWRITTEN if d.rewrite else SKIPPED,
        reason=d.reason,
        stride=d.plan.stride if d.plan else None,
        grouping=d.plan.grouping_name if d.plan else "grid",
        shared_pool=d.plan.shared_pool if d.plan else 0,
        flops_before=d.flops_before,
        flops_after=d.flops_after,
        layout_source=layout_source(layouts.facts.get(site.query)) if d.q_layout else "",
        skip=d.skip.kind if d.skip else None,
        lost_at=d.skip.lost_at if d.skip else None,
    )


def _local_row(site: AttentionSite, path: str, local: LocalGroups, layouts: LayoutAnalysis) -> SiteReport:
    """The report's row for a site that runs on this rank's own grid groups."""
    return SiteReport(
        node=site.output.name, module_path=path, form=site.form, q_shape=tuple(site.q_shape or ()),
        k_shape=tuple(site.k_shape or ()), q_layout=None, k_layout=None, evidence="grid-group sharding",
        decision=REWRITTEN, stride=local.stride,
        reason=(f"image self-attention on this rank's own grid groups (grid-group sharding, stride "
                f"{format_stride(local.stride)}, {local.group_tokens} tokens per group): {local.exchange} "
                "removed"),
        flops_before=local.flops_before, flops_after=local.flops_after,
        layout_source=layout_source(layouts.facts.get(site.query)))


def _decide_shared(site: AttentionSite, layouts: LayoutAnalysis, config: GridAttnConfig, paths: list[str],
                   training: bool):
    """The decision for a site of a graph that serves the modules at ``paths`` (regional
    compilation, crossgraph/region.py): one decision that holds for all of them, or the site left dense
    when options that depend on the path tell them apart. Returns (decision, why it is dense)."""
    decisions = [decide(site, layouts, config, path, training) for path in paths]
    first = decisions[0]

    def outcome(d):
        if not d.rewrite:
            return "dense"
        pool = f" +pool{d.plan.shared_pool}" if d.plan.shared_pool else ""
        return f"{d.plan.grouping_name} {'x'.join(str(g) for g in d.plan.stride)}{pool}"
    for path, d in zip(paths[1:], decisions[1:]):
        if outcome(d) != outcome(first):
            why = (f"this graph serves {len(paths)} modules that run the same code (regional compilation), and the "
                   f"options decide `{paths[0]}` ({outcome(first)}) and `{path}` ({outcome(d)}) differently: left "
                   f"dense for all of them; compile the whole model, or give these modules one setting")
            return replace(first, rewrite=False, reason=why, plan=None, flops_after=first.flops_before,
                           skip=Skip(SkipKind.REGION_DISAGREEMENT, why)), why
    return replace(first, reason=f"{first.reason}; this graph serves {len(paths)} modules that run the same code "
                                 f"(regional compilation), decided alike"), None


def _warn(message: str) -> None:
    """One RuntimeWarning for a decision the user must hear about (the report says it too)."""
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _check_site_keys(report: Report, config: GridAttnConfig, paths: list[str]) -> None:
    """Name the per-site option keys (``sites`` and its aliases) that choose no site of this graph
    (a wrong or stale path would otherwise rewrite nothing without a word). ``paths``: every site's
    path in every module the graph serves (a region graph stands for the same sites of all modules
    that share it)."""
    for option, key in config.site_keys():
        if not any(names_site(key, p) for p in paths):
            report.unmatched_site_keys.setdefault(option, []).append(key)
    for option, keys in report.unmatched_site_keys.items():
        listed = ", ".join(repr(k) for k in keys)
        _warn(f"gridattn: graph #{report.graph}: {option} "
              + (f"key {listed} matches" if len(keys) == 1 else f"keys {listed} match")
              + " no attention site in this graph")

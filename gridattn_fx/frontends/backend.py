"""The ``gridattn`` torch.compile backend: rewrite the Dynamo graph, then hand it to inductor."""

from __future__ import annotations

import logging
import warnings

import torch.fx as fx

from ..config.options import GridAttnConfig
from ..ir.module_paths import module_path
from ..passes.local_groups import GroupOrderError
from ..passes.pipeline import RUNTIME_CHECKS, is_dynamo_restart, run_pass
from ..patterns import find_attention_sites
from ..reasons import SkipKind
from ..report import SKIPPED, Report, SiteReport, record
from .checked_graph import CheckedGraph, RuntimeChecks
from .graph_breaks import capture_settings, new_graph_breaks
from .torch_logs import publish
from .training_mode import compiled_module_training

logger = logging.getLogger("gridattn_fx")
# Process-wide: only for warnings about the setup (the same for every graph), not about a graph.
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _fall_back(report: Report, failure: str) -> None:
    """Mark a report whose graph runs unmodified: no site counts as rewritten any more. Warns for
    every graph that falls back (the graph number keeps the messages of two graphs apart)."""
    report.failure = failure
    for site in report.rewritten:
        site.decision = SKIPPED
        site.reason = f"pass failed, graph left unmodified ({site.reason})"
        site.skip = SkipKind.PASS_FAILED
        site.flops_after = site.flops_before
    logger.debug("gridattn fallback details", exc_info=True)
    warnings.warn(f"gridattn: graph #{report.graph}: {failure}; the graph runs unmodified",
                  RuntimeWarning, stacklevel=3)


def _note_graph_breaks(report: Report) -> None:
    """The breaks Dynamo met since the previous graph, in the report; a warning for those whose hint
    names a Dynamo setting that would capture the code (attention there runs dense, unreported)."""
    report.graph_breaks = new_graph_breaks()
    for setting in capture_settings(report.graph_breaks):
        _warn_once(f"gridattn: Dynamo broke a graph where `torch._dynamo.config.{setting} = True` would capture "
                   f"the code; attention in code it could not capture runs eagerly, not rewritten (see the "
                   f"report's graph breaks; `python -m gridattn_fx coverage` counts such calls)")


def apply_pass(gm: fx.GraphModule, example_inputs, config: GridAttnConfig,
               training: bool = False, checked: bool = False) -> tuple[fx.GraphModule, Report]:
    """The pass with the backend's safety net: on failure, the original graph and a report saying so.
    ``checked``: see :func:`run_pass` (the caller checks the result's RUNTIME_CHECKS at every call)."""
    report = Report(implementation=config.implementation, preset=config.preset,
                    distributing="shuffle" if training and config.distributing == "shuffle" else "straightforward")
    try:
        new_gm, report = run_pass(gm, example_inputs, config, report, training, checked)
    except Exception as err:
        if config.strict or is_dynamo_restart(err) or isinstance(err, GroupOrderError):
            raise
        _fall_back(report, f"the rewrite pass failed ({type(err).__name__}: {err})")
        _report_undecided_sites(gm, report)
        new_gm = gm
    _warn_symbolic(report)
    _note_graph_breaks(report)
    record(report)
    publish(new_gm, report)  # TORCH_LOGS / TORCH_TRACE (tlparse): the report and the rewritten graph
    return new_gm, report


def _warn_symbolic(report: Report) -> None:
    """One warning per graph naming the sites left dense only because their image sizes are
    symbolic: unlike a process-wide once, every graph that loses sites this way says so."""
    lost = [s for s in report.skipped if s.skip is SkipKind.SYMBOLIC]
    if not lost:
        return
    from torch._guards import CompileContext

    graph = CompileContext.current_compile_id()
    where = f"graph {graph}" if graph is not None else "this graph"
    sites = ", ".join(s.module_path or s.node for s in lost)
    warnings.warn(
        f"gridattn: {len(lost)} attention site(s) of {where} keep dense attention because their image "
        f"sizes are symbolic ({sites}: {lost[0].reason}); compile with dynamic=False or mark the image "
        f"sizes static (torch._dynamo.mark_static) to rewrite them", RuntimeWarning, stacklevel=3)


def _report_undecided_sites(gm: fx.GraphModule, report: Report) -> None:
    """A pass that failed part-way has rows only for the sites it decided before failing; every
    attention site still gets one (docs/design.md section 2), saying the failure left it dense."""
    try:
        sites = find_attention_sites(gm)
    except Exception:  # finding them is what failed: the report's failure line says so
        logger.debug("could not list the sites of a graph whose pass failed", exc_info=True)
        return
    seen = {row.node for row in report.sites}
    for site in sites:
        if site.output.name not in seen:
            report.sites.append(SiteReport(
                node=site.output.name, module_path=module_path(site.output), form=site.form,
                q_shape=tuple(site.q_shape or ()), k_shape=tuple(site.k_shape or ()), q_layout=None,
                k_layout=None, evidence="", decision=SKIPPED,
                reason="pass failed before this site was decided, graph left unmodified",
                stride=None, flops_before=None, flops_after=None, skip=SkipKind.PASS_FAILED))


def _training(config: GridAttnConfig) -> bool:
    """Whether shuffle distributing applies to this graph: only if asked for and the module trains."""
    if config.distributing != "shuffle":
        return False
    training, how = compiled_module_training()
    if training is None:
        _warn_once(f"gridattn: distributing='shuffle' needs the compiled module's training flag, which is "
                   f"unknown here ({how}); using straightforward distributing")
        return False
    logger.debug("gridattn: training mode from %s: %s", how, training)
    return training


def backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """``torch.compile(model, backend="gridattn", options={...})``.

    Our options configure the pass (see :class:`GridAttnConfig`); inductor options and ``mode``
    are passed on to inductor unchanged.
    """
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    config, inductor_options = GridAttnConfig.from_options(options)
    patches = dict(list_mode_options(mode)) if mode else {}
    patches.update(inductor_options)
    return compile_with_pass(gm, example_inputs, config,
                             lambda graph, inputs: compile_fx(graph, inputs, config_patches=patches or None))


def compile_with_pass(gm: fx.GraphModule, example_inputs, config: GridAttnConfig, compile_graph):
    """The pass, then ``compile_graph(graph, inputs)`` (inductor for the backend) on its result; the
    original graph when the pass or the compiler fails on the rewritten one. A graph whose rewrite
    relies on position values or on layouts handed over from an earlier graph, or whose outputs
    hand layouts on, comes back as a :class:`CheckedGraph` (frontends/checked_graph.py)."""
    training = _training(config)

    def compile_for(inputs):
        new_gm, report = apply_pass(gm, inputs, config, training, checked=True)
        if new_gm is gm:
            return compile_graph(gm, inputs), RuntimeChecks()
        checks = RuntimeChecks(**new_gm.meta.get(RUNTIME_CHECKS, {}))
        try:
            return compile_graph(new_gm, inputs), checks
        except Exception as err:
            if config.strict or is_dynamo_restart(err):
                raise
            _fall_back(report, f"inductor failed on the rewritten graph ({type(err).__name__}: {err})")
            return compile_graph(gm, inputs), RuntimeChecks()

    compiled, checks = compile_for(example_inputs)
    if not checks.needed():
        return compiled
    return CheckedGraph(compiled, checks, compile_for, lambda args: compile_graph(gm, args))

"""``python -m gridattn_fx coverage``: which of diffusers' image and video transformer / UNet classes the
pass rewrites with no declaration, and why the others stay dense.

Each class is built from a tiny config (zoo/_diffusers_classes.py, random weights), compiled with
``torch.compile`` through the gridattn pass (the backend's own path, position checks included, with
the graphs run eagerly instead of by inductor so that a class takes seconds), called once, and
classified from the reports of every graph it produced:

* ``automatic``: at least one attention site rewritten (the sources of their layouts are listed);
* ``dense by design``: a class whose attention is no softmax over an image (Sana, Stable Audio);
* ``dense``: no site rewritten.

Attention that runs outside every captured graph (a frame Dynamo gave up on after a graph break
runs eagerly, and no backend ever sees its attention) is counted on a second, profiled call: the
SDPA calls that no graph of the pass contains, with the graph breaks Dynamo met (their first line,
and its hint: MochiTransformer3DModel's ``nonzero`` names
``torch._dynamo.config.capture_dynamic_output_shape_ops``). Where a hint names such a Dynamo capture
setting, the class is compiled once more with it: a class rewritten then counts as automatic, and
its row names the setting (a Dynamo option, not a layout declaration).

For every class the last column gives the first site left dense that is neither cross-attention nor
temporal attention (one whose image layout was proven or lost on the way, if any), with its reason (which names the declaration that would rewrite it where the
pass knows one).
* ``failed``: the class did not build or run here (the error is shown).

The table is printed as Markdown, so that the README can quote it as it is.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..frontends.graph_breaks import all_graph_breaks, capture_settings


@dataclass
class CoverageRow:
    name: str
    status: str
    sites: int = 0
    rewritten: int = 0
    graphs: int = 0
    sources: list[str] = field(default_factory=list)
    why: str = ""
    eager_attention: int = 0     # SDPA calls that ran outside every captured graph
    breaks: list[str] = field(default_factory=list)
    setting: str = ""            # the Dynamo capture setting the row was produced with, if any


def add_coverage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("classes", nargs="*", help="class names (default: every class of the table)")
    parser.add_argument("--stride", type=int, default=2, help="grid stride (default 2)")


def cover(name: str, build: Callable, stride: int = 2, by_design: str = "") -> CoverageRow:
    """Build, compile and run one class; its row of the table. Attention left outside the graphs
    behind a graph break whose hint names a Dynamo capture setting: once more with that setting."""
    row = _cover(name, build, stride, by_design)
    settings = capture_settings(row.breaks)
    if not row.eager_attention or not settings or by_design:
        return row
    with torch._dynamo.config.patch(**dict.fromkeys(settings, True)):
        captured = _cover(name, build, stride, by_design)
    if captured.status != "automatic":
        return row
    captured.setting = ", ".join(f"torch._dynamo.config.{s} = True" for s in settings)
    captured.why = (f"with `{captured.setting}`: without it {row.eager_attention} attention call(s) run "
                    f"eagerly after a graph break ({'; '.join(row.breaks)})" + (f". {captured.why}" if captured.why
                                                                                else ""))
    return captured


def _cover(name: str, build: Callable, stride: int, by_design: str) -> CoverageRow:
    import gridattn_fx
    from gridattn_fx import GridAttnConfig
    from gridattn_fx.frontends.backend import compile_with_pass

    config = GridAttnConfig(stride=stride, min_image_tokens=0)
    torch.manual_seed(0)
    try:
        model, inputs = build()
        model.eval()
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        gridattn_fx.report_history(clear=True)
        compiled = torch.compile(model, backend=lambda gm, ex: compile_with_pass(gm, ex, config, _marked))

        def call():
            return compiled(**inputs) if isinstance(inputs, dict) else compiled(*inputs)

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
            reports = gridattn_fx.report_history(clear=True)
            eager = _attention_outside_graphs(call)
        breaks = all_graph_breaks()
    except Exception as err:  # a class that does not build here is a row, not the end of the table
        return CoverageRow(name, "failed", why=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
    finally:
        torch._dynamo.reset()
    sites = [s for r in reports for s in r.sites]
    rewritten = [s for s in sites if s.decision == "rewritten"]
    row = CoverageRow(name, "automatic" if rewritten else ("dense by design" if by_design else "dense"),
                      len(sites), len(rewritten), len(reports),
                      sorted({s.layout_source for s in rewritten if s.layout_source}), eager_attention=eager,
                      breaks=breaks)
    dense = [s for s in sites if s.decision != "rewritten" and "cross-attention" not in s.reason
             and "temporal attention" not in s.reason]
    # image sites first: a layout proven, or lost on the way, rather than text never an image
    dense.sort(key=lambda s: s.q_layout is None and s.lost_at is None)
    if by_design:
        row.why = by_design
    elif not sites and not eager:
        row.why = "no attention site in any captured graph"
    elif dense:  # also for a class with some sites rewritten: what the others miss
        row.why = f"`{dense[0].module_path}`: {dense[0].reason}"
    elif not rewritten and sites:
        row.why = f"`{sites[0].module_path}`: {sites[0].reason}"
    if eager:
        row.why = (f"{eager} attention call(s) ran outside every captured graph, after graph breaks: "
                   + "; ".join(breaks) + (f". {row.why}" if row.why else ""))
    return row


_MARK = "gridattn coverage graph"


def _marked(graph, inputs):
    """The graph run eagerly, inside a profiler range that says a graph of the pass ran it."""
    forward = graph.forward

    def run(*args):
        with torch.profiler.record_function(_MARK):
            return forward(*args)
    return run


def _attention_outside_graphs(call) -> int:
    """SDPA calls of one ``call()`` that no graph of the pass contains (they ran eagerly)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    events = prof.events()
    graphs = [e.time_range for e in events if e.name == _MARK]
    return sum(1 for e in events if e.name == "aten::scaled_dot_product_attention" and not any(
        r.start <= e.time_range.start and e.time_range.end <= r.end for r in graphs))


def coverage_table(rows: list[CoverageRow]) -> list[str]:
    lines = ["| class | status | rewritten / sites | graphs | attention outside graphs | layout from | "
             "first image site left dense, and why |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        why = r.why.replace("|", "\\|")
        lines.append(f"| {r.name} | {r.status} | {r.rewritten} / {r.sites} | {r.graphs} | {r.eager_attention} | "
                     f"{', '.join(r.sources)} | {why} |")
    automatic = sum(r.status == "automatic" for r in rows)
    design = sum(r.status == "dense by design" for r in rows)
    lines.append("")
    setting = sum(bool(r.setting) for r in rows)
    lines.append(f"coverage: {automatic} of {len(rows)} classes rewritten with no declaration "
                 + (f"({setting} of them with a Dynamo capture setting; " if setting else "(")
                 + f"{design} dense by design, {sum(r.status == 'dense' for r in rows)} dense, "
                 f"{sum(r.status == 'failed' for r in rows)} failed)")
    return lines


def run_coverage(args, echo=print) -> int:
    from gridattn_fx.zoo._diffusers_classes import BY_DESIGN, CLASSES

    unknown = [c for c in args.classes if c not in CLASSES]
    if unknown:
        raise ValueError(f"unknown class(es) {', '.join(unknown)}; known: {', '.join(CLASSES)}")
    rows = []
    for name in args.classes or list(CLASSES):
        rows.append(cover(name, CLASSES[name], args.stride, BY_DESIGN.get(name, "")))
    for line in coverage_table(rows):
        echo(line)
    return 0

"""``python -m gridattn_fx coverage``: which of diffusers' image and video transformer / UNet classes the
pass rewrites with no declaration, and why the others stay dense.

Each class is built from a tiny config (zoo/_diffusers_classes.py, random weights), compiled with
``torch.compile`` through the gridattn pass (the backend's own path, position checks included, with
the graphs run eagerly instead of by inductor so that a class takes seconds), called once, and
classified from the reports of every graph it produced:

* ``automatic``: at least one attention site rewritten (the sources of their layouts are listed);
* ``dense by design``: a class whose attention is no softmax over an image (Sana, Stable Audio);
* ``dense``: no site rewritten.

For every class the last column gives the first site left dense that is neither cross-attention nor
temporal attention, with its reason (which names the declaration that would rewrite it where the
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


@dataclass
class CoverageRow:
    name: str
    status: str
    sites: int = 0
    rewritten: int = 0
    graphs: int = 0
    sources: list[str] = field(default_factory=list)
    why: str = ""


def add_coverage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("classes", nargs="*", help="class names (default: every class of the table)")
    parser.add_argument("--stride", type=int, default=2, help="grid stride (default 2)")


def cover(name: str, build: Callable, stride: int = 2, by_design: str = "") -> CoverageRow:
    """Build, compile and run one class; its row of the table."""
    import gridattn_fx
    from gridattn_fx import GridAttnConfig
    from gridattn_fx.frontends.backend import compile_with_pass

    config = GridAttnConfig(stride=stride, min_image_tokens=0)
    torch.manual_seed(0)
    try:
        model, inputs = build()
        model.eval()
        torch._dynamo.reset()
        gridattn_fx.report_history(clear=True)
        compiled = torch.compile(model, backend=lambda gm, ex: compile_with_pass(gm, ex, config, lambda g, i: g.forward))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled(**inputs) if isinstance(inputs, dict) else compiled(*inputs)
    except Exception as err:  # a class that does not build here is a row, not the end of the table
        return CoverageRow(name, "failed", why=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
    finally:
        torch._dynamo.reset()
    reports = gridattn_fx.report_history(clear=True)
    sites = [s for r in reports for s in r.sites]
    rewritten = [s for s in sites if s.decision == "rewritten"]
    row = CoverageRow(name, "automatic" if rewritten else ("dense by design" if by_design else "dense"),
                      len(sites), len(rewritten), len(reports),
                      sorted({s.layout_source for s in rewritten if s.layout_source}))
    dense = [s for s in sites if s.decision != "rewritten" and "cross-attention" not in s.reason
             and "temporal attention" not in s.reason]
    if by_design:
        row.why = by_design
    elif not sites:
        row.why = "no attention site in any captured graph"
    elif dense:  # also for a class with some sites rewritten: what the others miss
        row.why = f"`{dense[0].module_path}`: {dense[0].reason}"
    elif not rewritten:
        row.why = f"`{sites[0].module_path}`: {sites[0].reason}"
    return row


def coverage_table(rows: list[CoverageRow]) -> list[str]:
    lines = ["| class | status | rewritten / sites | graphs | layout from | first image site left dense, and why |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        why = r.why.replace("|", "\\|")
        lines.append(f"| {r.name} | {r.status} | {r.rewritten} / {r.sites} | {r.graphs} | "
                     f"{', '.join(r.sources)} | {why} |")
    automatic = sum(r.status == "automatic" for r in rows)
    design = sum(r.status == "dense by design" for r in rows)
    lines.append("")
    lines.append(f"coverage: {automatic} of {len(rows)} classes rewritten with no declaration "
                 f"({design} dense by design, {sum(r.status == 'dense' for r in rows)} dense, "
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

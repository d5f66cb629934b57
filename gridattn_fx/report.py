"""The rewrite report: one row per attention site, every decision with its reason."""

from __future__ import annotations

import itertools
import logging
import re
from dataclasses import dataclass, field

from .frontends.torch_logs import report_log
from .grid import TokenLayout, format_stride
from .reasons import SkipKind

logger = logging.getLogger("gridattn_fx")

REWRITTEN = "rewritten"
SKIPPED = "skipped"


@dataclass
class SiteReport:
    node: str
    module_path: str
    form: str
    q_shape: tuple
    k_shape: tuple
    q_layout: TokenLayout | None
    k_layout: TokenLayout | None
    evidence: str
    decision: str
    reason: str
    stride: tuple[int, ...] | None
    flops_before: int | None
    flops_after: int | None
    regrouping: str = ""   # rewritten sites: where the cluster / recover went (passes/motion.py)
    # Where the query's layout came from: "proven in this graph", "remembered by prepare",
    # "declared" or "handed over across a split" (layout/analysis.py: layout_source).
    layout_source: str = ""
    grouping: str = "grid"   # rewritten sites: "grid", "window", or per-head sets "grid|window"
    shared_pool: int = 0     # rewritten sites: p of the shared tokens pooled over p x p windows (0: none)
    skip: SkipKind | None = None   # skipped sites: why, as data (``reason`` says it in words)
    lost_at: str | None = None     # skipped for want of a layout: the op where the layout was lost


_graph_numbers = itertools.count(1)


@dataclass
class Report:
    sites: list[SiteReport] = field(default_factory=list)
    failure: str | None = None
    implementation: str = "grouped"
    preset: str | None = None
    distributing: str = "straightforward"   # what this graph's rewritten sites use
    # Sites chosen for a rewrite whose replacement failed its check and stayed dense ("path: why").
    site_failures: list[str] = field(default_factory=list)
    # Per-site option keys that matched no attention site of this graph: {option: [key, ...]}
    # ("sites", or its aliases "site_strides" / "site_groupings").
    unmatched_site_keys: dict[str, list[str]] = field(default_factory=dict)
    # Model inputs whose values gave rewritten sites their layout (layout/positions.py): the
    # compiled graph checks them at every call.
    position_inputs: list[str] = field(default_factory=list)
    # Dynamo's graph breaks since the previous graph (frontends/graph_breaks.py): attention in the
    # code they left uncaptured runs eagerly, outside every report.
    graph_breaks: list[str] = field(default_factory=list)
    # Numbers the graphs of this process, so warnings about two graphs never read the same (and
    # Python's once-per-message filter cannot hide the second one).
    graph: int = field(default_factory=lambda: next(_graph_numbers), compare=False)

    @property
    def unmatched_site_strides(self) -> list[str]:
        return self.unmatched_site_keys.get("site_strides", [])

    @property
    def unmatched_site_groupings(self) -> list[str]:
        return self.unmatched_site_keys.get("site_groupings", [])

    @property
    def rewritten(self) -> list[SiteReport]:
        return [s for s in self.sites if s.decision == REWRITTEN]

    @property
    def skipped(self) -> list[SiteReport]:
        return [s for s in self.sites if s.decision == SKIPPED]

    def site(self, pattern: str) -> SiteReport:
        """The one site whose module path matches ``pattern`` (re.search)."""
        hits = [s for s in self.sites if re.search(pattern, s.module_path)]
        if len(hits) != 1:
            raise KeyError(f"{len(hits)} sites match {pattern!r}: {[s.module_path for s in hits]}")
        return hits[0]

    def flops(self) -> tuple[int, int]:
        """Total attention FLOPs before and after (sites with unknown cost count as unchanged)."""
        before = sum(s.flops_before or 0 for s in self.sites)
        after = sum((s.flops_after if s.flops_after is not None else s.flops_before) or 0 for s in self.sites)
        return before, after

    def __str__(self) -> str:
        head = ("site", "form", "q layout", "k layout", "decision", "stride", "GFLOP before", "GFLOP after", "reason")
        rows = [head]
        for s in self.sites:
            rows.append((
                s.module_path or s.node,
                s.form,
                str(s.q_layout) if s.q_layout else "-",
                str(s.k_layout) if s.k_layout else "-",
                s.decision,
                _stride_cell(s),
                _gflop(s.flops_before),
                _gflop(s.flops_after),
                s.reason + (f"; {s.regrouping}" if s.regrouping else "")
                + (f"; layout {s.layout_source}" if s.layout_source else ""),
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
        lines.insert(1, "-" * min(160, len(lines[0])))
        before, after = self.flops()
        saved = f" ({100 * (1 - after / before):.1f}% less)" if before else ""
        unknown = sum(s.flops_before is None for s in self.sites)
        if unknown:  # data-dependent sizes: the totals leave those sites out, and say so
            saved += f", {unknown} site(s) of unknown cost not counted"
        lines.append(
            f"{len(self.sites)} attention sites: {len(self.rewritten)} rewritten, {len(self.skipped)} skipped; "
            f"attention {_gflop(before)} -> {_gflop(after)} GFLOP{saved}; implementation={self.implementation}"
            + (f"; preset={self.preset}" if self.preset else "")
            + ("; distributing=shuffle (training)" if self.distributing == "shuffle" else "")
        )
        lines.extend(f"graph break before this graph: {b}" for b in self.graph_breaks)
        for failure in self.site_failures:
            lines.append(f"SITE LEFT DENSE, its replacement failed its check: {failure}")
        for option, keys in self.unmatched_site_keys.items():
            lines.extend(f"{option} key {key!r} matches no attention site in this graph" for key in keys)
        if self.failure:
            lines.append(f"PASS FAILED, original graph compiled instead: {self.failure}")
        return "\n".join(lines)


def _stride_cell(s: SiteReport) -> str:
    """``2x2`` for a grid site (as ever), ``window 2x2`` for a window one, ``-`` when not rewritten."""
    if not s.stride:
        return "-"
    return choice_cell(s.stride, s.grouping, s.shared_pool)


def choice_cell(stride, grouping: str = "grid", shared_pool: int = 0) -> str:
    """How the report names a rewritten site's choice: ``2x2`` on the grid, ``window 2x2``,
    ``grid|window 2x2 +pool4``."""
    cell = format_stride(stride) if grouping == "grid" else f"{grouping} {format_stride(stride)}"
    return cell + (f" +pool{shared_pool}" if shared_pool else "")


def _gflop(flops: int | None) -> str:
    return "?" if flops is None else f"{flops / 1e9:.3f}"


# One model can reach the backend as several graphs (graph breaks, DDP bucket splits): keep the
# recent ones, not just the last.
_HISTORY_LIMIT = 256
_history: list[Report] = []


def record(report: Report) -> None:
    _history.append(report)
    del _history[:-_HISTORY_LIMIT]
    # A child of the gridattn_fx logger (same output as before), and the torch artifact
    # "gridattn_report": TORCH_LOGS="gridattn_report" shows the reports alone (gridattn_fx/frontends/torch_logs.py).
    report_log.info("gridattn rewrite report:\n%s", report)


def last_report() -> Report | None:
    """The report of the most recent graph the backend (or :func:`rewrite`) processed."""
    return _history[-1] if _history else None


def report_history(clear: bool = False) -> list[Report]:
    """Reports of the recent graphs (oldest first, at most 256); ``clear=True`` empties the history
    after returning it, so the next call sees only graphs compiled from then on."""
    out = list(_history)
    if clear:
        _history.clear()
    return out

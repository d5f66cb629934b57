"""Reading and removing the ``gridattn::layout_hint`` markers that prepare() puts into graphs.

A marker says "this tensor holds that layout" (gridattn_fx/crossgraph/markers.py). The pass takes it off
the graph before anything else looks at the graph (patterns and the regrouping motion then see the
same graph as without prepare()), and hands the layout to :class:`LayoutAnalysis` as a fact about
the marked tensor itself: the marker is an alias, so the fact holds for every reader of that tensor.
"""

from __future__ import annotations

import torch.fx as fx

from ..layout.facts import _positions
from .markers import fact_of_marker, is_layout_hint, is_probe


def strip_layout_hints(gm: fx.GraphModule) -> tuple[dict[fx.Node, object], dict[fx.Node, str]]:
    """Remove every marker (and capture probe) from ``gm``; returns the hinted facts by marked
    tensor, and the tensors whose markers disagree with each other (no fact, with the reason)."""
    hints: dict[fx.Node, object] = {}
    conflicts: dict[fx.Node, str] = {}
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not (is_layout_hint(node.target) or is_probe(node.target)):
            continue
        source = node.args[0]
        if is_layout_hint(node.target) and source not in conflicts:
            fact = fact_of_marker(node)
            if source in hints and _positions(hints[source]) != _positions(fact):
                del hints[source]
                conflicts[source] = f"two layouts stated for `{source.name}` ({fact.origin} and another)"
            else:
                hints.setdefault(source, fact)
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
    return hints, conflicts

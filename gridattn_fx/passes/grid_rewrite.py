"""Replace chosen attention sites with grid cluster -> attention -> recover.

The replacement is :meth:`GridPlan.grouped` (or ``.masked``) traced with ``torch.fx`` for the
site's constant plan and inlined in place of the site, so the graph holds plain torch ops
(narrow / unflatten / movedim / flatten / SDPA / cat) that inductor can fuse and cache - the same
code the eager tests check against the oracle.
"""

from __future__ import annotations

import torch.fx as fx

from ..grid import GridPlan
from ..patterns import AttentionSite


def _trace_plan(plan: GridPlan, implementation: str, with_mask: bool) -> fx.Graph:
    method = getattr(plan, implementation)
    if with_mask:
        def replacement(q, k, v, attn_mask):
            return method(q, k, v, attn_mask)
    else:
        def replacement(q, k, v):
            return method(q, k, v)
    return fx.Tracer().trace(replacement)


def rewrite_site(gm: fx.GraphModule, site: AttentionSite, plan: GridPlan, implementation: str) -> None:
    """Inline the grid form of ``site`` right before its output node and reroute its users."""
    graph = gm.graph
    inputs = [site.query, site.key, site.value]
    if site.attn_mask is not None:
        inputs.append(site.attn_mask)
    sub = _trace_plan(plan, implementation, site.attn_mask is not None)
    placeholders = [n for n in sub.nodes if n.op == "placeholder"]
    val_map = dict(zip(placeholders, inputs))
    with graph.inserting_before(site.output):
        result = graph.graph_copy(sub, val_map)
    stack = site.output.meta.get("nn_module_stack")
    for new in val_map.values():
        if new not in inputs and isinstance(new, fx.Node):
            if stack is not None:
                new.meta["nn_module_stack"] = dict(stack)
            new.meta["gridattn"] = site.form
    site.output.replace_all_uses_with(result)
    for node in reversed(site.nodes):
        if not node.users:
            graph.erase_node(node)

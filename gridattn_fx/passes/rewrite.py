"""Replace chosen attention sites with grid cluster -> attention -> recover.

The replacement is the site's own factory (``site.build``) applied to its :class:`GridPlan`,
run for that constant plan on ``torch.fx.Proxy`` objects of the site's inputs, so that an fx tracer
records its ops straight into the graph in front of the site (:func:`inline`); the new nodes carry
the site's metadata as inductor's pattern matcher gives its replacements (:func:`transfer_meta`).
The graph thus holds plain torch ops (narrow / unflatten / movedim / flatten / SDPA / cat) that inductor can
fuse and cache - the same code the eager tests check against the oracle.

Symbolic image sizes (dynamic shapes): the plan's layouts then hold SymInts. The replacement is
run with each of them bound to a :class:`TracedSize`, the graph value that computes it (a
``sym_size`` of a tensor that has it as a dimension, or a SymInt the graph already computes) paired
with the SymInt itself: arithmetic on it is traced into the graph, while the shape decisions
``gridattn_fx/grid/`` takes on sizes (pad or not) are answered by the SymInt through the ShapeEnv, which
installs a guard - during the backend call, so Dynamo recompiles when a later size decides
differently. The graph thus holds exactly the padded or the unpadded form, valid for every size its
guards accept.
"""

from __future__ import annotations

import logging
from dataclasses import replace as dc_replace

import torch
import torch.fx as fx

from ..grid import GridPlan
from ..ir.graphs import erase_dead, propagate_values
from ..ir.insertion import inline
from ..patterns import AttentionSite

logger = logging.getLogger("gridattn_fx")


def plan_sizes(plan: GridPlan) -> tuple:
    """The distinct symbolic sizes of a plan's layouts (one per expression), in a fixed order."""
    found = {}
    for layout in (plan.q_layout, plan.k_layout):
        for size in layout.sizes:
            if isinstance(size, torch.SymInt) and not size.node.is_constant():
                found.setdefault(size.node.expr, size)
    return tuple(found.values())


def bind_sizes(plan: GridPlan, traced: dict) -> GridPlan:
    """``plan`` with every symbolic layout size replaced by its :class:`TracedSize`."""
    def swap(size):
        return traced.get(size.node.expr, size) if isinstance(size, torch.SymInt) else size

    return dc_replace(plan, q_layout=plan.q_layout.map_sizes(swap), k_layout=plan.k_layout.map_sizes(swap))


def replacement(site: AttentionSite, plan: GridPlan, implementation: str):
    """The function :func:`inline` traces for ``site``: its factory applied to ``plan``, or, when the
    plan has symbolic sizes, to the plan bound to the traced sizes passed after the site's inputs."""
    sizes = plan_sizes(plan)
    if not sizes:
        return site.build(plan, implementation)
    arity = len(site.inputs)

    def fn(*args):
        traced = {sym.node.expr: t for sym, t in zip(sizes, args[arity:])}
        return site.build(bind_sizes(plan, traced), implementation)(*args[:arity])
    return fn


def rewrite_site(gm: fx.GraphModule, site: AttentionSite, plan: GridPlan, implementation: str) -> fx.Node:
    """Inline the grid form of ``site`` right before its output node and reroute its users; returns
    the node that now provides the site's value."""
    sizes = plan_sizes(plan)
    result, new_nodes = inline(gm.graph, replacement(site, plan, implementation), site.inputs, site.output,
                               site.output, site.form, sizes)
    if not sizes:  # symbolic fake values cost seconds of sympy per site, for the caches only
        propagate_values(new_nodes, site.output)
    site.output.replace_all_uses_with(result)
    erase_dead(gm.graph, site.nodes)
    return result



"""Replace chosen attention sites with grid cluster -> attention -> recover.

The replacement is the site's own factory (``site.build``) applied to its :class:`GridPlan`,
traced with ``torch.fx`` for that constant plan and inlined in place of the site. The graph thus
holds plain torch ops (narrow / unflatten / movedim / flatten / SDPA / cat) that inductor can
fuse and cache - the same code the eager tests check against the oracle.
"""

from __future__ import annotations

import logging

import torch.fx as fx

from ..grid import GridPlan
from ..patterns import AttentionSite

logger = logging.getLogger("gridattn_fx")


def trace_function(fn, arity: int) -> fx.Graph:
    """``fn`` (of ``arity`` tensors, constants baked in) as an fx graph of plain torch ops."""
    # fx.Tracer makes one placeholder per named parameter, so the wrapper needs a fixed arity.
    names = ", ".join(f"arg{i}" for i in range(arity))
    wrapper = eval(f"lambda {names}: fn({names})", {"fn": fn})  # noqa: S307 - names are ours
    return fx.Tracer().trace(wrapper)


def inline(graph: fx.Graph, fn, inputs: list, before: fx.Node, like: fx.Node, tag: str) -> tuple[fx.Node, list[fx.Node]]:
    """Insert ``fn(*inputs)`` before ``before``; the new nodes take ``like``'s module path and the
    ``gridattn`` tag. Returns the result node and the new nodes in order."""
    sub = trace_function(fn, len(inputs))
    placeholders = [n for n in sub.nodes if n.op == "placeholder"]
    val_map = dict(zip(placeholders, inputs))
    with graph.inserting_before(before):
        result = graph.graph_copy(sub, val_map)
    stack = like.meta.get("nn_module_stack")
    new_nodes = [new for old, new in val_map.items() if old.op != "placeholder" and isinstance(new, fx.Node)]
    for new in new_nodes:
        if stack is not None:
            new.meta["nn_module_stack"] = dict(stack)
        new.meta["gridattn"] = tag
    return result, new_nodes


def rewrite_site(gm: fx.GraphModule, site: AttentionSite, plan: GridPlan, implementation: str) -> fx.Node:
    """Inline the grid form of ``site`` right before its output node and reroute its users; returns
    the node that now provides the site's value."""
    result, new_nodes = inline(gm.graph, site.build(plan, implementation), site.inputs, site.output,
                               site.output, site.form)
    propagate_values(new_nodes, site.output)
    site.output.replace_all_uses_with(result)
    _erase_dead(gm.graph, site.nodes)
    return result


def call_on_values(node: fx.Node, value_of):
    """What ``node`` computes from the values ``value_of`` gives its input nodes (fake tensors)."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), value_of)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def propagate_values(nodes, like: fx.Node) -> None:
    """(Re)compute the fake values of ``nodes`` (in graph order) under the key the graph uses, as if
    Dynamo had traced them: inductor's caches (AOTAutogradCache) only accept method calls on nodes
    known to be tensors, and nodes recomputed in group order have new strides."""
    key = "example_value" if "example_value" in like.meta else "val"
    mode = getattr(like.meta.get(key), "fake_mode", None)
    if mode is None:
        return
    try:
        with mode:
            for node in nodes:
                node.meta[key] = call_on_values(node, lambda n: n.meta[key])
    except Exception:  # only caching is at stake: compile uncached rather than fail the rewrite
        logger.debug("could not propagate fake values through the inserted nodes", exc_info=True)


def _erase_dead(graph: fx.Graph, nodes) -> None:
    """Erase the matched nodes nothing uses any more (users before producers, whatever the order)."""
    alive = set(nodes)
    changed = True
    while changed:
        changed = False
        for node in list(alive):
            if not node.users:
                graph.erase_node(node)
                alive.discard(node)
                changed = True

"""Graph helpers every stage shares: copying a graph module, the fake values its nodes carry
(made where a capture left none, recomputed for inserted nodes), the metadata a replacement node
inherits, and erasing what a rewrite left unused."""

from __future__ import annotations

import copy
import logging

import torch.fx as fx

from .values import value_of as _val

logger = logging.getLogger("gridattn_fx")


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copied graph (sharing parameters), so the original stays intact."""
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen
    out = graph.graph_copy(gm.graph, {}, return_output_node=True)
    value, old_output = out
    graph.output(value, type_expr=old_output.type)
    graph.output_node().meta.update(old_output.meta)
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta.update(getattr(gm, "meta", {}))
    return new


def ensure_values(gm: fx.GraphModule, example_inputs) -> None:
    """Give every node a (fake) value: Dynamo graphs have them, symbolic_trace graphs do not."""
    if all(n.op == "output" or _val(n) is not None for n in gm.graph.nodes):
        return
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = detect_fake_mode(example_inputs) or FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(*example_inputs)


def placeholder_inputs(gm: fx.GraphModule, example_inputs) -> list[tuple[fx.Node, object]]:
    """Each placeholder of ``gm`` with its example input; [] when they do not pair up one to one."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    if example_inputs is None or len(placeholders) != len(example_inputs):
        return []
    return list(zip(placeholders, example_inputs))


def transfer_meta(new: fx.Node, old: fx.Node) -> None:
    """Give a node that replaces (part of) ``old`` the metadata inductor's pattern matcher carries
    over to its replacements: the fields torch.fx copies along with a node
    (``torch.fx.proxy._COPY_META_FIELDS``: nn_module_stack, source_fn_stack, torch_fn, from_node, ...)
    and the stack trace, so that inductor's debug output and provenance name the model's source
    line. Fake values are computed, not copied (:func:`propagate_values`)."""
    from torch.fx.proxy import _COPY_META_FIELDS

    for field in _COPY_META_FIELDS:
        if field in old.meta:
            new.meta[field] = copy.copy(old.meta[field])
    if old.meta.get("stack_trace"):
        new.meta["stack_trace"] = old.meta["stack_trace"]


def call_on_values(node: fx.Node, value_of):
    """What ``node`` computes from the values ``value_of`` gives its input nodes (fake tensors)."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), value_of)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def fake_evaluation(mode):
    """Evaluate ops on the graph's fake tensors as Dynamo does: with the Python dispatcher, so that
    composite ops (F.pad's constant_pad_nd) run their Python decompositions on symbolic sizes."""
    from contextlib import ExitStack

    from torch._dispatch.python import enable_python_dispatcher

    stack = ExitStack()
    stack.enter_context(mode)
    stack.enter_context(enable_python_dispatcher())
    return stack


def propagate_values(nodes, like: fx.Node) -> None:
    """(Re)compute the fake values of ``nodes`` (in graph order) under the key the graph uses, as if
    Dynamo had traced them: inductor's caches (AOTAutogradCache) only accept method calls on nodes
    known to be tensors, and nodes recomputed in group order have new strides."""
    key = "example_value" if "example_value" in like.meta else "val"
    mode = getattr(like.meta.get(key), "fake_mode", None)
    if mode is None:
        return
    try:
        with fake_evaluation(mode):
            for node in nodes:
                node.meta[key] = call_on_values(node, lambda n: n.meta[key])
    except Exception:  # only caching is at stake: compile uncached rather than fail the rewrite
        logger.debug("could not propagate fake values through the inserted nodes", exc_info=True)


def erase_dead(graph: fx.Graph, nodes) -> None:
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


def subgraph_of(gm: fx.GraphModule, node) -> fx.GraphModule | None:
    """The graph module a ``get_attr`` argument of a higher-order op names, or None."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        sub = getattr(gm, node.target, None)
        return sub if isinstance(sub, fx.GraphModule) else None
    return None

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

import copy
import logging
import operator
from dataclasses import replace as dc_replace

import torch
import torch.fx as fx

from ..grid import GridPlan
from ..ir.values import value_of as _val
from ..patterns import AttentionSite

logger = logging.getLogger("gridattn_fx")


class TracedSize:
    """A symbolic size while a replacement is traced: ``proxy`` is the graph value that computes it,
    ``sym`` the SymInt it stands for. Arithmetic is traced (and mirrored on ``sym``); comparisons
    and truth tests are decided by ``sym`` through the ShapeEnv, which guards on the answer."""

    __slots__ = ("proxy", "sym")

    def __init__(self, proxy, sym):
        self.proxy, self.sym = proxy, sym

    def _apply(self, fn, other, reflected=False):
        if isinstance(other, TracedSize):
            p, s = other.proxy, other.sym
        elif isinstance(other, (int, torch.SymInt)) and not isinstance(other, bool):
            p = s = other
        else:
            return NotImplemented
        if reflected:
            return TracedSize(fn(p, self.proxy), fn(s, self.sym))
        return TracedSize(fn(self.proxy, p), fn(self.sym, s))

    def _compare(self, fn, other):
        s = other.sym if isinstance(other, TracedSize) else other
        return bool(fn(self.sym, s))  # a guard on a SymInt; plain bool for an int

    def __add__(self, o): return self._apply(operator.add, o)
    def __radd__(self, o): return self._apply(operator.add, o, True)
    def __sub__(self, o): return self._apply(operator.sub, o)
    def __rsub__(self, o): return self._apply(operator.sub, o, True)
    def __mul__(self, o): return self._apply(operator.mul, o)
    def __rmul__(self, o): return self._apply(operator.mul, o, True)
    def __floordiv__(self, o): return self._apply(operator.floordiv, o)
    def __rfloordiv__(self, o): return self._apply(operator.floordiv, o, True)
    def __mod__(self, o): return self._apply(operator.mod, o)
    def __rmod__(self, o): return self._apply(operator.mod, o, True)
    def __neg__(self): return TracedSize(-self.proxy, -self.sym)
    def __eq__(self, o): return self._compare(operator.eq, o)
    def __ne__(self, o): return self._compare(operator.ne, o)
    def __lt__(self, o): return self._compare(operator.lt, o)
    def __le__(self, o): return self._compare(operator.le, o)
    def __gt__(self, o): return self._compare(operator.gt, o)
    def __ge__(self, o): return self._compare(operator.ge, o)
    def __bool__(self): return bool(self.sym != 0)
    __hash__ = object.__hash__

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # A size inside a torch call's size list (torch.ones((n, 1))): call it on the graph value.
        from torch.utils._pytree import tree_map

        def unwrap(a):
            return a.proxy if isinstance(a, TracedSize) else a
        args, kwargs = tree_map(unwrap, (args, kwargs or {}))
        return func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"TracedSize({self.sym})"


class _GraphAppender(fx.Tracer):
    """An fx.Tracer that appends to an existing graph (at its insertion point) instead of building
    its own: the replacement runs on :class:`torch.fx.Proxy` objects of the graph's own nodes, and
    every node it records lands in place. A :class:`TracedSize` argument becomes the node computing it;
    a tensor constant becomes an attribute of the graph's module (fx.Tracer's rule, with that root)."""

    def __init__(self, graph: fx.Graph):
        super().__init__()
        self.graph = graph
        self.root = graph.owning_module if graph.owning_module is not None else torch.nn.Module()
        self.tensor_attrs = {}
        self.created: list[fx.Node] = []

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        self.created.append(node)
        return node

    def create_arg(self, a):
        if isinstance(a, TracedSize):
            return a.proxy.node if isinstance(a.proxy, fx.Proxy) else a.proxy
        return super().create_arg(a)


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


def inline(graph: fx.Graph, fn, inputs: list, before: fx.Node, like: fx.Node, tag: str,
           sizes: tuple = ()) -> tuple[fx.Node, list[fx.Node]]:
    """Insert ``fn(*inputs)`` before ``before``, traced straight into ``graph`` through fx.Proxy
    objects of ``inputs``; the new nodes take ``like``'s metadata (:func:`transfer_meta`) and the
    ``gridattn`` tag. Returns the result node and the new nodes in order.

    ``sizes``: SymInts ``fn`` takes after the tensors, each as a :class:`TracedSize` whose proxy is the
    graph value computing it, found or made (:func:`size_node`) right before ``before``.
    """
    tracer = _GraphAppender(graph)
    made_nodes = []
    with graph.inserting_before(before):
        traced = []
        for sym in sizes:
            node, made = size_node(graph, sym, before)
            made_nodes += [made] if made is not None else []
            traced.append(TracedSize(fx.Proxy(node, tracer), sym))
        out = fn(*(fx.Proxy(n, tracer) for n in inputs), *traced)
    if not isinstance(out, fx.Proxy):
        raise TypeError(f"the {tag} replacement returned {type(out).__name__}, not a traced tensor")
    new_nodes = made_nodes + [n for n in tracer.created if n.graph is graph]
    for new in new_nodes:
        transfer_meta(new, like)
        new.meta["gridattn"] = tag
    return out.node, new_nodes


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


def size_node(graph: fx.Graph, sym: "torch.SymInt", before: fx.Node):
    """A graph value computing ``sym``, available at ``before``: a node whose value is that SymInt,
    else a new ``sym_size`` of the first tensor that has it as a dimension. Raises ``LookupError``
    when no value before ``before`` carries it."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    expr = sym.node.expr
    for node in graph.nodes:
        if node is before:
            break
        value = _val(node)
        if isinstance(value, torch.SymInt) and value.node.expr == expr:
            return node, None
        if isinstance(value, torch.Tensor):
            for dim, size in enumerate(value.shape):
                if isinstance(size, torch.SymInt) and (size.node.expr == expr or (
                        size.node.hint == sym.node.hint and statically_known_true(size == sym))):
                    with graph.inserting_before(before):
                        made = graph.call_function(torch.ops.aten.sym_size.int, (node, dim))
                    made.meta["gridattn"] = "size"
                    return made, made
    raise LookupError(f"no value in the graph computes the symbolic size {sym}")


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
    _erase_dead(gm.graph, site.nodes)
    return result


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

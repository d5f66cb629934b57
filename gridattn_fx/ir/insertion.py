"""Tracing a Python function straight into an existing graph: the function runs on
``torch.fx.Proxy`` objects of the graph's own nodes and every op it records lands in place, with
the metadata of the node it replaces. Symbolic sizes the function needs are bound to the graph
values that compute them (:class:`TracedSize`), so shape decisions become guards."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .graphs import transfer_meta
from .values import known_true
from .values import value_of as _val


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
            if not isinstance(sym, torch.SymInt) or sym.node.expr.is_number:
                traced.append(int(sym))  # a constant (a guard replaced the symbol): no graph value needed
                continue
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


def size_node(graph: fx.Graph, sym: "torch.SymInt", before: fx.Node):
    """A graph value computing ``sym``, available at ``before``: a node whose value is that SymInt,
    else a new ``sym_size`` of the first tensor that has it as a dimension. Raises ``LookupError``
    when no value before ``before`` carries it."""
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
                        size.node.hint == sym.node.hint and known_true(size == sym))):
                    with graph.inserting_before(before):
                        made = graph.call_function(torch.ops.aten.sym_size.int, (node, dim))
                    made.meta["gridattn"] = "size"
                    return made, made
    raise LookupError(f"no value in the graph computes the symbolic size {sym}")

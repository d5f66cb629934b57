"""Move a site's Grid Clustering up and its Grid Recovering down, across per-token ops.

Regrouping only reorders tokens, and an op that treats every token on its own commutes with any
reordering of them: ``linear(cluster(x)) == cluster(linear(x))``. Done at the attention call, the
regrouping is a copy of q, k and v and one of the output wherever the neighbours are GEMMs (the
projections): inductor cannot fold an index permutation into an extern matmul. Moved up to the
tensor the projections read (a LayerNorm output, say) and down to the tensor the output projection
writes, the permutation becomes the indexing of a pointwise kernel that runs anyway (the norm, the
residual add), and the attention call reads its groups as free views (``GridPlan.pregrouped``).

Exactness rules, per node:

* a node is *moved* (recomputed in group order) only when its op is per-token along the tracked
  axis (:func:`_per_token`, reading ir/op_catalogue.py: linear / norms over feature axes, pointwise
  ops whose other operands do not vary along the axis, reshapes and permutes that keep the axis whole, unbind / split / getitem
  along other axes, no randomness), and every user of its value is moved too (or is the site), so
  no other consumer ever sees a reordered tensor;
* where the walk stops, a :func:`cluster_axis` is inserted for the moved users only;
* below the site, the walk follows single-user chains of per-token ops and inserts one
  :func:`recover_axis` after the last, for all of its users.

All new values are first computed on the graph's fake tensors; if anything fails or a shape or
dtype changes, the site keeps its regrouping at the attention call (the caller reports why).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx

from ..grid import GridPlan, TokenLayout, cluster_image_axis, recover_image_axis
from ..ir.graphs import call_on_values, propagate_values
from ..ir.insertion import inline
from ..ir.op_catalogue import (
    CAST,
    FEATURES,
    IDENTITY,
    INDEX,
    PERMUTE,
    POINTWISE,
    RANDOM,
    RESHAPE,
    SPLIT,
    is_identity_draw,
    permutation,
    rule,
    split_dim,
)
from ..ir.ops import mutates as _mutates
from ..ir.ops import op_name
from ..ir.values import value_of as _val
from ..layout.reshape import _normalized_shape
from ..patterns import AttentionSite
from .policy import is_symbolic
from .rewrite import rewrite_site


@dataclass
class Motion:
    """Where one site's regrouping goes: cluster at ``entries``, recompute ``moved`` in group order,
    recover after ``exit``."""
    entries: dict[fx.Node, tuple[int, TokenLayout]]   # node -> (token axis, image) to cluster
    moved: dict[fx.Node, fx.Node]                     # moved node above the site -> its data input
    exit: fx.Node                                     # the site output or the last moved node below
    exit_axis: int
    below: list[fx.Node] = field(default_factory=list)  # moved nodes below the site, in order

    def describe(self, site_output: fx.Node) -> str:
        entry = ", ".join(f"`{n.name}`" for n in self.entries)
        down = f"after `{self.exit.name}`" if self.exit is not site_output else "at the attention output"
        return (f"regrouping: cluster at {entry} (+{len(self.moved)} ops in group order), "
                f"recover {down} (+{len(self.below)} ops)")


# --- which ops are per-token ------------------------------------------------------------------

def _shape(value):
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _static(shape) -> bool:
    return shape is not None and all(isinstance(s, int) for s in shape)


def _operands(node: fx.Node):
    return [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]


def _axis_in_reshape(in_shape, out_shape, axis: int) -> int | None:
    """The output axis holding input ``axis`` whole under a row-major reshape, or None."""
    before = math.prod(in_shape[:axis])
    for j, size in enumerate(out_shape):
        if size == in_shape[axis] and math.prod(out_shape[:j]) == before:
            return j
    return None


def _independent(operand, out_shape, axis: int) -> bool:
    """Whether a side operand is the same for every position of ``axis`` (it broadcasts along it)."""
    value = _val(operand) if isinstance(operand, fx.Node) else operand
    if not isinstance(value, torch.Tensor):
        return True  # a python number, dtype, device, ...: nothing varies with the token
    shape = _shape(value)
    lead = len(out_shape) - len(shape)
    return axis < lead or shape[axis - lead] == 1


def _per_token(node: fx.Node, data: fx.Node, axis: int, gm: fx.GraphModule) -> int | None:
    """If ``node`` is per-token along axis ``axis`` of its operand ``data``: the token axis of its
    output (of every element, for tuple outputs); else None. Asks the op catalogue's kind of the op
    (ir/op_catalogue.py) and that kind's rule below."""
    if node.op not in ("call_function", "call_method"):
        return None  # modules (symbolic_trace graphs) are not opened
    if _mutates(node):
        return None  # in-place: would write through to a tensor others may read
    name = op_name(node, gm)
    in_value, out_value = _val(data), _val(node)
    in_shape = _shape(in_value[0] if isinstance(in_value, (tuple, list)) and in_value else in_value)
    if name is None or not _static(in_shape) or not 0 <= axis < len(in_shape):
        return None
    op_rule = rule(name)
    kind = op_rule.kind if op_rule is not None else None
    if kind == INDEX:
        return _index_axis(node, data, axis, in_value)
    if isinstance(in_value, (tuple, list)):
        return None
    per_token = _PER_TOKEN.get(kind)
    if per_token is None:
        return None
    out_shape = _shape(out_value)
    if kind != SPLIT and not _static(out_shape):
        return None
    return per_token(node, data, axis, gm, name, in_shape, out_shape)


def _index_axis(node, data, axis, in_value):
    index = node.args[1] if len(node.args) > 1 else None
    if node.args[0] is not data or not isinstance(index, int):
        return None
    if isinstance(in_value, torch.Tensor):
        return axis - 1 if axis > 0 else None  # x[i] drops axis 0
    return axis  # an element of a tuple of per-token pieces


def _split_axis(node, data, axis, gm, name, in_shape, out_shape):
    if node.args[0] is not data:
        return None
    dim = split_dim(node, name)
    if not isinstance(dim, int) or dim % len(in_shape) == axis:
        return None
    return axis - 1 if name == "unbind" and dim % len(in_shape) < axis else axis  # unbind drops its axis


def _features_axis(node, data, axis, gm, name, in_shape, out_shape):
    if node.args[0] is not data:
        return None
    normalized = 1 if name == "linear" else len(_normalized_shape(node, gm))  # linear: no normalized_shape
    if axis >= len(in_shape) - max(normalized, 1) or out_shape[:-1] != in_shape[:-1]:
        return None
    return axis


def _reshape_axis(node, data, axis, gm, name, in_shape, out_shape):
    if node.args[0] is not data:
        return None
    return _axis_in_reshape(in_shape, out_shape, axis)


def _permute_axis(node, data, axis, gm, name, in_shape, out_shape):
    if node.args[0] is not data:
        return None
    try:
        perm = permutation(node, name, len(in_shape))
    except (TypeError, ValueError, IndexError):  # dims we cannot read as ints
        return None
    return perm.index(axis) if sorted(perm) == list(range(len(in_shape))) else None


def _pointwise_axis(node, data, axis, gm, name, in_shape, out_shape):
    if out_shape != in_shape:
        return None
    if name in RANDOM and not is_identity_draw(node):
        return None  # random: the same draw on reordered tokens is not the same result
    others = [a for a in (*node.args, *node.kwargs.values()) if a is not data]
    if data not in node.args and data not in node.kwargs.values():
        return None
    return axis if all(_independent(a, out_shape, axis) for a in others) else None


# The kinds of the op catalogue the motion moves across, each with its rule (mutating forms were
# refused before): kinds without an entry are not per-token.
_PER_TOKEN = {
    SPLIT: _split_axis, FEATURES: _features_axis, RESHAPE: _reshape_axis, PERMUTE: _permute_axis,
    POINTWISE: _pointwise_axis, CAST: _pointwise_axis, IDENTITY: _pointwise_axis,
}


def _mutation_between(gm: fx.GraphModule, first: fx.Node, last: fx.Node, order) -> fx.Node | None:
    """The first in-place op from ``first`` to ``last`` (graph order): a mutation could be seen
    before or after a moved cluster depending on where it lands, so none is allowed there."""
    for node in gm.graph.nodes:
        if order[first] <= order[node] <= order[last] and _mutates(node):
            return node
    return None


def _axis_above(node: fx.Node, data: fx.Node, out_axis: int, gm) -> int | None:
    """The axis of operand ``data`` that ``node`` carries to its output axis ``out_axis``, or None."""
    value = _val(data)
    if isinstance(value, (tuple, list)):  # getitem of a tuple: the same axis in every element
        return out_axis if _per_token(node, data, out_axis, gm) == out_axis else None
    if not isinstance(value, torch.Tensor):
        return None
    hits = [a for a in range(value.dim()) if _per_token(node, data, a, gm) == out_axis]
    return hits[0] if len(hits) == 1 else None


def _data_input(node: fx.Node, out_axis: int, gm) -> tuple[fx.Node, int] | None:
    """The operand ``node`` is per-token in, and that operand's token axis."""
    if node.op not in ("call_function", "call_method"):
        return None
    for operand in dict.fromkeys(_operands(node)):
        axis = _axis_above(node, operand, out_axis, gm)
        if axis is not None:
            return operand, axis
    return None


# --- planning -----------------------------------------------------------------------------------

def plan_motion(gm: fx.GraphModule, site: AttentionSite, plan: GridPlan) -> tuple[Motion | None, str]:
    """Where the site's regrouping can go, or None and why it stays at the attention call."""
    if is_symbolic(plan.q_layout) or is_symbolic(plan.k_layout):
        # The walk reads static shapes only; the site's own rewrite handles symbolic sizes.
        return None, "symbolic sizes: the regrouping is moved only for static sizes"
    why = plan.pregrouped_unsupported
    if why:
        return None, why
    if len(site.inputs) != 3 or site.relpos is not None:
        return None, "the site takes more than q, k, v"
    q, k, v = site.inputs
    ndim = plan.ndim
    roots = {}
    for node, axis in ((q, site.query_dim % ndim), (k, site.key_dim % ndim), (v, ndim - 2)):
        layout = plan.q_layout if node is q else plan.k_layout
        if roots.setdefault(node, (axis, layout)) != (axis, layout):
            return None, "one tensor feeds the site on two different token axes or grids"
    site_nodes = set(site.nodes)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}

    requests: dict[fx.Node, tuple[int, TokenLayout]] = dict(roots)
    moved: dict[fx.Node, fx.Node] = {}
    entries: dict[fx.Node, tuple[int, TokenLayout]] = {}
    heap = [(-order[n], n.name) for n in requests]
    heapq.heapify(heap)
    by_name = {n.name: n for n in requests}
    while heap:  # latest node first: all its users are decided before it is
        _, name = heapq.heappop(heap)
        node = by_name[name]
        axis, layout = requests[node]
        users_ok = all((u in moved and moved[u] is node) or (node in roots and u in site_nodes)
                       for u in node.users)
        step = _data_input(node, axis, gm) if users_ok else None
        if step is None:
            entries[node] = (axis, layout)
            continue
        data, data_axis = step
        if data in requests:
            if requests[data] != (data_axis, layout):
                return None, f"`{data.name}` would need two different regroupings"
        else:
            requests[data] = (data_axis, layout)
            by_name[data.name] = data
            heapq.heappush(heap, (-order[data], data.name))
        moved[node] = data
    if not moved:
        return None, "no per-token op next to the site to move the regrouping across"
    for node in entries:
        if not isinstance(_val(node), torch.Tensor):
            return None, f"`{node.name}` is not a tensor (a tuple only partly used by the site)"

    mutation = _mutation_between(gm, min(entries, key=order.get), site.output, order)
    if mutation is not None:
        return None, f"in-place op `{mutation.name}` next to the site (reordering around it is not checked)"

    below, cur, axis = [], site.output, site.query_dim % ndim
    while len(cur.users) == 1:
        (user,) = cur.users
        out_axis = _per_token(user, cur, axis, gm) if user.op != "output" else None
        if out_axis is None:
            break
        below.append(user)
        cur, axis = user, out_axis
    return Motion(entries, moved, cur, axis, below), ""


# --- checking and applying ----------------------------------------------------------------------

def _fake_call(node: fx.Node, env: dict):
    return call_on_values(node, lambda n: env[n] if n in env else _val(n))


def _same_kind(new, old, node: fx.Node) -> None:
    pairs = zip(new, old) if isinstance(old, (tuple, list)) else [(new, old)]
    for a, b in pairs:
        if isinstance(b, torch.Tensor) and (tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype):
            raise RuntimeError(f"`{node.name}` would change from {tuple(b.shape)}/{b.dtype} "
                               f"to {tuple(a.shape)}/{a.dtype} in group order")


def _cluster_fn(axis: int, layout: TokenLayout, plan: GridPlan):
    """The plan's regrouping of ``layout``'s image along ``axis`` (any rank, the plan's grouping)."""
    return lambda x: cluster_image_axis(x, axis, layout.image_shape, plan.stride, plan.grouping)


def _recover_fn(axis: int, layout: TokenLayout, plan: GridPlan):
    return lambda x: recover_image_axis(x, axis, layout.image_shape, plan.stride, plan.grouping)


def _in_order(gm: fx.GraphModule, nodes) -> list[fx.Node]:
    wanted = set(nodes)
    return [n for n in gm.graph.nodes if n in wanted]


def _position(gm: fx.GraphModule):
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return order.__getitem__


def check_motion(gm: fx.GraphModule, site: AttentionSite, plan: GridPlan, motion: Motion,
                 implementation: str) -> None:
    """Compute every value the motion changes on the graph's fake tensors; raise if one fails or
    would change shape or dtype. ``plan`` is the pregrouped plan."""
    mode = getattr(_val(site.inputs[0]), "fake_mode", None)
    if mode is None:
        raise RuntimeError("the graph carries no fake values to check the moved regrouping on")
    env: dict = {}
    with mode:
        for node, (axis, layout) in motion.entries.items():
            env[node] = _cluster_fn(axis, layout, plan)(_val(node))
        for node in _in_order(gm, motion.moved):
            env[node] = _fake_call(node, env)
            _same_kind(env[node], _val(node), node)
        out = site.build(plan, implementation)(*[env[n] for n in site.inputs])
        _same_kind(out, _val(site.output), site.output)
        env[site.output] = out
        for node in motion.below:
            env[node] = _fake_call(node, env)
            _same_kind(env[node], _val(node), node)
        back = _recover_fn(motion.exit_axis, plan.q_layout, plan)(env[motion.exit])
        _same_kind(back, _val(motion.exit), motion.exit)


def apply_motion(gm: fx.GraphModule, site: AttentionSite, plan: GridPlan, motion: Motion,
                 implementation: str) -> fx.Node:
    """Rewrite ``site`` with its regrouping moved as ``motion`` says (``plan`` is pregrouped)."""
    graph = gm.graph
    inputs = list(site.inputs)
    inserted = []
    for node, (axis, layout) in motion.entries.items():
        readers = [u for u in node.users if motion.moved.get(u) is node] or [site.output]
        first_reader = min(readers, key=_position(gm))
        grouped, new = inline(graph, _cluster_fn(axis, layout, plan), [node], first_reader, node,
                              "cluster")
        inserted += new
        for user in list(node.users):
            if motion.moved.get(user) is node:
                user.replace_input_with(node, grouped)
        inputs = [grouped if n is node else n for n in inputs]
    propagate_values(_in_order(gm, [*inserted, *motion.moved]), site.output)

    result = rewrite_site(gm, replace(site, inputs=inputs), plan, implementation)
    exit_node = result if motion.exit is site.output else motion.exit
    back, new = inline(graph, _recover_fn(motion.exit_axis, plan.q_layout, plan), [exit_node],
                       exit_node.next, exit_node, "recover")
    exit_node.replace_all_uses_with(back, delete_user_cb=lambda user: user not in new)
    propagate_values(_in_order(gm, [*motion.below, *new]), site.output)
    return back

"""Token-layout inference: prove, from the graph's own dataflow, which tensor axes are images.

A forward abstract interpretation over the graph. Spatial tensors are *born* at conv / pool /
interpolate outputs (4-D, NCHW: rows on axis 2, columns on axis 3). Every op that moves axes
around (permute, reshape, flatten, cat, slicing, split, ...) or keeps positions in place
(pointwise ops, linear, norms, attention itself) carries the fact to its output; any op we do not
understand drops it. A site's layout is therefore proven exactly when an unbroken chain of
understood ops connects it to a spatial source; the sequence *length* alone never proves anything.

Two kinds of fact:

* :class:`Spatial` - separate row and column axes (``h_dim``, ``w_dim``), e.g. NCHW or NHWC.
* :class:`Tokens` - one sequence axis ``dim`` holding ``prefix`` tokens, then the image
  (row-major, or column-major when ``transposed``), then ``suffix`` tokens.

Sizes are kept as the graph gives them (``int`` or ``torch.SymInt``); wherever a transfer function
compares symbolic sizes it needs the equality proven through the ShapeEnv (:func:`_same_size`), never
matched by the values the sizes were traced with.
"""

from __future__ import annotations

import math
import operator
import re
from collections import deque
from dataclasses import dataclass, replace

import torch
import torch.fx as fx
import torch.nn as nn

from ..grid import TokenLayout
from ..patterns.ops import op_name
from ..patterns.values import shape_of as _shape
from ..patterns.values import value_of as _val


@dataclass(frozen=True)
class Spatial:
    h_dim: int
    w_dim: int
    height: object
    width: object
    origin: str
    trail: tuple = ()

    def dims(self):
        return (self.h_dim, self.w_dim)


@dataclass(frozen=True)
class Tokens:
    dim: int
    prefix: object
    height: object
    width: object
    suffix: object
    transposed: bool
    origin: str
    trail: tuple = ()

    def dims(self):
        return (self.dim,)

    @property
    def image_tokens(self):
        return self.height * self.width


def _hint(size) -> int | None:
    """A concrete value for a size: the int itself, or the hint Dynamo traced a SymInt with."""
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return int(hint) if hint is not None else None
    return None


def _same_size(a, b) -> bool:
    """Whether two sizes are provably equal: ints compare; a SymInt must equal the other for every
    value the ShapeEnv allows (checked without installing a guard). Equal traced values (hints) alone
    prove nothing: two unrelated symbols may happen to have been traced with the same value."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if _hint(a) is None or _hint(a) != _hint(b):
        return False
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt) and a.node.expr == b.node.expr:
        return True
    return _known(a == b)


def _known(condition) -> bool:
    """A size condition that holds for every size the ShapeEnv allows (no guard is installed)."""
    if isinstance(condition, bool):
        return condition
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(condition)


def _static(size) -> int | None:
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt) and size.node.is_constant():
        return int(size)
    return None


def _resolve(arg):
    """Arguments as values: nodes that compute sizes become their SymInt / int values."""
    if isinstance(arg, fx.Node):
        return _val(arg)
    if isinstance(arg, (list, tuple)):
        return type(arg)(_resolve(a) for a in arg)
    return arg


_SOURCES = {
    "conv2d", "conv_transpose2d", "convolution", "_convolution", "max_pool2d", "avg_pool2d",
    "adaptive_avg_pool2d", "adaptive_max_pool2d", "interpolate", "upsample", "upsample_nearest2d",
    "upsample_bilinear2d", "upsample_bicubic2d", "_upsample_nearest_exact2d", "pixel_shuffle",
    "pixel_unshuffle", "_adaptive_avg_pool2d",
}
_POINTWISE = {
    "add", "sub", "mul", "div", "truediv", "floordiv", "pow", "neg", "abs", "exp", "log", "sqrt", "rsqrt",
    "reciprocal", "sigmoid", "tanh", "relu", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "leaky_relu",
    "elu", "softplus", "erf", "square", "clamp", "clamp_min", "clamp_max", "dropout", "contiguous", "clone",
    "to", "type", "type_as", "float", "half", "double", "bfloat16", "detach", "where", "masked_fill",
    "_to_copy", "alias", "lift_fresh_copy", "radd", "rmul", "rsub", "iadd", "imul", "isub", "itruediv",
    "sin", "cos", "lerp", "addcmul", "feature_dropout",
}
_VIEWS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "_unsafe_view"}
_PERMUTES = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t"}
_CHANNEL_NORMS = {"group_norm", "batch_norm", "instance_norm", "_native_batch_norm_legit_no_training"}
_LAST_DIM = {"linear", "layer_norm", "rms_norm"}
_CATS = {"cat", "concat", "concatenate"}
_LOSS_HINTS = {
    **{v: "a reshape that splits or merges the image axes, e.g. into windows" for v in _VIEWS},
    "getitem": "indexing that drops or reorders image tokens",
    "cat": "concatenation of two image layouts",
    "pad": "padding of the image axes, e.g. to a multiple of the window size",
}
# Reductions over feature axes with keepdim=True (hand-written norms): token positions stay put.
_KEEPDIM_REDUCTIONS = {"mean", "sum", "amax", "amin"}  # all (x, dim, keepdim)
_SPLITS = {"split", "chunk", "unbind", "tensor_split", "split_with_sizes"}


# --- the analysis -----------------------------------------------------------------------------

class LayoutAnalysis:
    """Runs once over a graph; then answers :meth:`layout` for any node and sequence axis.

    ``attention_outputs`` maps each attention site's output node to (query node, its sequence
    axis): the output carries the query's token layout on the same axis. ``inherited`` gives facts
    for placeholders proven in an earlier piece of the same split graph (passes/split_handoff.py).
    """

    def __init__(self, gm: fx.GraphModule, attention_outputs: dict[fx.Node, tuple[fx.Node, int]],
                 inherited: dict[fx.Node, object] | None = None):
        self.gm = gm
        self.attention_outputs = attention_outputs
        self.inherited = inherited or {}
        self.facts: dict[fx.Node, object] = {}
        self.lost: dict[fx.Node, str] = {}
        for node in gm.graph.nodes:
            try:
                fact = self._transfer(node)
            except Exception:  # an op we mis-read must never become a wrong proof
                fact = None
            if fact is not None:
                self.facts[node] = fact
            elif node not in attention_outputs and isinstance(_val(node), torch.Tensor) and any(
                self.facts.get(a) is not None for a in node.all_input_nodes
            ):
                name = op_name(node, gm)
                why = _LOSS_HINTS.get(name, "")
                self.lost[node] = f"{name or node.target} `{node.name}`" + (f" ({why})" if why else "")

    # -- queries --------------------------------------------------------------------------------
    def layout(self, node: fx.Node, seq_dim: int) -> tuple[TokenLayout | None, str]:
        """The proven layout of ``node``'s axis ``seq_dim`` and the evidence, or None and why not."""
        fact = self.facts.get(node)
        shape = _shape(node)
        if shape is None:
            return None, "not a tensor"
        seq_dim = seq_dim % len(shape)
        if isinstance(fact, Tokens) and fact.dim == seq_dim:
            # Symbolic sizes stay SymInts: the policy and the rewrite decide on them through the
            # ShapeEnv (guards), never on the values they were traced with.
            raw = (fact.prefix, fact.height, fact.width, fact.suffix)
            sizes = [s if _static(s) is None else _static(s) for s in raw]
            if any(not isinstance(s, (int, torch.SymInt)) for s in sizes):
                return None, f"image size {fact.height}x{fact.width} is not an integer"
            evidence = f"{fact.origin} via {_trail_text(fact.trail)}"
            return TokenLayout(*sizes, transposed=fact.transposed), evidence
        if fact is not None:
            return None, f"no proven image layout on the sequence axis ({type(fact).__name__.lower()} axes {fact.dims()} instead)"
        return None, "no proven image layout: " + self._why_not(node)

    def _why_not(self, node: fx.Node) -> str:
        seen, queue = {node}, deque([node])
        while queue and len(seen) < 5000:
            cur = queue.popleft()
            if cur in self.lost:
                src = next((self.facts[a] for a in cur.all_input_nodes if a in self.facts), None)
                origin = f" (from {src.origin})" if src is not None else ""
                return f"image layout{origin} lost at {self.lost[cur]}"
            # An attention output's positions are its query's: only that lineage explains them.
            inputs = [self.attention_outputs[cur][0]] if cur in self.attention_outputs else cur.all_input_nodes
            for a in inputs:
                if a not in seen:
                    seen.add(a)
                    queue.append(a)
        return "no spatial source (conv/pool/interpolate output) reaches it"

    # -- transfer functions ---------------------------------------------------------------------
    def _transfer(self, node: fx.Node):
        if node.op == "placeholder":
            return _step(self.inherited.get(node), "DDP bucket split")
        if node.op not in ("call_function", "call_method", "call_module"):
            return None
        if node in self.attention_outputs:
            # Attention keeps the query's token positions (rewritten or not: grid recovering
            # puts every output token back in place).
            query, query_dim = self.attention_outputs[node]
            fact = self.facts.get(query)
            on_seq_axis = isinstance(fact, Tokens) and fact.dim == query_dim % len(_shape(query))
            same_rank = _shape(node) is not None and len(_shape(node)) == len(_shape(query))
            return _step(fact, "attention") if on_seq_axis and same_rank else None
        if node.op == "call_function" and node.target is operator.getitem and not isinstance(_val(node.args[0]), torch.Tensor):
            pieces = self.facts.get(node.args[0])
            return pieces[node.args[1]] if isinstance(pieces, tuple) else None
        name = op_name(node, self.gm)
        if name is None:
            return None
        out = _val(node)
        if name in _SOURCES:
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                return Spatial(2, 3, out.shape[2], out.shape[3], origin=self._source_text(node, name, out))
            return None
        inp = node.args[0] if node.args else None
        fact = self.facts.get(inp) if isinstance(inp, fx.Node) else None
        if name in _CATS:
            return self._cat(node)
        if name == "stack":
            return self._stack(node)
        if name in _POINTWISE:
            return self._pointwise(node, name)
        if name == "getattr" and node.args[1] in ("mT", "T") and fact is not None:
            ndim = len(_shape(inp))
            perm = list(range(ndim))[::-1] if node.args[1] == "T" else list(range(ndim - 2)) + [ndim - 1, ndim - 2]
            return _permute(fact, perm, node.args[1])
        if name in _KEEPDIM_REDUCTIONS and fact is not None:
            dims = _resolve(_arg(node, 1, "dim"))
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            keepdim = _arg(node, 2, "keepdim", False)
            reduced = {d % out.dim() for d in dims}
            return _step(fact, name) if dims and keepdim is True and not reduced & set(fact.dims()) else None
        if name in ("softmax", "log_softmax", "_softmax"):
            dim = _arg(node, 1, "dim")
            return _step(fact, name) if fact is not None and isinstance(dim, int) and dim % out.dim() not in fact.dims() else None
        if fact is None:
            return None
        if name in _VIEWS or (name == "flatten" and node.op == "call_module"):
            return _reshape(fact, _shape(inp), tuple(out.shape), name)
        if name in _PERMUTES:
            return _permute(fact, _permutation(node, name, len(_shape(inp))), name)
        if name in _LAST_DIM:
            n_last = len(_normalized_shape(node, self.gm)) if name != "linear" else 1
            ndim = len(_shape(inp))
            return _step(fact, name) if all(d < ndim - n_last for d in fact.dims()) else None
        if name in _CHANNEL_NORMS:
            return _step(fact, name) if all(d >= 2 for d in fact.dims()) else None
        if name == "getitem":
            return _index(fact, _shape(inp), _resolve(node.args[1]))
        if name in ("narrow", "slice"):
            return self._narrow(node, name, fact, _shape(inp))
        if name == "select":
            dim, index = _resolve(_arg(node, 1, "dim")), _resolve(_arg(node, 2, "index"))
            idx = [slice(None)] * (dim % len(_shape(inp))) + [index]
            return _index(fact, _shape(inp), tuple(idx))
        if name in _SPLITS:
            return self._split(node, name, fact, _shape(inp))
        if name == "repeat_interleave":  # along a batch-like axis (SAM repeats images per prompt)
            dim = _resolve(_arg(node, 2, "dim"))
            ndim = len(_shape(inp))
            ok = isinstance(dim, int) and dim % ndim not in fact.dims() and len(out.shape) == ndim
            return _step(fact, name) if ok else None
        if name in ("expand", "expand_as", "broadcast_to"):
            return _broadcast(fact, _shape(inp), tuple(out.shape), name)
        if name == "pad":
            pads = _resolve(_arg(node, 1, "pad"))
            ndim = len(_shape(inp))
            touched = {ndim - 1 - i // 2 for i, p in enumerate(pads) if p != 0}
            return _step(fact, name) if not touched & set(fact.dims()) else None
        if name == "matmul":
            other = _val(node.args[1])
            if isinstance(other, torch.Tensor) and other.dim() == 2 and self.facts.get(node.args[1]) is None:
                ndim = len(_shape(inp))
                return _step(fact, name) if all(d < ndim - 1 for d in fact.dims()) else None
        return None

    def _source_text(self, node, name, out) -> str:
        path = module_path(node)
        where = f" `{path}`" if path else f" `{node.name}`"
        return f"{name}{where} ({'x'.join(str(s) for s in out.shape[2:])})"

    def _inputs_with_facts(self, tensors):
        return [(t, self.facts.get(t) if isinstance(t, fx.Node) else None) for t in tensors]

    def _pointwise(self, node, name):
        out_shape = _shape(node)
        if out_shape is None:
            return None
        found = None
        for arg in node.all_input_nodes:
            fact = self.facts.get(arg)
            if fact is None:
                continue
            shape = _shape(arg)
            shift = len(out_shape) - len(shape)
            moved = _shift(fact, shift)
            if any(not _same_size(shape[d - shift], out_shape[d]) for d in moved.dims()):
                return None  # the fact's axis is broadcast into something larger
            if found is not None and _key(found) != _key(moved):
                return None  # two different layouts meet: no single proof
            found = found or moved
        return _step(found, name) if found is not None else None

    def _cat(self, node):
        tensors = list(_arg(node, 0, "tensors"))
        dim = _arg(node, 1, "dim", 0)
        out_shape = _shape(node)
        dim %= len(out_shape)
        facts = self._inputs_with_facts(tensors)
        with_fact = [(t, f) for t, f in facts if f is not None]
        if not with_fact:
            return None
        if any(dim in f.dims() for _, f in with_fact):
            if len(with_fact) != 1 or not isinstance(with_fact[0][1], Tokens):
                return None  # two images in one sequence, or rows glued to rows: not a layout we model
            target, fact = with_fact[0]
            idx = [t is target for t in tensors].index(True)
            before = sum((_shape(t)[dim] for t in tensors[:idx]), 0)
            after = sum((_shape(t)[dim] for t in tensors[idx + 1:]), 0)
            return _step(replace(fact, prefix=fact.prefix + before, suffix=fact.suffix + after), "cat")
        keys = {_key(f) for _, f in with_fact}
        return _step(with_fact[0][1], "cat") if len(keys) == 1 else None

    def _stack(self, node):
        tensors = list(_arg(node, 0, "tensors"))
        dim = _arg(node, 1, "dim", 0) % len(_shape(node))
        with_fact = [f for _, f in self._inputs_with_facts(tensors) if f is not None]
        if not with_fact or len({_key(f) for f in with_fact}) != 1:
            return None
        fact = with_fact[0]
        return _step(_remap(fact, {d: d + (d >= dim) for d in fact.dims()}), "stack")

    def _narrow(self, node, name, fact, shape):
        if name == "narrow":
            dim, start, length = (_resolve(_arg(node, i, n)) for i, n in ((1, "dim"), (2, "start"), (3, "length")))
            sl = slice(start, start + length)
        else:  # aten.slice(x, dim, start, end, step)
            dim = _resolve(_arg(node, 1, "dim", 0))
            sl = slice(_resolve(_arg(node, 2, "start")), _resolve(_arg(node, 3, "end")), _resolve(_arg(node, 4, "step", 1)))
        idx = [slice(None)] * (dim % len(shape)) + [sl]
        return _index(fact, shape, tuple(idx))

    def _split(self, node, name, fact, shape):
        pieces = _val(node)
        if not isinstance(pieces, (tuple, list)):
            return None
        dim = _resolve(_arg(node, 1 if name == "unbind" else 2, "dim", 0)) % len(shape)
        results, offset = [], 0
        for piece in pieces:
            if name == "unbind":
                idx = tuple([slice(None)] * dim + [offset])
                offset += 1
            else:
                size = piece.shape[dim]
                idx = tuple([slice(None)] * dim + [slice(offset, offset + size)])
                offset = offset + size
            results.append(_index(fact, shape, idx))
        return tuple(results)


# --- fact arithmetic --------------------------------------------------------------------------

def _key(fact):
    """Facts that describe the same positions compare equal regardless of their history."""
    return replace(fact, origin="", trail=())


def _step(fact, op: str):
    if fact is None:
        return None
    trail = fact.trail if fact.trail and fact.trail[-1] == op else fact.trail + (op,)
    return replace(fact, trail=trail)


def _trail_text(trail) -> str:
    if len(trail) > 8:
        trail = trail[:4] + ("...",) + trail[-3:]
    return " > ".join(trail) if trail else "(source)"


def _shift(fact, by: int):
    return _remap(fact, {d: d + by for d in fact.dims()}) if by else fact


def _remap(fact, mapping: dict):
    """Move a fact's axes; None when one of them disappears."""
    new = {d: mapping.get(d) for d in fact.dims()}
    if any(v is None for v in new.values()):
        return None
    if isinstance(fact, Spatial):
        return replace(fact, h_dim=new[fact.h_dim], w_dim=new[fact.w_dim])
    return replace(fact, dim=new[fact.dim])


def _arg(node, index, name, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _normalized_shape(node, gm):
    if node.op == "call_module":
        return tuple(gm.get_submodule(node.target).normalized_shape)
    shape = _resolve(_arg(node, 1, "normalized_shape"))
    return (shape,) if isinstance(shape, int) else tuple(shape)


def _permutation(node, name, ndim) -> list[int]:
    """``perm`` with output axis i = input axis perm[i]."""
    args = [_resolve(a) for a in node.args[1:]]
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        if not dims:
            dims = _resolve(node.kwargs.get("dims"))
        return [d % ndim for d in dims]
    perm = list(range(ndim))
    if name == "t":
        return perm[::-1]
    if name in ("transpose", "swapaxes", "swapdims"):
        a = args[0] if args else _resolve(node.kwargs.get("dim0"))
        b = args[1] if len(args) > 1 else _resolve(node.kwargs.get("dim1"))
        a, b = a % ndim, b % ndim
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    # movedim / moveaxis
    src = args[0] if args else _resolve(node.kwargs.get("source"))
    dst = args[1] if len(args) > 1 else _resolve(node.kwargs.get("destination"))
    src = [s % ndim for s in (src if isinstance(src, (list, tuple)) else [src])]
    dst = [d % ndim for d in (dst if isinstance(dst, (list, tuple)) else [dst])]
    rest = [d for d in range(ndim) if d not in src]
    out = [None] * ndim
    for s, d in zip(src, dst):
        out[d] = s
    it = iter(rest)
    return [o if o is not None else next(it) for o in out]


def _permute(fact, perm, name):
    inverse = {src: dst for dst, src in enumerate(perm)}
    return _step(_remap(fact, inverse), name)


def _reshape_groups(in_shape, out_shape):
    """Minimal groups of (input axes, output axes) that a row-major reshape maps onto each other.

    Boundaries sit where the running products of both shapes coincide; size-1 axes are ignored.
    Returns None when the sizes cannot be read concretely.
    """
    ins = [(d, _hint(s)) for d, s in enumerate(in_shape)]
    outs = [(d, _hint(s)) for d, s in enumerate(out_shape)]
    if any(s is None for _, s in ins + outs):
        return None
    ins = [(d, s) for d, s in ins if s != 1]
    outs = [(d, s) for d, s in outs if s != 1]
    groups, i, j = [], 0, 0
    while i < len(ins) and j < len(outs):
        gi, gj = [ins[i][0]], [outs[j][0]]
        pi, pj = ins[i][1], outs[j][1]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(ins):
                gi.append(ins[i][0]); pi *= ins[i][1]; i += 1
            elif pj < pi and j < len(outs):
                gj.append(outs[j][0]); pj *= outs[j][1]; j += 1
            else:
                return None
        groups.append((gi, gj))
    if i != len(ins) or j != len(outs):
        return None
    # The boundaries were found on traced values; with symbolic sizes each group must also be
    # provably the same size on both sides, or the reshape may regroup differently at other sizes.
    for gi, gj in groups:
        if not _same_size(math.prod(in_shape[d] for d in gi), math.prod(out_shape[d] for d in gj)):
            return None
    return groups


def _reshape(fact, in_shape, out_shape, name):
    groups = _reshape_groups(in_shape, out_shape)
    if groups is None:
        return None
    owner = {d: g for g in groups for d in g[0]}
    if isinstance(fact, Tokens):
        gi, go = owner.get(fact.dim, (None, None))
        if gi == [fact.dim] and len(go) == 1:
            return _step(replace(fact, dim=go[0]), name)
        if gi == [fact.dim] and len(go) == 2 and _hint(fact.prefix) == 0 and _hint(fact.suffix) == 0:
            rows, cols = (fact.width, fact.height) if fact.transposed else (fact.height, fact.width)
            if _same_size(out_shape[go[0]], rows) and _same_size(out_shape[go[1]], cols):
                h_dim, w_dim = (go[1], go[0]) if fact.transposed else (go[0], go[1])
                return _step(Spatial(h_dim, w_dim, fact.height, fact.width, fact.origin, fact.trail), name)
        return None
    gh, gw = owner.get(fact.h_dim), owner.get(fact.w_dim)
    if gh is None or gw is None:
        return None
    if gh is gw:  # rows and columns merge into one sequence axis
        gi, go = gh
        if len(go) != 1 or sorted(gi) != sorted([fact.h_dim, fact.w_dim]):
            return None
        transposed = fact.w_dim < fact.h_dim
        return _step(Tokens(go[0], 0, fact.height, fact.width, 0, transposed, fact.origin, fact.trail), name)
    if len(gh[0]) == 1 and len(gh[1]) == 1 and len(gw[0]) == 1 and len(gw[1]) == 1:
        return _step(replace(fact, h_dim=gh[1][0], w_dim=gw[1][0]), name)
    return None


def _broadcast(fact, in_shape, out_shape, name):
    shift = len(out_shape) - len(in_shape)
    moved = _shift(fact, shift)
    if any(not _same_size(in_shape[d - shift], out_shape[d]) for d in moved.dims()):
        return None
    return _step(moved, name)


def _index(fact, shape, index):
    """``x[index]`` for basic indexing (ints, slices, None, Ellipsis)."""
    if not isinstance(index, tuple):
        index = (index,)
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice, torch.SymInt))) for i in index):
        return None  # advanced indexing can reorder tokens
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - consumed) + index[at + 1:]
    index = index + (slice(None),) * (len(shape) - sum(1 for i in index if i is not None))
    mapping, sizes, in_d, out_d = {}, {}, 0, 0
    for item in index:
        if item is None:
            out_d += 1
            continue
        if isinstance(item, slice):
            mapping[in_d] = out_d
            sizes[in_d] = item
            out_d += 1
        in_d += 1
    fact = _remap(fact, mapping)
    if fact is None:
        return None
    inverse = {v: k for k, v in mapping.items()}
    for d in fact.dims():
        fact = _slice(fact, d, sizes[inverse[d]], shape[inverse[d]])
        if fact is None:
            return None
    return _step(fact, "getitem")


def _slice(fact, dim, sl: slice, length):
    if any(isinstance(x, torch.SymInt) for x in (sl.start, sl.stop, sl.step, length)):
        return _slice_symbolic(fact, dim, sl, length)
    n = _hint(length)
    start, stop, step = (_hint(x) if x is not None else None for x in (sl.start, sl.stop, sl.step))
    if any(x is None for x, raw in zip((start, stop, step), (sl.start, sl.stop, sl.step)) if raw is not None):
        return None
    start, stop, step = slice(start, stop, step).indices(n)
    if (start, stop, step) == (0, n, 1):
        return fact
    if step != 1:
        return None
    if isinstance(fact, Spatial):  # a crop of rows or columns is still a grid
        size = max(stop - start, 0)
        return replace(fact, height=size) if dim == fact.h_dim else replace(fact, width=size)
    first, end = _hint(fact.prefix), _hint(fact.prefix) + _hint(fact.image_tokens)
    if start <= first and stop >= end:
        return replace(fact, prefix=fact.prefix - start, suffix=fact.suffix - (n - stop))
    return None  # the slice keeps only non-image tokens, or cuts through the image


def _slice_symbolic(fact, dim, sl: slice, length):
    """:func:`_slice` when a bound or the axis length is symbolic: only provable effects count."""
    if sl.step not in (None, 1):
        return None
    start = 0 if sl.start is None else sl.start
    stop = length if sl.stop is None or (isinstance(sl.stop, int) and sl.stop >= 2 ** 62) else sl.stop
    start = start + length if isinstance(start, int) and start < 0 else start
    stop = stop + length if isinstance(stop, int) and stop < 0 else stop
    if not (_known(start >= 0) and _known(start <= stop) and _known(stop <= length)):
        return None
    if _known(start == 0) and _known(stop == length):
        return fact
    if isinstance(fact, Spatial):
        return replace(fact, height=stop - start) if dim == fact.h_dim else replace(fact, width=stop - start)
    if _known(start <= fact.prefix) and _known(stop >= fact.prefix + fact.image_tokens):
        return replace(fact, prefix=fact.prefix - start, suffix=fact.suffix - (length - stop))
    return None


def module_path(node: fx.Node) -> str:
    """The dotted module path of the innermost module a node was traced in ("" at top level)."""
    entries = list((node.meta.get("nn_module_stack") or {}).values())
    # A softmax/dropout module inside an attention block is a detail: name the block.
    while len(entries) > 1 and isinstance(entries[-1][1], type) and issubclass(entries[-1][1], _LEAF_HELPERS):
        entries.pop()
    return normalize_module_path(entries[-1][0]) if entries else ""


_LEAF_HELPERS = (nn.Softmax, nn.Dropout)


def normalize_module_path(path: str) -> str:
    """Dynamo spells paths as ``L['self'].blocks[0].attn``; users know them as ``blocks.0.attn``."""
    path = re.sub(r"^L\['[^']*'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    path = re.sub(r"(^|\.)(__dict__|_modules)(?=\.)", "", path)
    return path.lstrip(".")


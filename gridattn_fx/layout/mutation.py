"""Writes into tensors, for the layout proof: which tensors an in-place op may move values in, and
through which aliases (a write into a view writes into its base). Conservative: two nodes may share
storage unless their values prove otherwise."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..ir.op_catalogue import CATS, FRESH_TENSORS, KEEPS_POSITIONS, MAYBE_ALIASING, VIEWING
from ..ir.ops import mutates, op_name, written_args
from ..ir.values import value_of as _val


def _storage(node):
    value = _val(node)
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return value.untyped_storage()._cdata
    except Exception:  # sparse, nested, or a value without storage
        return None


def _alias_classes(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """Each node's representative among the nodes that may share its storage (conservative)."""
    parent: dict[fx.Node, fx.Node] = {}

    def find(n):
        parent.setdefault(n, n)
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    def union(a, b):
        parent[find(a)] = find(b)

    for node in gm.graph.nodes:
        find(node)
        if node.op not in ("call_function", "call_method", "call_module") or not node.args:
            continue
        first = node.args[0]
        if isinstance(first, (list, tuple)) and op_name(node, gm) in CATS:
            continue
        if not isinstance(first, fx.Node):
            continue
        name, storage, source = op_name(node, gm), _storage(node), _storage(first)
        same = storage is not None and storage == source
        unknown = storage is None or source is None
        if name in VIEWING or mutates(node) or same or (name in MAYBE_ALIASING and unknown):
            union(node, first)
        for dest in (written_args(node) if mutates(node) else ()):
            union(node, dest)
    return {n: find(n) for n in parent}


def _trailing_index(index) -> int:
    """How many trailing axes ``x[index]`` indexes when ``index`` is ``(..., slice, ...)`` with an
    Ellipsis first and only plain slices after it (no ints, tensors or None); 0 otherwise."""
    if not (isinstance(index, tuple) and len(index) >= 2 and index[0] is Ellipsis):
        return 0
    for part in index[1:]:
        if not isinstance(part, slice) or any(
                b is not None and (not isinstance(b, int) or isinstance(b, bool))
                for b in (part.start, part.stop, part.step)):
            return 0
    return len(index) - 1


def _feature_fills(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """Fresh tensors filled through ``fresh[..., idx] = value`` writes along trailing axes only, as
    interleaved rotary embeddings write their output (diffusers' Wan: ``out = torch.empty_like(x);
    out[..., 0::2] = ...; out[..., 1::2] = ...``), mapped to those writes in graph order.

    Such a write keeps every value of the leading axes where it is, so the filled tensor is laid out
    as its values are (:meth:`LayoutAnalysis._fill` checks the values' facts). Only when nothing else
    can see the tensor change: every other user comes after the last write (no reader or view in
    between) and none of them writes into it (a write through a later view is a write as usual)."""
    return _fresh_fills(gm, lambda node: [
        u for u in node.users if u.op == "call_function" and u.target is operator.setitem
        and len(u.args) == 3 and u.args[0] is node and _trailing_index(u.args[1])])


def _token_fills(gm: fx.GraphModule, feature_fills: dict) -> dict[fx.Node, list[fx.Node]]:
    """Fresh tensors filled part by part through basic-index writes (:func:`_slice_writes`) along
    any axes, as Lumina 2 builds its joint sequence (``joint = x.new_zeros(B, L, C); joint[0, :n] =
    text; joint[0, n:n + N] = image``), mapped to those writes in graph order; the same conditions
    as :func:`_feature_fills` (nothing sees the tensor before the last write), which takes
    precedence. :meth:`LayoutAnalysis._token_fill` decides what the filled tensor holds."""
    basic = set(_slice_writes(gm))
    return _fresh_fills(gm, lambda node: [] if node in feature_fills else [
        u for u in node.users if u in basic and u.args[0] is node])


def _fresh_fills(gm: fx.GraphModule, writes_into) -> dict[fx.Node, list[fx.Node]]:
    """Fresh tensors (``FRESH_TENSORS``) whose every user other than the writes ``writes_into(node)``
    finds comes after the last of them and writes nothing, mapped to those writes in graph order."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    fills = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or op_name(node, gm) not in FRESH_TENSORS:
            continue
        writes = writes_into(node)
        if not writes:
            continue
        last = max(order[w] for w in writes)
        others = [u for u in node.users if u not in writes]
        if all(order[u] > last and not mutates(u) for u in others):
            fills[node] = sorted(writes, key=order.get)
    return fills


def _slice_writes(gm: fx.GraphModule) -> list[fx.Node]:
    """``x[index] = value`` with basic indexing (slices, ints, Ellipsis) and a tensor value: CogView4
    writes its rotary embedding into the image part of q that way
    (``q[:, :, text:, :] = rope(q[:, :, text:, :])``). Such a write keeps x's layout when the value
    is laid out as ``x[index]`` is; :class:`LayoutAnalysis` checks that and counts the write as any
    other where it fails."""
    writes = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not operator.setitem or len(node.args) != 3:
            continue
        dest, index, value = node.args
        parts = index if isinstance(index, tuple) else (index,)
        basic = all(p is Ellipsis or isinstance(p, (int, slice)) and not isinstance(p, bool) for p in parts)
        if isinstance(dest, fx.Node) and isinstance(value, fx.Node) and basic and all(
                not isinstance(b, fx.Node) for p in parts if isinstance(p, slice) for b in (p.start, p.stop, p.step)):
            writes.append(node)
    return writes


def _written_tensors(gm: fx.GraphModule, skip=frozenset()) -> dict[fx.Node, fx.Node]:
    """Every node whose tensor (or an alias of it) some op writes into in a way that can move
    values between positions, mapped to that op. In-place pointwise ops (``x.add_(y)``,
    ``x.mul_(s)``, ``relu_``) keep every value at its position and are left to the transfer, and so
    are the fills of fresh tensors along trailing axes in ``skip`` (:func:`_feature_fills`)."""
    writers = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or not mutates(node) or node in skip:
            continue
        name = op_name(node, gm)
        dests = written_args(node)
        if name in KEEPS_POSITIONS and dests == [node.args[0]] and "out" not in node.kwargs:
            continue
        for dest in dests:
            writers.setdefault(dest, node)
    return _alias_closure(gm, writers, {})


def _alias_closure(gm, writers: dict, known: dict) -> dict[fx.Node, fx.Node]:
    """Spread each written node's writer over its whole alias class (views share storage)."""
    if not writers:
        return dict(known)
    classes = _alias_classes(gm)
    by_class = {}
    for dest, writer in writers.items():
        by_class.setdefault(classes.get(dest, dest), writer)
    out = dict(known)
    for node, rep_ in classes.items():
        if rep_ in by_class:
            out.setdefault(node, by_class[rep_])
    return out

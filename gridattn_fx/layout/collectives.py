"""Token positions through the sequence split and the all-to-all of context parallelism.

Context-parallel engines (diffusers' ``enable_parallelism``, xDiT, DeepSpeed's Ulysses) give each
rank one contiguous chunk of the token sequence: ``x.chunk(P, dim)[rank]``, a Tokens fact with
``shard=(rank, P)``. Before attention, Ulysses exchanges chunks with an all-to-all so that every
rank holds the whole sequence for 1/P of the heads, and exchanges back after it. Between the two
ends the tokens are spread over several axes of flattened views: ``(B, S/P, H, D)`` reshaped to
``(B, S/P, P, H/P, D)``, permuted to ``(P, S/P, B, H/P, D)``, flattened, exchanged, reshaped and
merged again. :class:`Scattered` follows them there.

A Scattered fact lists, for every tensor axis, its *virtual axes* in row-major order:
``(size, token weight, feature weight, indexes images)``. An element's token is the sum of index x
token weight over the virtual axes, and its feature (the row-major index over the other axes of the
tensor it was scattered from: heads and channels) the sum of index x feature weight; this rank's
index in the process group contributes through ``rank``, virtual axes of its own. Views regroup
virtual axes (splitting one where a new axis boundary falls inside it), permutes reorder tensor
axes, and ``all_to_all_single`` with equal splits over P ranks swaps the leading virtual axes of
the flat tensor (the block sent to rank i) with the rank's: on rank r, block j of the result is
block r of rank j's input. That holds when every rank runs the same program on its own chunk
(SPMD), so the chunk index a graph baked in must equal the rank's index in the all-to-all's group:
checked here, at compile time, on every rank. Once the tokens sit on one axis again the fact is a
Tokens fact: the whole sequence, or this rank's chunk of it; in row-major order, or in the
group-major order of grid-group sharding (``Tokens.groups``: all tokens of grid group 0, then of
group 1, ..., each group's tokens row-major).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import torch

from ..ir.op_catalogue import PERMUTES, RESHAPES, permutation
from ..ir.ops import op_name
from ..ir.values import shape_of
from .facts import Tokens, _hint

# The functional collectives as they appear in Dynamo graphs and in ATen graphs.
ALL_TO_ALL = "all_to_all_single"
WAIT = "wait_tensor"


@dataclass(frozen=True)
class Scattered:
    tokens: Tokens        # the sequence the positions belong to (dim, batch, shard, groups, partial unused)
    axes: tuple           # per tensor axis: ((size, token weight, feature weight, indexes images), ...)
    rank: tuple = ()      # virtual axes of this rank's group index ((size, token w, feature w, False), ...)
    rank_index: tuple = ()  # (index, count): the group index ``rank`` assumes
    partial: bool = False   # holds this rank's block of a non-token axis (the heads, after Ulysses)
    rank_group: object = None  # the process group an exchange made ``rank`` in (None: a chunk's index)


# --- token orders ---------------------------------------------------------------------------------

def canonical(virtual) -> tuple:
    """Virtual axes with size-1 axes dropped and neighbours that index contiguously merged."""
    out = []
    for n, tw, fw, b in virtual:
        if n == 1:
            continue
        if out:
            pn, ptw, pfw, pb = out[-1]
            if pb == b and fw is not None and pfw is not None and ptw == tw * n and pfw == fw * n:
                out[-1] = (pn * n, tw, fw, b)
                continue
        out.append((n, tw, fw, b))
    return tuple(out)


def group_major(image_shape, strides) -> tuple:
    """The virtual token axes of grid-group order: residues (the group) outermost, then row-major."""
    weights = [math.prod(image_shape[a + 1:]) for a in range(len(image_shape))]
    residues = [(g, w, 0, False) for g, w in zip(strides, weights)]
    quotients = [(n // g, w * g, 0, False) for n, g, w in zip(image_shape, strides, weights)]
    return canonical(residues + quotients)


def group_major_axes(image_shape, strides) -> tuple[list, list]:
    """(split, axes): a row-major image's tokens reshaped to ``split`` (each axis as (n / g, g)) and
    permuted by ``axes`` (the residues, i.e. the group, outermost) are in grid-group order, the
    order :func:`group_major` describes."""
    k = len(image_shape)
    split = [s for n, g in zip(image_shape, strides) for s in (n // g, g)]
    return split, [2 * a + 1 for a in range(k)] + [2 * a for a in range(k)]


def grouped_by(fact: Tokens, strides) -> bool:
    """Whether ``fact``'s tokens are in the group-major order of grid stride ``strides``."""
    return bool(fact.groups) and len(strides) == fact.rank and fact.groups == group_major(fact.image_shape, strides)


def _order_of(fact: Tokens, virtual) -> tuple | None:
    """``()`` when ``virtual`` (the whole sequence's token axes) is row-major, the canonical list when
    it is the group-major order of some grid stride, None otherwise."""
    virtual = canonical(virtual)
    total = total_tokens(fact)
    if virtual == canonical([(total, 1, 0, False)]):
        return ()
    if _hint(fact.prefix) or _hint(fact.suffix) or not all(isinstance(n, int) for n in fact.image_shape):
        return None
    if tuple(fact.order) != tuple(range(fact.rank)):
        return None  # the weights count sequence places; groups are read off a row-major image only
    # proper divisors: a stride as large as its axis would read a transposed order as groups
    options = [[g for g in range(1, n) if n % g == 0] or [1] for n in fact.image_shape]
    for strides in itertools.product(*options):
        if virtual == group_major(fact.image_shape, strides):
            return virtual
    return None


def total_tokens(fact: Tokens) -> int | None:
    sizes = [_hint(s) for s in (fact.prefix, *fact.image_shape, fact.suffix)]
    return None if any(s is None for s in sizes) else sizes[0] + sizes[-1] + math.prod(sizes[1:-1])


# --- the algebra -----------------------------------------------------------------------------------

def scatter(fact: Tokens, shape) -> Scattered | None:
    """A Tokens fact as a Scattered one (static sizes only); features are numbered row-major over
    the axes that are neither the token axis nor image axes."""
    sizes = [_hint(s) for s in shape]
    total = total_tokens(fact)
    if fact.lead or total is None or any(not isinstance(s, int) for s in sizes):
        return None
    order = list(fact.groups) if fact.groups else [(total, 1, 0, False)]
    rank = ()
    if fact.shard:
        index, count = fact.shard
        split = _split_front(order, count)
        if split is None:
            return None
        rank, order = split
        rank = tuple(rank)
    if math.prod(n for n, *_ in order) != sizes[fact.dim]:
        return None
    feature_axes = [d for d in range(len(sizes)) if d != fact.dim and d not in fact.batch]
    fweight = {d: math.prod(sizes[e] for e in feature_axes if e > d) for d in feature_axes}
    axes = tuple(tuple(order) if d == fact.dim else ((n, 0, fweight.get(d, 0), d in fact.batch),)
                 for d, n in enumerate(sizes))
    base = replace(fact, dim=0, batch=(), shard=(), partial=False)
    # a share of the heads already: which share this rank holds is not known from here
    rank_unknown = ((1, 0, None, False),) if fact.partial else ()
    return Scattered(base, axes, rank or rank_unknown, fact.shard, fact.partial)


def _split_front(virtual, size):
    """Split a virtual-axis list into a leading part of product ``size`` and the rest (or None)."""
    rest, front, have = list(virtual), [], 1
    while have < size:
        if not rest:
            return None
        n, tw, fw, b = rest.pop(0)
        need = size // have
        if size % have or (n % need and need % n):
            return None
        if n <= need:
            front.append((n, tw, fw, b))
            have *= n
        else:
            front.append((need, tw * (n // need), None if fw is None else fw * (n // need), b))
            rest.insert(0, (n // need, tw, fw, b))
            have *= need
    return (front, rest) if have == size else None


def permute(fact: Scattered, perm) -> Scattered:
    return replace(fact, axes=tuple(fact.axes[p] for p in perm))


def view(fact: Scattered, out_shape) -> Scattered | None:
    """A row-major reshape: regroup the virtual axes, splitting one where an output axis ends inside it."""
    out = [_hint(s) for s in out_shape]
    pending = [v for axis in fact.axes for v in axis if v[0] != 1]
    if any(not isinstance(s, int) for s in out) or math.prod(out) != math.prod(v[0] for v in pending):
        return None
    groups = []
    for size in out:
        split = _split_front(pending, size)
        if split is None:
            return None
        group, pending = split
        groups.append(tuple(group) or ((1, 0, 0, False),))
    return replace(fact, axes=tuple(groups)) if not pending else None


def exchange(fact: Scattered, group_size: int, group_rank: int, group=None) -> Scattered | None:
    """``all_to_all_single`` with equal splits on a 1-D tensor over ``group_size`` ranks of ``group``."""
    if len(fact.axes) != 1:
        return None
    rank_tokens = any(tw for _, tw, _, _ in fact.rank)
    if math.prod(n for n, *_ in fact.rank) > 1 and (
            fact.rank_index != (group_rank, group_size) or fact.rank_group not in (None, group)):
        # the chunk this graph holds is not its rank's, or the share it holds is another group's:
        # what the other ranks send is unknown
        return None
    split = _split_front(list(fact.axes[0]), group_size)
    if split is None:
        return None
    front, rest = split
    if any(b for *_, b in front):
        return None
    front_tokens = any(tw for _, tw, _, _ in front)
    if rank_tokens and front_tokens:
        partial = fact.partial                 # chunks of tokens traded for chunks of tokens
    elif rank_tokens and not fact.partial:
        partial = True                         # tokens gathered, a block of another axis kept (Ulysses: heads)
    elif front_tokens and fact.partial:
        partial = False                        # and back: tokens split again, the other axis whole
    else:
        return None
    # the leading axes now index the source rank, which held its own rank's share
    incoming = fact.rank if fact.rank and math.prod(n for n, *_ in fact.rank) == group_size else (
        (group_size, 0, None, False),)
    return Scattered(fact.tokens, (tuple(incoming) + tuple(rest),), tuple(front), (group_rank, group_size), partial,
                     group)


def gathered(fact: Scattered) -> Tokens | None:
    """The Tokens fact, once the tokens sit on one tensor axis (with any image axes elsewhere)."""
    carrying = [d for d, axis in enumerate(fact.axes) if any(tw for _, tw, _, _ in axis)]
    if len(carrying) != 1:
        return None
    dim = carrying[0]
    local = list(fact.axes[dim])
    if any(fw != 0 or b for _, _, fw, b in local):
        return None  # tokens merged with features or images on one axis
    rank_tokens = [v for v in fact.rank if v[1]]
    if rank_tokens and (len(rank_tokens) != len([v for v in fact.rank if v[0] != 1]) or any(v[2] for v in rank_tokens)):
        return None  # the rank picks tokens and something else at once
    order = _order_of(fact.tokens, [*rank_tokens, *local])
    if order is None:
        return None
    batch = []
    for d, axis in enumerate(fact.axes):
        if d == dim:
            continue
        flags = {b for n, _, _, b in axis if n != 1}
        if len(flags) > 1:
            return None  # images merged with non-image entries on one axis
        if flags == {True}:
            batch.append(d)
    shard = fact.rank_index if rank_tokens else ()
    return replace(fact.tokens, dim=dim, batch=tuple(batch), shard=shard, groups=order, partial=fact.partial)


def same_elements(a: Scattered, b: Scattered) -> bool:
    """Whether two Scattered facts put the same token and feature at every index (features known)."""
    if len(a.axes) != len(b.axes):
        return False
    known = all(fw is not None for axes in (*a.axes, *b.axes, a.rank, b.rank) for _, _, fw, _ in axes)
    return known and all(canonical(x) == canonical(y) for x, y in zip(a.axes, b.axes)) and (
        canonical(a.rank) == canonical(b.rank)) and a.rank_index == b.rank_index


# --- reading the graph -------------------------------------------------------------------------------

def movement_name(node, gm) -> str | None:
    """The name of a view, value-preserving op or all-to-all a node calls (what :func:`follow_node`
    follows), else None."""
    name = collective_name(node) or op_name(node, gm)
    moves = name is not None and (name in RESHAPES or name in PERMUTES or name in SAME_VALUES or name == ALL_TO_ALL)
    return name if moves and node.args and isinstance(node.args[0], torch.fx.Node) else None


def follow_node(fact: Scattered, node, gm) -> Scattered | None:
    """The fact of ``node``'s output from the fact of its first input (None: not followed)."""
    name = movement_name(node, gm)
    if name is None:
        return None
    src = node.args[0]
    perm = permutation(node, name, len(shape_of(src))) if name in PERMUTES else None
    return follow(fact, name, node, shape_of(src), shape_of(node), perm)


def follow(fact: Scattered, name: str, node, in_shape, out_shape, permutation=None) -> Scattered | None:
    """One view or collective applied to a Scattered fact (None: not followed)."""
    if name in SAME_VALUES:
        return fact
    if permutation is not None:
        return permute(fact, permutation)
    if name == ALL_TO_ALL:
        name = node.args[3] if len(node.args) > 3 else node.kwargs.get("group_name")
        group = group_of(name)
        numel = math.prod(_hint(s) for s in in_shape)
        if group is None or not equal_splits(node, numel, group[0]):
            return None
        return exchange(fact, *group, group=name)
    return view(fact, out_shape)


# Ops that pass a tensor's values on unchanged.
SAME_VALUES = frozenset({"contiguous", "clone", "detach", "alias", WAIT})


def group_of(name) -> tuple[int, int] | None:
    """(size, this rank's index) of the process group a functional collective names."""
    try:
        from torch.distributed.distributed_c10d import _resolve_process_group

        group = _resolve_process_group(name)
        return group.size(), group.rank()
    except Exception:  # no process group of that name in this process: nothing is proven
        return None


def equal_splits(node, numel: int, group_size: int) -> bool:
    """``all_to_all_single(x, output_split_sizes, input_split_sizes, group)`` with equal blocks."""
    if numel % group_size:
        return False
    for splits in node.args[1:3]:
        if splits is None:
            continue
        sizes = [_hint(s) if not isinstance(s, torch.fx.Node) else None for s in splits]
        if len(sizes) != group_size or any(s != numel // group_size for s in sizes):
            return False
    return True


def collective_name(node) -> str | None:
    """The name of a functional collective a node calls (``torch.ops._c10d_functional.*``, as an
    overload or the packet Dynamo records), else None."""
    target = getattr(node, "target", None)
    if isinstance(target, torch._ops.OpOverload):
        target = target.overloadpacket
    if isinstance(target, torch._ops.OpOverloadPacket) and target._qualified_op_name.startswith("_c10d_functional::"):
        return target._qualified_op_name.split("::", 1)[1]
    return None


def is_from_local(node) -> bool:
    """Whether ``node`` is ``DTensor.from_local`` as Dynamo records it."""
    return (isinstance(node, torch.fx.Node) and node.op == "call_function"
            and getattr(node.target, "__name__", "") == "from_local"
            and str(getattr(node.target, "__module__", "")).startswith("torch.distributed.tensor"))


def dtensor_step(node, fact) -> Tokens | None:
    """torch's context parallelism wraps each rank's q, k, v as a DTensor sharded along the tokens
    (``DTensor.from_local(x, mesh, [Shard(d)])``) and unwraps the result (``.to_local()``). A DTensor
    with one Shard placement on a 1-D mesh is its ranks' local tensors concatenated in mesh order
    along ``d``: ``from_local`` of this rank's chunk (index = its mesh rank) is the whole sequence,
    ``to_local`` of the whole sequence is this rank's chunk. None for anything else."""
    if is_from_local(node):
        wrapped, local, gathering = node.meta.get("example_value"), node.args[0], True
    elif node.op == "call_method" and node.target == "to_local" and isinstance(node.args[0], torch.fx.Node):
        wrapped, local, gathering = node.args[0].meta.get("example_value"), node, False
    elif node.op == "call_method" and node.target == "redistribute" and isinstance(fact, Tokens) and not fact.shard:
        return fact  # another placement of the same global values
    else:
        return None
    mesh, placements = getattr(wrapped, "device_mesh", None), getattr(wrapped, "placements", None)
    local_shape = shape_of(local)
    if (not isinstance(fact, Tokens) or fact.partial or fact.lead or mesh is None or mesh.ndim != 1
            or placements is None or len(placements) != 1 or not placements[0].is_shard() or local_shape is None):
        return None
    axis, rank, world = placements[0].dim % wrapped.dim(), mesh.get_local_rank(), mesh.size()
    if fact.dim != axis or _hint(wrapped.shape[axis]) != _hint(local_shape[axis]) * world:
        return None  # not the token axis, or not P equal chunks
    if gathering:
        return replace(fact, shard=()) if tuple(fact.shard) == (rank, world) else None
    return replace(fact, shard=(rank, world)) if not fact.shard else None

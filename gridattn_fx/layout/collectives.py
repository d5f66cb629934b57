"""Token positions through the sequence split and the all-to-all of context parallelism.

Context-parallel engines (diffusers' ``enable_parallelism``, xDiT, DeepSpeed's Ulysses) give each
rank one contiguous chunk of the token sequence: ``x.chunk(P, dim)[rank]``, a Tokens fact with
``shard=(rank, P)``. Before attention, Ulysses exchanges chunks with an all-to-all so that every
rank holds the whole sequence for 1/P of the heads, and exchanges back after it. Between the two
ends the tokens are spread over several axes of flattened views: ``(B, S/P, H, D)`` reshaped to
``(B, S/P, P, H/P, D)``, permuted to ``(P, S/P, B, H/P, D)``, flattened, exchanged, reshaped and
merged again. :class:`Scattered` follows them there.

A Scattered fact lists, for every tensor axis, its *virtual axes* in row-major order: (size, token
weight, indexes images), where a token's offset in the whole sequence is the sum of index x weight
over the virtual axes, plus this rank's index in the process group times ``rank_weight``. Views
regroup virtual axes (splitting one where a new axis boundary falls inside it), permutes reorder
tensor axes, and ``all_to_all_single`` with equal splits over P ranks swaps the first virtual axis
(the block sent to rank i) with the rank: on rank r, block j of the result is block r of rank j's
input. That holds when every rank runs the same program on its own chunk (SPMD), so the chunk index
a graph baked in must equal the rank's index in the all-to-all's group: checked here, at compile
time, on every rank. Once the tokens sit on one axis again with weight 1 the fact is a Tokens fact:
the whole sequence (weight 0 on the rank), or the rank's chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .facts import Tokens, _hint

# The functional collectives as they appear in Dynamo graphs and in ATen graphs.
ALL_TO_ALL = "all_to_all_single"
WAIT = "wait_tensor"


@dataclass(frozen=True)
class Scattered:
    tokens: Tokens       # the sequence the positions belong to (its ``dim``, ``batch`` and ``shard`` unused)
    axes: tuple          # per tensor axis: ((size, token weight, indexes images), ...)
    rank_weight: int     # token offset per unit of this rank's group index
    rank: tuple = ()     # (index, count): the group index the rank weight assumes
    partial: bool = False  # holds this rank's block of a non-token axis (heads, after Ulysses)


def total_tokens(fact: Tokens) -> int | None:
    sizes = [_hint(s) for s in (fact.prefix, *fact.image_shape, fact.suffix)]
    return None if any(s is None for s in sizes) else sum(sizes[:1] + sizes[-1:]) + math.prod(sizes[1:-1])


def scatter(fact: Tokens, shape) -> Scattered | None:
    """A Tokens fact as a Scattered one (static sizes only)."""
    sizes = [_hint(s) for s in shape]
    if fact.lead or any(not isinstance(s, int) for s in sizes) or any(
            not isinstance(s, int) for s in (fact.prefix, fact.suffix, *fact.image_shape)):
        return None
    total = total_tokens(fact)
    chunk = sizes[fact.dim]
    if fact.shard:
        index, count = fact.shard
        if chunk * count != total:
            return None
        rank_weight = chunk
    elif chunk != total:
        return None
    else:
        rank_weight = 0
    axes = tuple(((n, 1 if d == fact.dim else 0, d in fact.batch),) for d, n in enumerate(sizes))
    return Scattered(replace(fact, dim=0, batch=(), shard=(), partial=False), axes, rank_weight,
                     fact.shard, fact.partial)


def permute(fact: Scattered, perm) -> Scattered:
    return replace(fact, axes=tuple(fact.axes[p] for p in perm))


def view(fact: Scattered, out_shape) -> Scattered | None:
    """A row-major reshape: regroup the virtual axes, splitting one where an output axis ends inside it."""
    out = [_hint(s) for s in out_shape]
    virtual = [v for axis in fact.axes for v in axis if v[0] != 1]
    if any(not isinstance(s, int) for s in out) or math.prod(out) != math.prod(v[0] for v in virtual):
        return None
    groups, pending = [], list(virtual)
    for size in out:
        group, have = [], 1
        while have < size:
            if not pending:
                return None
            n, w, b = pending.pop(0)
            if size % (have * n) == 0:
                group.append((n, w, b))
                have *= n
                continue
            need = size // have
            if size % have or n % need:
                return None  # an output axis boundary no virtual axis can be split at
            group.append((need, w * (n // need), b))
            pending.insert(0, (n // need, w, b))
            have *= need
        groups.append(tuple(group) or ((1, 0, False),))
    return replace(fact, axes=tuple(groups)) if not pending else None


def exchange(fact: Scattered, group_size: int, group_rank: int) -> Scattered | None:
    """``all_to_all_single`` with equal splits on a 1-D tensor over ``group_size`` ranks."""
    if len(fact.axes) != 1:
        return None
    if fact.rank_weight and fact.rank != (group_rank, group_size):
        return None  # the chunk this graph holds is not its rank's: other ranks' blocks are unknown
    numel = _numel(fact)
    split = view(fact, (group_size, numel // group_size)) if numel % group_size == 0 else None
    if split is None or len(split.axes[0]) != 1:
        return None
    (n, w, is_batch), = split.axes[0]
    if is_batch:
        return None
    if fact.rank_weight and w:
        partial = fact.partial                 # chunks of tokens traded for chunks of tokens
    elif fact.rank_weight and not fact.partial:
        partial = True                         # tokens gathered, a block of another axis kept (Ulysses: heads)
    elif w and fact.partial:
        partial = False                        # and back: tokens split again, the other axis whole
    else:
        return None
    first = ((n, fact.rank_weight, False),)
    return Scattered(fact.tokens, (first, split.axes[1]), w, (group_rank, group_size) if w else (), partial)


def _numel(fact: Scattered) -> int:
    return math.prod(n for axis in fact.axes for n, _, _ in axis)


def gathered(fact: Scattered) -> Tokens | None:
    """The Tokens fact, once the tokens sit on one tensor axis with weight 1 (row-major within it)."""
    carrying = [d for d, axis in enumerate(fact.axes) if any(w for _, w, _ in axis)]
    if len(carrying) != 1:
        return None
    dim = carrying[0]
    stride = 1
    for n, w, is_batch in reversed(fact.axes[dim]):
        if w != stride or is_batch:
            return None
        stride *= n
    total = total_tokens(fact.tokens)
    if fact.rank_weight == 0 and stride == total:
        shard = ()
    elif fact.rank_weight == stride and fact.rank and stride * fact.rank[1] == total:
        shard = fact.rank
    else:
        return None
    batch = []
    for d, axis in enumerate(fact.axes):
        if d == dim:
            continue
        flags = {b for n, _, b in axis if n != 1}
        if len(flags) > 1:
            return None  # images merged with non-image entries on one axis
        if flags == {True}:
            batch.append(d)
    return replace(fact.tokens, dim=dim, batch=tuple(batch), shard=shard, partial=fact.partial)


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

"""Grid-group sharding: a gridded site runs on this rank's own grid groups, without collectives.

Under ``gridattn_fx.context_parallel(model, config, group_stride=G)`` the tokens are in group-major
order before the engine's contiguous split, so each of the P ranks holds whole grid groups (P
divides the number of groups). Ulysses still wraps every attention in an all-to-all pair: it
gathers the sequence for a share of the heads, attends, and scatters back. At a site gridded with
the sharding's own stride every group lies on one rank, so the pair is useless: the site becomes
attention within each contiguous block of N/G tokens of the rank's chunk, for all heads, and the
all-to-alls around it leave the graph.

The replacement is proven, not assumed: from each of q, k and v the chain back to the rank's chunk
(views and exactly one all-to-all) is replayed on the chunk's Scattered fact (layout/collectives.py),
which tracks every element's token and feature (head, channel); so is the chain from the output to
the tensor that comes back in the chunk's layout. The site is replaced only when that tensor holds,
at every index, the same token and feature as the query chunk, and q, k and v reach the attention
the same way: then the engine computes, per element of the chunk, exactly what the local attention
computes. Anything else keeps the engine's exchange (dense, exact in any token order).

Under torch's context parallelism (``gridattn_fx.GroupSharding``) there is no exchange to replay:
q, k and v are this rank's chunks wrapped as DTensors (``from_local``) and the output is unwrapped
(``to_local``); the layout analysis states the chunk on both sides, so equal facts prove the local
form (:func:`_plan_dtensor`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.fx as fx

from ..grid import format_stride, normalize_stride
from ..ir.values import shape_of as _shape
from ..layout.collectives import (
    ALL_TO_ALL,
    follow_node,
    grouped_by,
    is_from_local,
    movement_name,
    same_elements,
    scatter,
)
from ..layout.facts import Tokens, _hint, _positions


class GroupOrderError(ValueError):
    """The model computes something else in group-major order: raised through the backend's safety
    net, since running the graph unmodified would be as wrong as rewriting it."""


@dataclass
class LocalGroups:
    """A site that runs on this rank's groups: the chunks q0, k0, v0 (B, L, H, D), the node whose
    value the local attention replaces, the tokens per group and the nodes that become dead."""

    chunks: tuple
    end: fx.Node
    group_tokens: int
    stride: tuple
    nodes: list
    flops_before: int
    flops_after: int
    token_axis: int = 1                                 # (B, L, H, D) chunks; 2: (B, H, L, D)
    exchange: str = "the all-to-all pair around it"     # what the replacement leaves out


def _chain_back(node: fx.Node, facts: dict, gm) -> tuple[fx.Node, list] | None:
    """From an attention input back through views and collectives to the earliest tensor that is
    this rank's chunk as (batch, tokens, heads, features): (chunk, the movement nodes in order)."""
    chain, found = [], None
    while True:
        fact = facts.get(node)
        if (isinstance(fact, Tokens) and fact.shard and fact.groups and not fact.partial and fact.dim == 1
                and len(_shape(node)) == 4):
            found = (node, chain[::-1])
        if node.op not in ("call_function", "call_method") or movement_name(node, gm) is None:
            return found
        chain.append(node)
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return found


def _chain_forward(node: fx.Node, facts: dict, gm, shape) -> tuple[fx.Node, list] | None:
    """From the attention output to the first tensor back in the chunk's layout (single users only)."""
    chain = []
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None
        user = users[0]
        if user.op not in ("call_function", "call_method") or movement_name(user, gm) is None or user.args[0] is not node:
            return None
        chain.append(user)
        fact = facts.get(user)
        if isinstance(fact, Tokens) and fact.shard and fact.groups and not fact.partial and tuple(
                _hint(s) for s in _shape(user)) == shape:
            return user, chain
        node = user


def _replay(spread, chain, gm):
    for node in chain:
        spread = follow_node(spread, node, gm)
        if spread is None:
            return None
    return spread


def check_group_order(site, layouts, path: str) -> None:
    """Raise GroupOrderError for a site that runs on tokens in group-major order (grid-group
    sharding) and has a token order of its own: a causal flag, or a mask or bias written for the
    model's order, would apply to other token pairs. Every other attention is exact in any order."""
    facts = (layouts.facts.get(site.query), layouts.facts.get(site.key))
    if not any(isinstance(f, Tokens) and f.groups for f in facts):
        return
    if site.is_causal or site.mask_shape is not None or site.relpos is not None or len(site.inputs) != 3:
        what = "causal" if site.is_causal else "masked (attn_mask or position bias)"
        raise GroupOrderError(
            f"gridattn: attention site '{path}' is {what} and runs on tokens that grid-group sharding "
            "(context_parallel(..., group_stride=...) or GroupSharding) put in group-major order: its mask "
            "would apply to other token pairs than the model's. Run this model without grid-group sharding.")


def plan_local_groups(site, layouts, config, path: str) -> LocalGroups | str | None:
    """The local plan of a site whose inputs are a group-sharded exchange, a reason why such a site
    keeps the exchange, or None for any other site."""
    facts, gm = layouts.facts, layouts.gm
    q_fact = facts.get(site.query)
    if not (isinstance(q_fact, Tokens) and q_fact.groups and not q_fact.shard):
        return None
    if site.form != "sdpa" or site.dropout_p or site.enable_gqa:
        return "a grouped site that is not plain SDPA (dropout or GQA): the engine's exchange is kept"
    left_out = config.left_out(path)
    if left_out:
        return left_out + " (the engine's exchange is kept)"
    tokens = q_fact.image_tokens
    if tokens < config.min_image_tokens:  # as the policy's rule for any site
        return (f"{tokens} image tokens < min_image_tokens={config.min_image_tokens}"
                f"{config.credit('min_image_tokens')} (the engine's exchange is kept)")
    grouping, _ = config.grouping_for(path)
    pool, _ = config.site_value("shared_pool", path)
    if grouping != "grid" or pool:
        return (f"grid-group sharding runs the grid grouping only (this site asks for {grouping!r}"
                f"{f', shared_pool={pool}' if pool else ''}): the engine's exchange is kept (dense)")
    configured, _ = config.stride_for(path)
    stride = normalize_stride(configured, q_fact.rank)
    if all(g == 1 for g in stride) or not grouped_by(q_fact, stride):
        return (f"the tokens are in the group order of another stride than this site's {format_stride(stride)}: "
                "the engine's exchange is kept (dense)")
    other = layouts.same_image(site.query, site.key)
    if other is not None:
        return other + " (the engine's exchange is kept)"
    if all(is_from_local(n) for n in site.inputs):
        return _plan_dtensor(site, facts, stride)
    ends = [_chain_back(n, facts, gm) for n in site.inputs]
    if any(e is None for e in ends):
        return "q, k or v does not come from this rank's chunk through one all-to-all: the exchange is kept"
    chunks = tuple(anchor for anchor, _ in ends)
    shapes = [tuple(_hint(s) for s in _shape(a)) for a in chunks]
    if len(set(shapes)) != 1 or len({_positions(facts[a]) for a in chunks}) != 1:
        return "q, k and v chunks are not (batch, tokens, heads, features) of one shape: the exchange is kept"
    spreads = []
    for (anchor, chain) in ends:
        start = scatter(replace(facts[anchor], batch=facts[chunks[0]].batch), _shape(anchor))
        spreads.append(_replay(start, chain, gm) if start is not None else None)
        if sum(movement_name(n, gm) == ALL_TO_ALL for n in chain) != 1:
            return "q, k or v passes through more or fewer than one all-to-all: the exchange is kept"
    if any(s is None for s in spreads) or not (same_elements(spreads[0], spreads[1]) and same_elements(spreads[0], spreads[2])):
        return "q, k and v do not reach the attention the same way from their chunks: the exchange is kept"
    back = _chain_forward(site.output, facts, gm, shapes[0])
    if back is None:
        return "the output does not return to this rank's chunk through one all-to-all: the exchange is kept"
    end, out_chain = back
    done = _replay(spreads[0], out_chain, gm)
    home = scatter(facts[chunks[0]], _shape(chunks[0]))
    if done is None or home is None or not same_elements(done, home):
        return "the output comes back in another arrangement than the query chunk's: the exchange is kept"
    b, length, heads, d = shapes[0]
    groups = 1
    for g in stride:
        groups *= g
    count = facts[chunks[0]].shard[1]
    group_tokens = length * count // groups
    full = length * count
    before = 4 * b * (heads // count) * full * full * d   # per rank: its heads over the whole sequence
    after = 4 * b * heads * length * group_tokens * d
    nodes = [n for _, chain in ends for n in chain] + [site.output] + list(site.nodes) + out_chain[:-1]
    return LocalGroups(chunks, end, group_tokens, stride, nodes, before, after)


def _plan_dtensor(site, facts, stride) -> LocalGroups | str:
    """Under torch's context parallelism: SDPA over DTensors wrapped from this rank's chunks, the
    result unwrapped by ``to_local``. The layout analysis states those chunks (from_local / to_local,
    layout/collectives.py ``dtensor_step``), so equal facts prove the local form: q, k, v and the
    output are the same rank's whole groups, in the same order, on the same axis."""
    chunks = tuple(n.args[0] for n in site.inputs)
    chunk_facts = [facts.get(c) for c in chunks]
    if (not all(isinstance(f, Tokens) and f.shard and f.groups and not f.partial for f in chunk_facts)
            or len({_positions(f) for f in chunk_facts}) != 1):
        return "q, k and v are not this rank's chunks of one grid-group order: torch's exchange is kept (dense)"
    shapes = [tuple(_hint(s) for s in _shape(c)) for c in chunks]
    if len(set(shapes)) != 1 or len(shapes[0]) != 4 or chunk_facts[0].dim != 2:
        return "q, k and v are not (batch, heads, tokens, features) of one shape: torch's exchange is kept (dense)"
    end, dead = site.output, []
    while len(end.users) == 1 and next(iter(end.users)).op == "call_method" and next(iter(end.users)).target in (
            "redistribute", "to_local"):
        dead.append(end)
        end = next(iter(end.users))
    if (end.target != "to_local" or not isinstance(facts.get(end), Tokens)
            or _positions(facts[end]) != _positions(chunk_facts[0])):
        return "the output does not come back to the query's chunk through to_local: torch's exchange is kept (dense)"
    b, heads, length, d = shapes[0]
    count = chunk_facts[0].shard[1]
    group_tokens = length * count // math.prod(stride)
    before = 4 * b * heads * length * (length * count) * d   # per rank: its queries against every key
    after = 4 * b * heads * length * group_tokens * d
    return LocalGroups(chunks, end, group_tokens, stride, [*site.inputs, *dead, *site.nodes], before, after,
                       token_axis=2, exchange="torch's DTensor exchange (the all-gather of k and v, or ring)")


def local_grid_attention(q, k, v, group_tokens: int, scale=None, token_axis: int = 1):
    """Attention within each contiguous block of ``group_tokens`` tokens of (B, L, H, D) inputs
    (``token_axis=2``: (B, H, L, D) inputs and output)."""
    if token_axis == 2:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return local_grid_attention(q, k, v, group_tokens, scale).transpose(1, 2)
    b, length, heads, d = q.shape
    # blocks folded into the batch: a 4-D SDPA. On 5-D inputs permuted like these, inductor (torch
    # 2.13, CPU) returns the output with its axes in another order than eager's: wrong values here.
    blocks = [t.reshape(b * (length // group_tokens), group_tokens, t.shape[2], t.shape[3]).transpose(1, 2)
              for t in (q, k, v)]
    # The builtin, not F.scaled_dot_product_attention: torch's context parallelism replaces that
    # attribute with its DTensor wrapper, which would attend across the ranks' blocks again.
    out = torch._C._nn.scaled_dot_product_attention(*blocks, scale=scale)
    return out.transpose(1, 2).reshape(b, length, heads, v.shape[3])


def apply_local_groups(gm: fx.GraphModule, site, plan: LocalGroups) -> None:
    with gm.graph.inserting_after(plan.end):
        local = gm.graph.call_function(local_grid_attention,
                                       (*plan.chunks, plan.group_tokens, site.scale, plan.token_axis))
    plan.end.replace_all_uses_with(local)
    # the exchange's collectives and waits go too: nothing uses them any more. Users come after
    # what they use, so erasing from the last node back frees each node before it is reached.
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in sorted({plan.end, *plan.nodes}, key=position.__getitem__, reverse=True):
        if not node.users:
            gm.graph.erase_node(node)

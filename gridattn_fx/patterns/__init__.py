"""Attention-site patterns: each module finds one form of attention in an FX graph.

Every finder takes an ``fx.GraphModule`` and returns :class:`AttentionSite` objects; adding a new
form means adding a finder to :data:`FINDERS`, nothing downstream changes.
"""

import torch
import torch.fx as fx

from ..ir.graphs import subgraph_of
from .attention_ops import find_op_sites
from .manual import find_manual_sites
from .mha import find_mha_sites
from .sdpa import find_sdpa_sites
from .site import AttentionSite

FINDERS = (find_sdpa_sites, find_manual_sites, find_mha_sites, find_op_sites)


def find_attention_sites(gm):
    sites = []
    for finder in FINDERS:
        sites.extend(finder(gm))
    return sites + _sites_in_subgraphs(gm)


def _sites_in_subgraphs(gm: fx.GraphModule) -> list[AttentionSite]:
    """Attention inside a subgraph a higher-order op calls (activation checkpointing, flash-attn's
    forward inside its autograd.Function, ``wrap``): the pass rewrites top-level sites only, so each
    is reported, dense, against the higher-order op: never silently."""
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
            continue
        for arg in node.args:
            sub = subgraph_of(gm, arg)
            if sub is None:
                continue
            for inner in find_attention_sites(sub):
                why = (f"{inner.form} attention `{inner.output.name}` inside the subgraph of `{node.name}` "
                       f"({node.target.name()}): sites in higher-order subgraphs are not rewritten; left dense")
                sites.append(AttentionSite(form=inner.form, output=node, query=node, key=node, inputs=[], build=None,
                                           q_shape=inner.q_shape, k_shape=inner.k_shape, v_shape=inner.v_shape,
                                           nodes=[], unsupported=why))
    return sites


__all__ = ["AttentionSite", "FINDERS", "find_attention_sites"]

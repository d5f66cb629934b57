"""``F.scaled_dot_product_attention`` calls, at the torch level (Dynamo, fx.symbolic_trace) and
at the ATen level (torch.export)."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from .site import AttentionSite

_SDPA_TARGETS = {
    F.scaled_dot_product_attention,
    torch._C._nn.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
}
_POSITIONAL = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _arguments(node: fx.Node) -> dict:
    args = dict(_DEFAULTS)
    args.update(zip(_POSITIONAL, node.args))
    args.update(node.kwargs)
    return args


def find_sdpa_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _SDPA_TARGETS:
            continue
        a = _arguments(node)
        unsupported = None
        for name, kind in (("dropout_p", (int, float)), ("is_causal", bool), ("scale", (int, float, type(None))),
                           ("enable_gqa", bool)):
            if not isinstance(a[name], kind):
                unsupported = f"{name} is not a constant ({a[name]!r})"
        sites.append(AttentionSite(
            form="sdpa",
            output=node,
            query=a["query"],
            key=a["key"],
            value=a["value"],
            attn_mask=a["attn_mask"],
            dropout_p=float(a["dropout_p"]) if unsupported is None else 0.0,
            scale=None if a["scale"] is None or unsupported else float(a["scale"]),
            is_causal=bool(a["is_causal"]) if isinstance(a["is_causal"], bool) else False,
            enable_gqa=bool(a["enable_gqa"]) if isinstance(a["enable_gqa"], bool) else False,
            nodes=[node],
            unsupported=unsupported,
        ))
    return sites

"""``F.scaled_dot_product_attention`` calls, at the torch level (Dynamo, fx.symbolic_trace) and
at the ATen level (torch.export)."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..ir.values import shape_of, value_of
from .relpos_bias import call_plan_relpos, relpos_bias_terms, relpos_grid
from .site import AttentionSite, call_plan

_SDPA_TARGETS = {
    F.scaled_dot_product_attention,
    torch._C._nn.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
}
_POSITIONAL = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
_CONSTANT_KINDS = {"dropout_p": (int, float), "is_causal": bool, "scale": (int, float, type(None)),
                   "enable_gqa": bool}


def sdpa_arguments(node: fx.Node) -> dict:
    args = dict(_DEFAULTS)
    args.update(zip(_POSITIONAL, node.args))
    args.update(node.kwargs)
    return args


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _SDPA_TARGETS


def find_sdpa_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    sites = []
    for node in gm.graph.nodes:
        if not is_sdpa(node):
            continue
        a = sdpa_arguments(node)
        unsupported = next((f"{name} is not a constant ({a[name]!r})" for name, kind in _CONSTANT_KINDS.items()
                            if not isinstance(a[name], kind)), None)
        mask = a["attn_mask"]
        if mask is not None and not isinstance(mask, fx.Node):
            unsupported = f"attn_mask is not a tensor ({mask!r})"
        mask_value = value_of(mask) if isinstance(mask, fx.Node) else None
        if isinstance(mask, fx.Node) and mask_value is None:
            unsupported = ("attn_mask is a graph input that was None in the example inputs; "
                           "the graph may be called with a mask")
        inputs = [a["query"], a["key"], a["value"]] + ([mask] if mask is not None else [])
        build, form, relpos, matched = call_plan, "sdpa", None, [node]
        terms = relpos_bias_terms(mask) if mask_value is not None else None
        if terms is not None:
            # The mask is SAM's decomposed bias: regroup its two factors, never the L x L sum.
            inputs[3:] = list(terms)
            build, form, relpos = call_plan_relpos, "sdpa+relpos", relpos_grid(*terms)
            matched = [node, mask, mask.args[0]]
        ok = unsupported is None
        sites.append(AttentionSite(
            form=form,
            output=node,
            query=a["query"],
            key=a["key"],
            inputs=inputs,
            build=build,
            relpos=relpos,
            q_shape=shape_of(a["query"]),
            k_shape=shape_of(a["key"]),
            v_shape=shape_of(a["value"]),
            mask_shape=tuple(mask_value.shape) if mask_value is not None else None,
            mask_bool=mask_value is not None and mask_value.dtype == torch.bool,
            dropout_p=float(a["dropout_p"]) if ok else 0.0,
            scale=None if a["scale"] is None or not ok else float(a["scale"]),
            is_causal=a["is_causal"] is True,
            enable_gqa=a["enable_gqa"] is True,
            nodes=matched,
            unsupported=unsupported,
        ))
    return sites


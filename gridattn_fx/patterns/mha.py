"""``nn.MultiheadAttention``: Dynamo keeps it as one ``F.multi_head_attention_forward`` call.

The site is the whole call; its layouts are proven on the call's (sequence-first) query and key
inputs, since the in-projections keep token positions. The replacement expands the call into
its projections, head split, grid attention and output projection, so the grid applies to the
attention alone. Only the plain configuration is read (no bias_k/bias_v, no zero-attention,
no static keys, no key padding or attention mask); anything else is reported and skipped.
"""

from __future__ import annotations

import inspect
import operator

import torch.fx as fx
import torch.nn.functional as F

from ..ir.values import shape_of
from .site import AttentionSite

_MHA_PARAMS = list(inspect.signature(F.multi_head_attention_forward).parameters)


def _arguments(node: fx.Node) -> dict:
    args = {name: p.default for name, p in inspect.signature(F.multi_head_attention_forward).parameters.items()}
    args.update(zip(_MHA_PARAMS, node.args))
    args.update(node.kwargs)
    return args


def _unsupported(a: dict) -> str | None:
    for name in ("bias_k", "bias_v", "static_k", "static_v", "key_padding_mask", "attn_mask"):
        if a[name] is not None:
            return f"nn.MultiheadAttention with {name}"
    if a["add_zero_attn"] is not False:
        return "nn.MultiheadAttention with add_zero_attn"
    if a["is_causal"] is not False:
        return "causal nn.MultiheadAttention"
    if not isinstance(a["dropout_p"], (int, float)) or not isinstance(a["training"], bool):
        return "nn.MultiheadAttention with non-constant dropout/training"
    return None


def _build(num_heads: int, embed: int, separate: bool, has_in_bias: bool, has_out_bias: bool):
    def build(plan, implementation):
        attend = getattr(plan, implementation)

        def replacement(query, key, value, *params):
            params = list(params)
            if separate:
                wq, wk, wv = params[:3]
                del params[:3]
            else:
                wq, wk, wv = params.pop(0).chunk(3)
            bq = bk = bv = None
            if has_in_bias:
                bq, bk, bv = params.pop(0).chunk(3)
            w_out = params.pop(0)
            b_out = params.pop(0) if has_out_bias else None

            def heads(x, w, b):  # (L, B, E) -> (B * heads, L, E / heads)
                x = F.linear(x, w, b)
                return x.reshape(x.size(0), -1, embed // num_heads).transpose(0, 1)

            out = attend(heads(query, wq, bq), heads(key, wk, bk), heads(value, wv, bv))
            out = out.transpose(0, 1).reshape(query.size(0), -1, embed)
            return F.linear(out, w_out, b_out)

        return replacement

    return build


def find_mha_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not F.multi_head_attention_forward:
            continue
        a = _arguments(node)
        getitems = {u.args[1]: u for u in node.users if u.target is operator.getitem}
        unsupported = _unsupported(a)
        if 1 in getitems and getitems[1].users:
            unsupported = "nn.MultiheadAttention whose attention weights are used"
        if 0 not in getitems or len(node.users) != len(getitems):
            continue
        query, key, value = a["query"], a["key"], a["value"]
        q_in, k_in, v_in = shape_of(query), shape_of(key), shape_of(value)
        if q_in is None or len(q_in) != 3:  # unbatched (L, E) inputs: leave to the user
            continue
        heads = a["num_heads"]
        embed = a["embed_dim_to_check"]
        hd = embed // heads
        separate = a["use_separate_proj_weight"] is True
        in_weights = [a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]] if separate else [a["in_proj_weight"]]
        params = in_weights + ([a["in_proj_bias"]] if a["in_proj_bias"] is not None else []) + [a["out_proj_weight"]]
        params += [a["out_proj_bias"]] if a["out_proj_bias"] is not None else []
        sites.append(AttentionSite(
            form="nn.MultiheadAttention",
            output=getitems[0],
            query=query,
            key=key,
            query_dim=0,
            key_dim=0,
            inputs=[query, key, value] + params,
            build=_build(heads, embed, separate, a["in_proj_bias"] is not None, a["out_proj_bias"] is not None),
            q_shape=(q_in[1] * heads, q_in[0], hd),
            k_shape=(k_in[1] * heads, k_in[0], hd),
            v_shape=(v_in[1] * heads, v_in[0], hd),
            dropout_p=float(a["dropout_p"]) if a["training"] is True and unsupported is None else 0.0,
            nodes=[getitems[0], *([getitems[1]] if 1 in getitems else []), node],
            unsupported=unsupported,
        ))
    return sites


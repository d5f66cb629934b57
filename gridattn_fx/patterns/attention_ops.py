"""Attention kernels called as ops (flash-attn, diffusers' FA3 wrapper, FlexAttention): one table entry each.

PyTorch has no registry that says "this op is attention", so the table does. An entry names the
op (``namespace::name``, matched on ``OpOverload`` and ``OpOverloadPacket`` targets), the layout of
its q / k / v (``BLHD``: batch, tokens, heads, features; ``BHLD``: SDPA's), which element of its
tuple output is the attention output, and the names its schema gives to the arguments that change
what it computes (scale, causal, dropout, window, softcap, ALiBi, fp8 descales, ...). Arguments
are read by their schema names, so an entry needs no positions. An op whose sites can never be
rewritten (already sparse, quantised, packed sequences) says why in ``dense``.

A site is rewritten like an SDPA one: the replacement transposes BLHD tensors to SDPA's layout,
runs the plan's grouped (or masked) attention, and gives the output back contiguous in the op's
layout. Its other outputs (the softmax log-sum-exp, ...) are not produced by the grouped form: a
site whose other outputs are read stays dense with that reason. (Sites inside a higher-order op's
subgraph, such as flash-attn's forward under autograd, are reported by patterns/__init__.py.)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from ..ir.graphs import subgraph_of
from ..ir.ops import op_name
from ..ir.values import shape_of
from .site import AttentionSite


@dataclass(frozen=True)
class AttentionOp:
    name: str                      # "namespace::op"
    form: str                      # how the report names its sites
    layout: str = "BLHD"           # of q, k, v and the output: "BLHD" or "BHLD"
    q: str = "q"                   # schema names of the three tensors
    k: str = "k"
    v: str = "v"
    output: int = 0                # index of the attention output in the op's tuple result
    scale: str | None = None       # schema name of the softmax scale (None / absent: 1/sqrt(d))
    causal: str | None = None
    dropout: str | None = None
    window: tuple = ()             # (left, right) schema names; (-1, -1) is global attention
    softcap: str | None = None
    alibi: str | None = None
    # Arguments that must keep their default for the op to be plain softmax attention, with why.
    plain: dict = field(default_factory=dict)
    dense: str | None = None       # every site of this op stays dense, with this reason
    # A higher-order op has no schema: the names of its positional arguments, in order.
    positions: tuple = ()
    # Further conditions for plain attention: (call node, its arguments, graph module) -> why not, or None.
    check: Callable | None = None


_FP8 = "fp8 descaling (quantised attention): left dense"
_VARLEN = "variable-length packing: several sequences share one token axis; left dense"
# The block size torch gives the block mask of flex_attention(..., block_mask=None): one block over
# everything (torch.nn.attention.flex_attention._LARGE_SPARSE_BLOCK_SIZE).
_NO_BLOCK_MASK = 1 << 30


def _returned(sub: fx.GraphModule) -> fx.Node | None:
    out = sub.graph.output_node().args[0]
    return out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out


def _always_true(node) -> bool:
    """A mask_mod result that is True everywhere: ``new_ones`` / ``ones`` of dtype bool."""
    return (isinstance(node, fx.Node) and op_name(node) in ("new_ones", "ones")
            and node.kwargs.get("dtype") is torch.bool)


def _flex_plain(node: fx.Node, a: dict, gm: fx.GraphModule) -> str | None:
    """flex_attention is plain attention only without a score_mod (its subgraph returns the score
    as it is) and without a block mask (torch's empty block mask: one block over everything, and a
    mask_mod that is True everywhere)."""
    score_mod = subgraph_of(gm, a.get("score_mod"))
    placeholders = [n for n in score_mod.graph.nodes if n.op == "placeholder"] if score_mod else []
    if score_mod is None or not placeholders or _returned(score_mod) is not placeholders[0]:
        return "a score_mod changes the scores: left dense"
    block_mask = a.get("block_mask")
    mask_mod = subgraph_of(gm, block_mask[-1]) if isinstance(block_mask, tuple) and block_mask else None
    if (mask_mod is None or tuple(block_mask[-3:-1]) != (_NO_BLOCK_MASK, _NO_BLOCK_MASK)
            or not _always_true(_returned(mask_mod))):
        return "a block mask restricts which keys each query sees: left dense"
    return None


OPS = (
    AttentionOp("flash_attn::_flash_attn_forward", "flash-attn", scale="softmax_scale", causal="causal",
                dropout="dropout_p", window=("window_size_left", "window_size_right"), softcap="softcap",
                alibi="alibi_slopes"),
    AttentionOp("flash_attn::_flash_attn_varlen_forward", "flash-attn-varlen",
                dense="variable-length packing (cu_seqlens): several sequences share one token axis, and "
                      "which tokens form one image is not proven; left dense"),
    AttentionOp("_diffusers_flash_attn_3::_flash_attn_forward", "flash-attn-3 (diffusers)", scale="softmax_scale",
                causal="causal", softcap="softcap",
                plain={"qv": "an extra qv operand", "q_descale": _FP8, "k_descale": _FP8, "v_descale": _FP8,
                       "attention_chunk": "chunked (local) attention"}),
    *(AttentionOp(f"natten::{arch}fmha_forward", "natten-fmha", q="query", k="key", v="value", scale="scale",
                  causal="is_causal", plain={"cumulative_seqlen_Q": _VARLEN, "cumulative_seqlen_KV": _VARLEN})
      for arch in ("", "hopper_", "blackwell_")),
    *(AttentionOp(f"natten::{arch}na{rank}d_forward", "natten-na", q="query", k="key", v="value",
                  dense="neighborhood attention: already sparse (each query sees its own neighbourhood); left dense")
      for arch in ("", "hopper_", "blackwell_", "reference_") for rank in (1, 2, 3)),
    AttentionOp("higher_order::flex_attention", "flex", layout="BHLD", q="query", k="key", v="value",
                scale="scale", check=_flex_plain,
                positions=("query", "key", "value", "score_mod", "block_mask", "scale", "kernel_options",
                           "score_mod_other_buffers", "mask_mod_other_buffers")),
)
_BY_NAME = {op.name: op for op in OPS}


def op_entry(target) -> AttentionOp | None:
    """The table entry of a call target (an OpOverload or its OpOverloadPacket), if any."""
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target._qualified_op_name
    elif isinstance(target, torch._ops.HigherOrderOperator):
        name = f"higher_order::{target.name()}"
    else:
        return None
    return _BY_NAME.get(name)


def _schema(target):
    if isinstance(target, torch._ops.OpOverloadPacket):
        target = target.default
    return target._schema


def op_arguments(node: fx.Node, op: AttentionOp) -> dict:
    """Every argument of an op call by its schema name (defaults filled in)."""
    if op.positions:
        return {**dict(zip(op.positions, node.args)), **node.kwargs}
    values = {}
    for i, arg in enumerate(_schema(node.target).arguments):
        if i < len(node.args):
            values[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            values[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            values[arg.name] = arg.default_value
    return values


def _why_not_plain(op: AttentionOp, a: dict, node: fx.Node, gm: fx.GraphModule) -> str | None:
    """Why this call is not plain softmax attention the grid may restrict, or None."""
    if op.window and tuple(a.get(n, -1) for n in op.window) != (-1, -1):
        return (f"windowed attention (window_size=({a[op.window[0]]}, {a[op.window[1]]})): already local, "
                "left dense")
    if op.softcap and a.get(op.softcap) not in (0, 0.0, None):
        return f"softcapped scores (softcap={a[op.softcap]}): not plain softmax attention, left dense"
    if op.alibi and a.get(op.alibi) is not None:
        return "ALiBi slopes: a position-dependent bias the grouped form does not carry; left dense"
    if op.dropout and a.get(op.dropout) not in (0, 0.0, None):
        return f"dropout inside the op (dropout_p={a[op.dropout]}): left dense"
    for name, why in op.plain.items():
        if a.get(name) not in (None, 0, False):
            return f"{why} (`{name}`)"
    for role in ("q", "k", "v"):
        if not isinstance(a.get(getattr(op, role)), fx.Node):
            return f"its {role} is not a tensor of the graph"
    if op.scale and not isinstance(a.get(op.scale), (int, float, type(None))):
        return f"its softmax scale is not a constant ({a.get(op.scale)!r})"
    return op.check(node, a, gm) if op.check else None


def _transposed(op: AttentionOp, shape):
    """A shape in SDPA's convention (..., heads, tokens, features)."""
    if shape is None or op.layout == "BHLD":
        return shape
    return (*shape[:-3], shape[-2], shape[-3], shape[-1])


def _outputs(node: fx.Node, op: AttentionOp):
    """(the node holding the attention output, the other outputs' nodes that are read, every getitem)."""
    getitems = [u for u in node.users if u.op == "call_function" and u.target is operator.getitem]
    if len(getitems) != len(node.users):
        return None, [u for u in node.users if u not in getitems], getitems
    outs = [g for g in getitems if g.args[1] == op.output]
    read = [g for g in getitems if g.args[1] != op.output and g.users]
    return (outs[0] if len(outs) == 1 else None), read, getitems


def _replacement(op: AttentionOp):
    def build(plan, implementation):
        attend = getattr(plan, implementation)
        if op.layout == "BHLD":
            return attend

        def replacement(q, k, v):
            out = attend(q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2))
            return out.transpose(-3, -2).contiguous()  # the op's output is a contiguous BLHD tensor
        return replacement
    return build


def _site(node: fx.Node, op: AttentionOp, gm: fx.GraphModule) -> AttentionSite:
    a = op_arguments(node, op)
    q, k, v = (a.get(getattr(op, role)) for role in ("q", "k", "v"))
    output, read, getitems = _outputs(node, op)
    why = op.dense or _why_not_plain(op, a, node, gm)
    if why is None and read:
        why = (f"its other outputs are read ({', '.join(f'`{r.name}`' for r in read)}, e.g. the softmax "
               "log-sum-exp): the grouped form does not produce them; left dense")
    if why is None and output is None:
        why = "its attention output is not read through one index"
    seq = -3 if op.layout == "BLHD" else -2
    shapes = [_transposed(op, shape_of(x)) if isinstance(x, fx.Node) else None for x in (q, k, v)]
    if why is not None:
        anchor = output if output is not None else node
        return AttentionSite(form=op.form, output=anchor, query=anchor, key=anchor, inputs=[], build=None,
                             q_shape=shapes[0], k_shape=shapes[1], v_shape=shapes[2], nodes=[],
                             unsupported=why)
    scale = a.get(op.scale) if op.scale else None
    heads_q, heads_k = shapes[0][-3], shapes[1][-3]
    return AttentionSite(
        form=op.form, output=output, query=q, key=k, inputs=[q, k, v], build=_replacement(op),
        q_shape=shapes[0], k_shape=shapes[1], v_shape=shapes[2], query_dim=seq, key_dim=seq, value_dim=seq,
        scale=None if scale is None else float(scale), is_causal=bool(op.causal and a.get(op.causal)),
        enable_gqa=heads_q != heads_k, nodes=[output, *getitems, node])


def find_op_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    sites = []
    for node in gm.graph.nodes:
        op = op_entry(node.target) if node.op == "call_function" else None
        if op is not None:
            sites.append(_site(node, op, gm))
    return sites

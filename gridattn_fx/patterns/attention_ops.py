"""Attention kernels called as ops (flash-attn 2/3, xformers, NATTEN, SDPA's CUDA kernels, FlexAttention).

PyTorch has no registry that says "this op is attention", so the table does, one entry per op. An
entry names the op (``namespace::name``, matched on ``OpOverload`` and ``OpOverloadPacket``
targets), the layout of its q / k / v (``BLHD``: batch, tokens, heads, features; ``BHLD``: SDPA's),
which element of its tuple output is the attention output, and the names its schema gives to the
arguments that change what it computes (scale, causal, dropout, window, softcap, ALiBi, fp8
descales, packed sequences, KV caches, ...). Arguments are read by their schema names, so an entry
needs no positions; an argument the entry does not name and :data:`TUNING` does not list must keep
its schema default, or the site stays dense (a schema that grew an argument never has it ignored).
An op whose sites can never be rewritten (already sparse, packed sequences) says why in ``dense``.
An op missing from the table whose name says attention is reported dense, with that reason.

A site is rewritten like an SDPA one: the replacement transposes BLHD tensors to SDPA's layout,
runs the plan's grouped (or masked) attention, and gives the output back contiguous in the op's
layout. Its other outputs (the softmax log-sum-exp, ...) are not produced by the grouped form: a
site whose other outputs are read stays dense with that reason. (Sites inside a higher-order op's
subgraph, such as flash-attn's forward under autograd, are reported by patterns/__init__.py.)
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from ..ir.graphs import subgraph_of
from ..ir.ops import op_name
from ..ir.values import known_true, shape_of, value_of
from .site import AttentionSite


@dataclass(frozen=True)
class AttentionOp:
    name: str                      # "namespace::op"
    form: str                      # how the report names its sites
    layout: str = "BLHD"           # of q, k, v and the output: "BLHD" or "BHLD"
    q: str = "q"                   # schema names of the three tensors
    k: str = "k"
    v: str = "v"
    output: int | None = 0         # index of the attention output in the op's tuple result (None: a bare tensor)
    scale: str | None = None       # schema name of the softmax scale (None / absent: 1/sqrt(d))
    causal: str | None = None
    dropout: str | None = None
    window: tuple = ()             # schema names of the window sizes; -1 or None everywhere is global attention
    softcap: str | None = None
    alibi: str | None = None
    # Arguments that must keep their default for the op to be plain softmax attention, with why.
    plain: dict = field(default_factory=dict)
    dense: str | None = None       # every site of this op stays dense, with this reason
    # A higher-order op has no schema: the names of its positional arguments, in order.
    positions: tuple = ()
    # Further conditions for plain attention: (call node, its arguments, graph module) -> why not, or None.
    check: Callable | None = None
    # Variable-length ops: the schema names of (cu_seqlens_q, cu_seqlens_k). Rewritten only where the
    # packing is provably B sequences of L tokens each (:func:`_unpacked`).
    packed: tuple = ()


_FP8 = "fp8 descaling (quantised attention): left dense"
_VARLEN = "variable-length packing: several sequences share one token axis; left dense"
_PAGED = "a paged or offset KV cache: keys are not the tokens of this call; left dense"
# FA3's two spellings (its C++ ``fwd`` and its Python ``_flash_attn_forward``) share these names.
_FA3_PLAIN = {
    "qv": "an extra qv operand", "q_v": "an extra qv operand", "q_descale": _FP8, "k_descale": _FP8,
    "v_descale": _FP8, "attention_chunk": "chunked (local) attention", "k_new": "keys appended to a KV cache",
    "v_new": "values appended to a KV cache", "out": "an output buffer written in place",
    "out_": "an output buffer written in place", "cu_seqlens_q": _VARLEN, "cu_seqlens_k": _VARLEN,
    "cu_seqlens_k_new": _VARLEN, "seqused_q": _VARLEN, "seqused_k": _VARLEN, "page_table": _PAGED,
    "kv_batch_idx": _PAGED, "leftpad_k": _PAGED, "rotary_cos": "rotary embedding applied inside the kernel",
    "rotary_sin": "rotary embedding applied inside the kernel", "seqlens_rotary": _VARLEN,
}
# Arguments that choose how a kernel runs, never what it computes. Any other argument an entry does
# not name must keep its schema default, or the site stays dense: an op whose schema gains an
# argument (or an entry written from an older schema) never has it silently ignored.
TUNING = frozenset({
    "max_seqlen_q", "max_seqlen_k", "max_q", "max_k", "max_seqlen_Q", "max_seqlen_KV", "num_splits", "pack_gqa",
    "sm_margin", "deterministic", "scheduler_metadata", "return_softmax", "return_debug_mask", "compute_log_sumexp",
    "q_tile_size", "kv_tile_size", "kernel_schedule_int", "run_persistent_kernel", "use_kvsplit",
    "is_rotary_interleaved", "rotary_interleaved", "zero_tensors",
})
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
    AttentionOp("flash_attn::_flash_attn_varlen_forward", "flash-attn-varlen", scale="softmax_scale", causal="causal",
                dropout="dropout_p", window=("window_size_left", "window_size_right"), softcap="softcap",
                alibi="alibi_slopes", packed=("cu_seqlens_q", "cu_seqlens_k"),
                plain={"block_table": _PAGED, "leftpad_k": _PAGED, "seqused_k": _VARLEN}),
    AttentionOp("_diffusers_flash_attn_3::_flash_attn_forward", "flash-attn-3 (diffusers)", scale="softmax_scale",
                causal="causal", softcap="softcap", plain=_FA3_PLAIN),
    # FA3 (flash-attention's hopper/): its C++ op (schema as xformers 0.0.35 checks it) and the Python
    # custom op its flash_attn_interface wraps that in.
    AttentionOp("flash_attn_3::fwd", "flash-attn-3", scale="softmax_scale", causal="is_causal", softcap="softcap",
                window=("window_size_left", "window_size_right"), plain=_FA3_PLAIN),
    AttentionOp("flash_attn_3::_flash_attn_forward", "flash-attn-3", scale="softmax_scale", causal="causal",
                softcap="softcap", window=("window_size_left", "window_size_right"), plain=_FA3_PLAIN),
    # xformers: the wrapper op it registers for torch.compile (a bare tensor), and the flash kernels its
    # memory_efficient_attention dispatches to (its cutlass path calls aten::_efficient_attention_forward).
    AttentionOp("xformer::memory_efficient_attention_forward", "xformers", output=None, scale="scale", dropout="p",
                plain={"b": "an attention bias (xformers' AttentionBias or a tensor)"}),
    AttentionOp("xformers_flash::flash_fwd", "xformers-flash", q="query", k="key", v="value", scale="softmax_scale",
                causal="is_causal", dropout="p", window=("window_left", "window_right"),
                plain={"cu_seqlens_q": _VARLEN, "cu_seqlens_k": _VARLEN, "seqused_k": _VARLEN,
                       "block_tables": _PAGED}),
    AttentionOp("xformers_flash3::flash_fwd", "xformers-flash3", q="query", k="key", v="value",
                scale="softmax_scale", causal="is_causal", dropout="p", window=("window_left", "window_right"),
                plain={"cu_seqlens_q": _VARLEN, "cu_seqlens_k": _VARLEN, "seqused_k": _VARLEN, "leftpad_k": _PAGED,
                       "block_table": _PAGED, "descale_q": _FP8, "descale_k": _FP8, "descale_v": _FP8}),
    # SDPA's own CUDA kernels, called directly (xformers' cutlass path, hand-written kernels' users).
    AttentionOp("aten::_efficient_attention_forward", "efficient-attention", q="query", k="key", v="value",
                scale="scale", causal="custom_mask_type", dropout="dropout_p", window=("window_size",),
                plain={"bias": "an attention bias", "cu_seqlens_q": _VARLEN, "cu_seqlens_k": _VARLEN,
                       "seqlen_k": _VARLEN}),
    AttentionOp("aten::_flash_attention_forward", "flash-attention", q="query", k="key", v="value", scale="scale",
                causal="is_causal", dropout="dropout_p", window=("window_size_left", "window_size_right"),
                alibi="alibi_slopes", plain={"cum_seq_q": _VARLEN, "cum_seq_k": _VARLEN, "seqused_k": _VARLEN,
                                             "block_table": _PAGED}),
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
    windows = tuple(a.get(n) for n in op.window)
    if any(w not in (None, -1) for w in windows):
        return f"windowed attention (window size {windows}): already local, left dense"
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
    unknown = None if op.positions else _unread_argument(op, a, node)
    return unknown or (op.check(node, a, gm) if op.check else None)


def _unread_argument(op: AttentionOp, a: dict, node: fx.Node) -> str | None:
    """An argument the entry does not name, set to something other than its schema default."""
    read = {op.q, op.k, op.v, op.scale, op.causal, op.dropout, op.softcap, op.alibi, *op.window, *op.plain,
            *op.packed}
    for arg in _schema(node.target).arguments:
        if arg.name in read or arg.name in TUNING:
            continue
        value, default = a.get(arg.name), arg.default_value if arg.has_default_value() else None
        if isinstance(value, fx.Node) or value != default:
            return (f"`{arg.name}`={value!r}: an argument the op table does not read "
                    "(gridattn_fx/patterns/attention_ops.py); left dense")
    return None


def _transposed(op: AttentionOp, shape):
    """A shape in SDPA's convention (..., heads, tokens, features)."""
    if shape is None or op.layout == "BHLD":
        return shape
    return (*shape[:-3], shape[-2], shape[-3], shape[-1])


def _outputs(node: fx.Node, op: AttentionOp):
    """(the node holding the attention output, the other outputs' nodes that are read, every getitem)."""
    if op.output is None:
        return node, [], []
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
            out = out.transpose(-3, -2).contiguous()  # the op's output is a contiguous BLHD tensor
            return out.flatten(0, 1) if op.packed else out  # packed back to (B * L, H, D)
        return replacement
    return build


def _batched(packed) -> fx.Node | None:
    """The (B, L, H, D) tensor a (B * L, H, D) one was flattened from, if it provably was."""
    if not isinstance(packed, fx.Node) or op_name(packed) not in ("flatten", "reshape", "view"):
        return None
    source = packed.args[0] if packed.args else None
    outer, inner = shape_of(source), shape_of(packed)
    if outer is None or inner is None or len(outer) != 4 or len(inner) != 3:
        return None
    same = known_true(inner[0] == outer[0] * outer[1]) and all(known_true(a == b) for a, b in zip(inner[1:], outer[2:]))
    return source if same else None


def _one_per_sequence(cu, batch, length) -> bool:
    """``cu`` is ``arange(0, end, length)`` with exactly ``batch + 1`` entries: 0, L, ..., B * L."""
    if not isinstance(cu, fx.Node) or op_name(cu) != "arange":
        return False
    args = [value_of(x) for x in cu.args]
    start, end = (args[0], args[1]) if len(args) >= 2 else (0, args[0] if args else None)
    step = args[2] if len(args) >= 3 else value_of(cu.kwargs.get("step", 1))
    if end is None or any(isinstance(x, float) for x in (start, end, step)):
        return False
    return (known_true(start == 0) and known_true(step == length) and known_true(end > batch * length)
            and known_true(end <= (batch + 1) * length))


def _unpacked(op: AttentionOp, a: dict):
    """A variable-length call that is the batched op in disguise: q, k and v are (B, L, H, D) tensors
    flattened to (B * L, H, D) and cu_seqlens is ``arange(0, (B + 1) * L, L)`` (one sequence per
    batch entry: flash-attn's own unpadding of an unpadded batch, InternViT's vision tower). Returns
    the three 4-D tensors, or why the packing is not proven."""
    tensors = [_batched(a.get(getattr(op, role))) for role in ("q", "k", "v")]
    if any(t is None for t in tensors):
        return ("variable-length packing whose q / k / v are not provably a (B, L, H, D) batch flattened "
                "to (B * L, H, D): which tokens form one image is not proven; left dense")
    (b, lq), (_, lk) = shape_of(tensors[0])[:2], shape_of(tensors[1])[:2]
    cu_q, cu_k = (a.get(name) for name in op.packed)
    if not (_one_per_sequence(cu_q, b, lq) and _one_per_sequence(cu_k, b, lk)):
        return ("variable-length packing (cu_seqlens) not provably one sequence per batch entry "
                "(arange(0, (B + 1) * L, L)): which tokens form one image is not proven; left dense")
    return tensors


def _site(node: fx.Node, op: AttentionOp, gm: fx.GraphModule) -> AttentionSite:
    a = op_arguments(node, op)
    q, k, v = (a.get(getattr(op, role)) for role in ("q", "k", "v"))
    output, read, getitems = _outputs(node, op)
    why = op.dense or _why_not_plain(op, a, node, gm)
    if why is None and op.packed:
        unpacked = _unpacked(op, a)
        if isinstance(unpacked, str):
            why = unpacked
        else:
            q, k, v = unpacked
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
        enable_gqa=heads_q != heads_k, nodes=list(dict.fromkeys([output, *getitems, node])))


# An op the table does not list but whose name says attention is reported dense, never silently.
_ATTENTION_NAME = re.compile(r"attn|attention|fmha", re.IGNORECASE)
_NOT_A_SITE = re.compile(r"backward|_bwd|bwd_|^aten::scaled_dot_product_attention$|^gridattn::")
# Kernel families known to be attention that the grid must leave alone, by namespace prefix.
_FAMILIES = {
    "sageattention": "quantised attention (SageAttention's INT8/FP8 kernels: the grid would change their "
                     "quantisation blocks); left dense",
    "spas_sage": "sparse quantised attention (SpargeAttn): already sparse and quantised; left dense",
    "natten": "a NATTEN kernel the table does not list: NATTEN's attention is already sparse; left dense",
}


def _unlisted(node: fx.Node) -> AttentionSite | None:
    """A dense site for an op that looks like attention and has no table entry."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target._qualified_op_name
    else:
        return None
    if not _ATTENTION_NAME.search(name) or _NOT_A_SITE.search(name):
        return None
    namespace = name.split("::")[0]
    why = next((text for prefix, text in _FAMILIES.items() if namespace.startswith(prefix)), None)
    why = why or (f"`{name}` looks like an attention kernel but has no entry in the op table "
                  "(gridattn_fx/patterns/attention_ops.py): left dense")
    return AttentionSite(form=name, output=node, query=node, key=node, inputs=[], build=None, q_shape=None,
                         k_shape=None, v_shape=None, nodes=[], unsupported=why)


def find_op_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        op = op_entry(node.target)
        site = _site(node, op, gm) if op is not None else _unlisted(node)
        if site is not None:
            sites.append(site)
    return sites

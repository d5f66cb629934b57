"""The attention-op table (gridattn_fx/patterns/attention_ops.py): models whose blocks call attention
kernels as custom ops (flash-attn 2.x, diffusers' FA3 wrapper), compiled with the gridattn backend.

The ops are the CPU stand-ins of tests/standin_ops.py (the real schemas; the real op where the
package is importable). Rewritten sites equal the masked oracle in float64; sites the table leaves
dense equal the untouched model and say why.
"""

import math

import pytest
import torch
import torch.nn as nn

import importlib.util

import standin_ops
from models import build, image
from oracle import assert_close64, assert_differs, oracle_sdpa

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx.reasons import SkipKind  # noqa: E402

standin_ops.register()
OPTS = {"stride": 2, "min_image_tokens": 0}


class OpAttention(nn.Module):
    """q, k, v as (B, L, H, D) straight from the projection (no transpose), as flash-attn users write."""

    def __init__(self, dim=16, heads=2, kv_heads=2, call="fa2", **op_args):
        super().__init__()
        self.heads, self.kv_heads, self.call, self.op_args = heads, kv_heads, call, op_args
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.oracle = None   # (layout, stride): compute the masked reference instead (eager only)

    def forward(self, x):
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim)
        k, v = self.kv(x).view(b, n, 2, self.kv_heads, self.head_dim).unbind(2)
        scale = 1 / math.sqrt(self.head_dim)
        if self.oracle is not None:
            layout, stride = self.oracle
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            kt, vt = (t.repeat_interleave(self.heads // self.kv_heads, 1) for t in (kt, vt))
            out = oracle_sdpa(qt, kt, vt, scale=scale, q_layout=layout, k_layout=layout, stride=stride)
            out = out.transpose(1, 2)
        elif self.call == "fa2":
            a = {"dropout_p": 0.0, "causal": False, "window_size_left": -1, "window_size_right": -1,
                 "softcap": 0.0, "alibi_slopes": None, **self.op_args}
            out = torch.ops.flash_attn._flash_attn_forward(
                q, k, v, a["dropout_p"], scale, a["causal"], a["window_size_left"], a["window_size_right"],
                a["softcap"], a["alibi_slopes"], False)[0]
        elif self.call == "fa2-lse":   # reads the log-sum-exp too
            out, lse, _, _ = torch.ops.flash_attn._flash_attn_forward(q, k, v, 0.0, scale, False, -1, -1, 0.0,
                                                                      None, False)
            out = out + lse.transpose(1, 2)[..., None].to(out.dtype) * 0
        elif self.call == "varlen":   # one sequence per batch entry, or ``pieces`` sequences per entry
            step = n // self.op_args.get("pieces", 1)
            cu = torch.arange(0, b * n + 1, step, dtype=torch.int32) if "cu" not in self.op_args else self.op_args["cu"]
            out = torch.ops.flash_attn._flash_attn_varlen_forward(
                q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, n, n, 0.0, scale, False)[0]
            out = out.view(b, n, self.heads, self.head_dim)
        elif self.call.startswith("natten-"):  # NATTEN's FMHA: (B, L, H, D), heads-last lse
            arch = {"natten-fmha": "", "natten-hopper": "hopper_", "natten-blackwell": "blackwell_"}[self.call]
            extra = {"hopper_": (0,), "blackwell_": (False,), "": ()}[arch]
            cu = self.op_args.get("cumulative_seqlen")
            out = getattr(torch.ops.natten, f"{arch}fmha_forward")(q, k, v, False, scale, 64, 64, *extra, cu, cu, n, n)[0]
        elif self.call in CALLS:
            out = CALLS[self.call](q, k, v, scale, n, **self.op_args)
        else:  # diffusers' FA3 wrapper
            out = torch.ops._diffusers_flash_attn_3._flash_attn_forward(q, k, v, scale, **self.op_args)[0]
        return self.proj(out.reshape(b, n, c))


# The other ops of the table (and two it does not list), called as their users call them: (B, L, H, D).
CALLS = {
    "fa3": lambda q, k, v, scale, n, **a: torch.ops.flash_attn_3.fwd(q, k, v, softmax_scale=scale, **a)[0],
    "fa3-python": lambda q, k, v, scale, n, **a: torch.ops.flash_attn_3._flash_attn_forward(
        q, k, v, softmax_scale=scale, **a)[0],
    "xformers": lambda q, k, v, scale, n, **a: torch.ops.xformer.memory_efficient_attention_forward(
        q, k, v, scale=scale, **a),
    "xformers-flash": lambda q, k, v, scale, n, window=(-1, -1), causal=False, **a: torch.ops.xformers_flash.flash_fwd(
        q, k, v, None, None, None, n, n, 0.0, scale, causal, *window, False, None)[0],
    "xformers-flash3": lambda q, k, v, scale, n, **a: torch.ops.xformers_flash3.flash_fwd(
        q, k, v, None, None, None, None, n, n, 0.0, scale, False, **a)[0],
    "aten-efficient": lambda q, k, v, scale, n, mask_type=0, **a: torch.ops.aten._efficient_attention_forward(
        q, k, v, None, None, None, None, None, 0.0, mask_type, scale=scale, **a)[0],
    "aten-flash": lambda q, k, v, scale, n, causal=False, **a: torch.ops.aten._flash_attention_forward(
        q, k, v, None, None, n, n, 0.0, causal, False, scale=scale, **a)[0],
    "sage": lambda q, k, v, scale, n: torch.ops.sageattention.qk_int8_sv_f16_accum_f32_attn(q, k, v, scale),
    "unlisted": lambda q, k, v, scale, n: torch.ops.mylab.fused_attention(q, k, v, scale),
}


class OpViT(nn.Module):
    def __init__(self, n_cls=0, **attn):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 2, 2)
        self.cls = nn.Parameter(torch.randn(1, n_cls, 16)) if n_cls else None
        self.attn = OpAttention(**attn)

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.attn(x)


def _need(call: str) -> None:
    """diffusers defines the FA3 wrapper op: without it (GRIDATTN_SKIP_ZOO=1) those cases skip."""
    if call == "fa3-diffusers" and importlib.util.find_spec("diffusers") is None:
        from zoo_required import missing_library
        missing_library("diffusers")


def _compiled(model, **options):
    return torch.compile(model, backend="gridattn", options={**OPTS, **options})


def _site():
    (site,) = gridattn_fx.last_report().sites
    return site


@pytest.mark.parametrize("call,n_cls,kv_heads,px", [
    ("fa2", 0, 2, (16, 16)), ("fa2", 1, 2, (12, 16)), ("fa2", 0, 1, (16, 20)), ("fa3-diffusers", 0, 2, (16, 16)),
    ("natten-fmha", 0, 2, (16, 16)), ("natten-hopper", 1, 2, (12, 16)), ("natten-blackwell", 0, 1, (16, 16)),
    ("varlen", 0, 2, (16, 16)), ("varlen", 1, 1, (12, 16)), ("fa3", 0, 2, (16, 16)), ("fa3", 1, 1, (12, 16)), ("fa3-python", 0, 2, (16, 12)), ("xformers", 1, 2, (16, 16)),
    ("xformers-flash", 0, 1, (16, 16)), ("xformers-flash3", 0, 2, (12, 16)), ("aten-efficient", 1, 2, (16, 16)),
    ("aten-flash", 0, 2, (16, 20)),
])
def test_op_sites_are_rewritten_to_the_oracle(call, n_cls, kv_heads, px):
    """Image tokens, a cls prefix, and MQA (one key/value head: flash-attn's own GQA)."""
    _need(call)
    model = build(OpViT, n_cls=n_cls, call=call, kv_heads=kv_heads)
    x = image(2, *px)
    with torch.no_grad():
        out = _compiled(model)(x)
    site = _site()
    assert site.decision == "rewritten" and site.stride == (2, 2), str(gridattn_fx.last_report())
    layout = (n_cls, px[0] // 2, px[1] // 2, 0)
    model.attn.oracle = (layout, 2)
    with torch.no_grad():
        expected = model(x)
        model.attn.oracle = None
        assert_differs(expected, model(x))
    assert_close64(out, expected)


def test_masked_implementation_is_the_oracle_too():
    model, x = build(OpViT), image(1, 16, 16)
    with torch.no_grad():
        out = _compiled(model, implementation="masked")(x)
        model.attn.oracle = ((0, 8, 8, 0), 2)
        assert_close64(out, model(x))


@pytest.mark.parametrize("call,op_args,kind,words", [
    ("fa2", {"causal": True}, SkipKind.CAUSAL, "causal"),
    ("fa2", {"window_size_left": 4, "window_size_right": 4}, SkipKind.UNREADABLE, "windowed attention"),
    ("fa2", {"softcap": 30.0}, SkipKind.UNREADABLE, "softcap"),
    ("fa2", {"dropout_p": 0.1}, SkipKind.UNREADABLE, "dropout"),
    ("fa2-lse", {}, SkipKind.UNREADABLE, "other outputs are read"),
    ("varlen", {"pieces": 2}, SkipKind.UNREADABLE, "not provably one sequence per batch entry"),
    ("varlen", {"cu": torch.tensor([0, 64], dtype=torch.int32)}, SkipKind.UNREADABLE, "variable-length packing"),
    ("fa3-diffusers", {"attention_chunk": 4}, SkipKind.UNREADABLE, "chunked"),
    ("natten-fmha", {"cumulative_seqlen": torch.tensor([0, 64], dtype=torch.int32)}, SkipKind.UNREADABLE,
     "variable-length"),
    ("fa3", {"is_causal": True}, SkipKind.CAUSAL, "causal"),
    ("fa3", {"window_size_left": 8, "window_size_right": 8}, SkipKind.UNREADABLE, "windowed attention"),
    ("fa3", {"softcap": 20.0}, SkipKind.UNREADABLE, "softcap"),
    ("fa3", {"attention_chunk": 16}, SkipKind.UNREADABLE, "chunked"),
    ("fa3", {"num_splits": 4, "sm_margin": 2}, None, ""),   # tuning knobs: still rewritten
    ("fa3-python", {"causal": True}, SkipKind.CAUSAL, "causal"),
    ("fa3-python", {"rotary_interleaved": False, "window_size_right": 3}, SkipKind.UNREADABLE, "windowed"),
    ("xformers", {"p": 0.2}, SkipKind.UNREADABLE, "dropout"),
    ("xformers-flash", {"window": (4, 0)}, SkipKind.UNREADABLE, "windowed attention"),
    ("xformers-flash", {"causal": True}, SkipKind.CAUSAL, "causal"),
    ("xformers-flash3", {"window_left": 4, "window_right": 4}, SkipKind.UNREADABLE, "windowed attention"),
    ("aten-efficient", {"mask_type": 1}, SkipKind.CAUSAL, "causal"),
    ("aten-efficient", {"window_size": 8}, SkipKind.UNREADABLE, "windowed attention"),
    ("aten-flash", {"causal": True}, SkipKind.CAUSAL, "causal"),
    ("aten-flash", {"window_size_left": 4, "window_size_right": 0}, SkipKind.UNREADABLE, "windowed attention"),
    ("sage", {}, SkipKind.UNREADABLE, "quantised attention (SageAttention"),
    ("unlisted", {}, SkipKind.UNREADABLE, "`mylab::fused_attention` looks like an attention kernel"),
])
def test_sites_the_table_leaves_dense_are_untouched_and_say_why(call, op_args, kind, words):
    _need(call)
    model, x = build(OpViT, call=call, **op_args), image(1, 16, 16)
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        expected = model(x)
        torch.manual_seed(0)
        if call == "fa3" and kind is not None:
            # FA3's C++ op returns an alias of its ``out`` argument, which AOTAutograd refuses to
            # functionalize: inductor cannot compile a graph that still calls it (FA3's interface
            # wraps it in a custom op for that reason), so its dense sites are checked on the
            # captured graph.
            gm, report = gridattn_fx.rewrite(model, (x,), **OPTS)
            out, site = gm(x), report.sites[0]
        else:
            out = _compiled(model)(x)
            site = _site()
    if kind is None:
        assert site.decision == "rewritten", site.reason
        return
    assert site.decision == "skipped" and site.skip is kind and words in site.reason, site.reason
    if op_args.get("dropout_p") or op_args.get("p"):
        return  # the stand-in draws its own dropout: outputs are not comparable
    assert_close64(out, expected)  # the untouched model (inductor may reorder float64 sums)


def test_alibi_slopes_leave_the_site_dense():
    model, x = build(OpViT), image(1, 16, 16)
    model.attn.op_args = {"alibi_slopes": torch.ones(2, dtype=torch.float32)}
    with torch.no_grad():
        expected = model(x)
        out = _compiled(model)(x)
    site = _site()
    assert site.skip is SkipKind.UNREADABLE and "ALiBi" in site.reason
    assert_close64(out, expected)  # the untouched model (inductor may reorder float64 sums)


def test_a_table_op_inside_a_higher_order_subgraph_is_reported_dense():
    """An op Dynamo puts inside a higher-order op's subgraph (activation checkpointing here; flash-attn's
    own autograd.Function gives ``autograd_function_apply``) is reported against the higher-order op,
    dense, never silently."""
    from torch.utils.checkpoint import checkpoint

    def attend(q, k, v):
        return torch.ops.flash_attn._flash_attn_forward(q, k, v, 0.0, 0.5, False, -1, -1, 0.0, None, False)[0]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, 8, 2, 2)

        def forward(self, img):
            x = self.patch(img).flatten(2).transpose(1, 2).unflatten(-1, (2, 4)).contiguous()
            return checkpoint(attend, x, x, x, use_reentrant=False)

    model, x = Block().double(), image(1, 16, 16).requires_grad_()
    gm, report = gridattn_fx.rewrite(model, (x,), **OPTS)   # captured with gradients on: the HOP is there
    assert len(report.sites) == 1 and report.sites[0].decision == "skipped", str(report)
    assert "flash-attn attention" in report.sites[0].reason and "inside the subgraph" in report.sites[0].reason
    with torch.no_grad():
        assert_close64(gm(x), model(x))


class FlexViT(nn.Module):
    """FlexAttention over (B, H, L, D) image tokens; ``mode`` adds a score_mod or a block mask."""

    def __init__(self, dim=16, heads=2, mode=None):
        super().__init__()
        self.heads, self.mode = heads, mode
        self.patch = nn.Conv2d(3, dim, 2, 2)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.oracle = None

    def forward(self, img):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        x = self.patch(img).flatten(2).transpose(1, 2)
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.oracle is not None:
            return oracle_sdpa(q, k, v, q_layout=self.oracle, k_layout=self.oracle, stride=2)
        if self.mode == "score_mod":
            return flex_attention(q, k, v, score_mod=lambda s, b_, h, i, j: s + (i - j) * 0.01)
        if self.mode == "block_mask":
            causal = create_block_mask(lambda b_, h, i, j: i >= j, None, None, n, n, device="cpu")
            return flex_attention(q, k, v, block_mask=causal)
        return flex_attention(q, k, v)


def test_flex_attention_without_score_mod_or_block_mask_is_rewritten_to_the_oracle():
    """float32: FlexAttention refuses float64 on the CPU."""
    model, x = FlexViT(), image(2, 16, 16, dtype=torch.float32)
    with torch.no_grad():
        out = _compiled(model)(x)
        site = _site()
        assert site.decision == "rewritten" and site.form == "flex", str(gridattn_fx.last_report())
        model.oracle = (0, 8, 8, 0)
        expected = model(x)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mode,words", [("score_mod", "score_mod"), ("block_mask", "block mask")])
def test_flex_attention_with_a_score_mod_or_block_mask_stays_dense(mode, words):
    model, x = FlexViT(mode=mode), image(1, 16, 16, dtype=torch.float32)
    with torch.no_grad():
        expected = torch.compile(model, backend="inductor")(x)
        out = _compiled(model)(x)
    site = _site()
    assert site.decision == "skipped" and words in site.reason, site.reason
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("arch", ["", "hopper_", "blackwell_", "reference_"])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_natten_neighborhood_attention_is_left_dense(arch, rank):
    """NATTEN's neighbourhood attention is already sparse: every one of its ops is reported dense."""
    extra = {"": ([4, 4], [4, 4]), "hopper_": ([1] * rank, [1] * rank, [1] * rank, [4] * rank, [4] * rank, 0),
             "blackwell_": ([1] * rank, [1] * rank, [1] * rank, [4] * rank, [4] * rank, False),
             "reference_": ([1] * rank, 0)}[arch]

    class NA(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, 8, 2, 2)

        def forward(self, img):
            x = self.patch(img).permute(0, 2, 3, 1)                # (B, h, w, C)
            x = {1: x.flatten(1, 2), 2: x, 3: x[:, None]}[rank]     # (B, *spatial, C)
            q = x.unflatten(-1, (2, 4))
            out = getattr(torch.ops.natten, f"{arch}na{rank}d_forward")(
                q, q, q, [3] * rank, [1] * rank, [1] * rank, [False] * rank, 0.5, *extra)[0]
            return out.flatten(-2)

    model, x = NA().double(), image(1, 16, 16)
    with torch.no_grad():
        expected = model(x)
        out = _compiled(model)(x)
    site = _site()
    assert site.decision == "skipped" and "neighborhood attention" in site.reason, site.reason
    assert_close64(out, expected)


@pytest.mark.parametrize("call", ["fa2", "fa3", "xformers", "aten-efficient"])
def test_op_overload_targets_of_an_exported_graph_are_rewritten_too(call):
    """torch.compile graphs call the OpOverloadPacket, exported ones its OpOverload (``.default``)."""
    model, x = build(OpViT, call=call), image(1, 16, 16)
    with torch.no_grad():
        gm, report = gridattn_fx.rewrite(model, (x,), **OPTS)
        model.attn.oracle = ((0, 8, 8, 0), 2)
        expected = model(x)
    assert [s.decision for s in report.sites] == ["rewritten"], str(report)
    assert_close64(gm(x), expected)


def test_an_argument_the_entry_does_not_name_leaves_the_site_dense(monkeypatch):
    """An entry written from an older schema never ignores an argument: anything it does not read
    (and is not a tuning knob) must keep its default."""
    from dataclasses import replace

    from gridattn_fx.patterns import attention_ops

    entry = attention_ops._BY_NAME["flash_attn_3::_flash_attn_forward"]
    older = replace(entry, plain={k: v for k, v in entry.plain.items() if k != "attention_chunk"})
    monkeypatch.setitem(attention_ops._BY_NAME, "flash_attn_3::_flash_attn_forward", older)
    model, x = build(OpViT, call="fa3-python", attention_chunk=16), image(1, 16, 16)
    with torch.no_grad():
        expected = model(x)
        out = _compiled(model)(x)
    site = _site()
    assert site.decision == "skipped" and "`attention_chunk`=16: an argument the op table does not read" in site.reason
    assert_close64(out, expected)


@pytest.mark.parametrize("call", ["fa2", "varlen"])
def test_symbolic_sizes_through_inductor_match_the_oracle(call):
    """dynamic=True, two resolutions, a projection fed by a transposed (non-contiguous) tensor: the
    grouped form must not read its inputs through strides inductor may not keep (grid/groupings.py
    _split_axis: a strided split here read wrong values, even NaNs)."""
    model = build(OpViT, call=call)
    compiled = torch.compile(model, backend="gridattn", options=OPTS, dynamic=True)
    for px in [(16, 16), (12, 20)]:
        x = image(2, *px)
        with torch.no_grad():
            out = compiled(x)
            site = _site()
            assert site.decision == "rewritten", str(gridattn_fx.last_report())
            model.attn.oracle = ((0, px[0] // 2, px[1] // 2, 0), 2)
            expected = model(x)
            model.attn.oracle = None
        assert_close64(out, expected)

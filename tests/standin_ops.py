"""CPU stand-ins for the attention kernels of the op table (gridattn_fx/patterns/attention_ops.py).

Each stand-in is registered under the real op's name with exactly its schema (flash-attn 2.7's
``flash_attn_interface.py``; diffusers' ``attention_dispatch.py`` for its FA3 wrapper; NATTEN
0.21's ``_libnatten/torch_wrappers.py``; xformers 0.0.35 for its ops and FA3's C++ ``fwd``; SDPA's
CUDA kernels get a CPU kernel under their own aten schemas), computes
plain softmax attention with SDPA on the CPU, and has a fake implementation, so a model calling
``torch.ops.flash_attn._flash_attn_forward`` compiles here exactly as it would on a GPU. Where the
real package is importable, its op is used instead (nothing is registered over it).

Window, softcap and ALiBi arguments are accepted and ignored: the tests only check that sites
using them stay untouched (the compiled model calls the same stand-in as the eager one).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def _maybe_contiguous(x):
    """flash-attn's own rule: only a tensor whose last axis is strided is copied."""
    return x.contiguous() if x is not None and x.stride(-1) != 1 else x


def _like_q(q, out):
    """``out`` with the strides flash-attn gives its output: those of (contiguous-last-axis) q."""
    return torch.empty_like(_maybe_contiguous(q)).copy_(out)


def _attention(q, k, v, dropout_p, scale, causal):
    """BLHD attention and its log-sum-exp (B, H, L) in float32, as flash-attn returns them."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    gqa = qt.shape[1] != kt.shape[1]
    out = F.scaled_dot_product_attention(qt, kt, vt, dropout_p=dropout_p, is_causal=causal, scale=scale,
                                         enable_gqa=gqa)
    if gqa:
        kt = kt.repeat_interleave(qt.shape[1] // kt.shape[1], dim=1)
    scores = (qt @ kt.transpose(-1, -2)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    return out.transpose(1, 2).contiguous(), torch.logsumexp(scores.float(), dim=-1)


def _register_flash_attn_2():
    @torch.library.custom_op("flash_attn::_flash_attn_forward", mutates_args=())
    def _flash_attn_forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, softmax_scale: float,
        causal: bool, window_size_left: int, window_size_right: int, softcap: float,
        alibi_slopes: Optional[torch.Tensor], return_softmax: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        out, lse = _attention(q, k, v, dropout_p, softmax_scale, causal)
        return _like_q(q, out), lse, torch.empty(0, dtype=q.dtype), torch.zeros(2, dtype=torch.int64)

    @_flash_attn_forward.register_fake
    def _(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
          alibi_slopes, return_softmax):
        b, lq, h, _d = q.shape
        return (torch.empty_like(_maybe_contiguous(q)), q.new_empty((b, h, lq), dtype=torch.float32), q.new_empty((0,)),
                q.new_empty((2,), dtype=torch.int64))

    @torch.library.custom_op("flash_attn::_flash_attn_varlen_forward", mutates_args=())
    def _flash_attn_varlen_forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float,
        softmax_scale: float, causal: bool, window_size_left: int = -1, window_size_right: int = -1,
        softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None, return_softmax: bool = False,
        block_table: Optional[torch.Tensor] = None, leftpad_k: Optional[torch.Tensor] = None,
        seqused_k: Optional[torch.Tensor] = None, zero_tensors: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # (total, H, D) packed sequences; the stand-in attends within each [cu[i], cu[i+1]) slice
        outs, lses = [], []
        bounds = cu_seqlens_q.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            o, lse = _attention(q[None, start:end], k[None, start:end], v[None, start:end], dropout_p,
                                softmax_scale, causal)
            outs.append(o[0])
            lses.append(lse[0])
        return (torch.cat(outs), torch.cat(lses, dim=-1), torch.empty(0, dtype=q.dtype),
                torch.zeros(2, dtype=torch.int64))

    @_flash_attn_varlen_forward.register_fake
    def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
          window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False,
          block_table=None, leftpad_k=None, seqused_k=None, zero_tensors=False):
        total, h, _d = q.shape
        return (torch.empty_like(q), q.new_empty((h, total), dtype=torch.float32), q.new_empty((0,)),
                q.new_empty((2,), dtype=torch.int64))


def _register_diffusers_fa3_cpu():
    """diffusers defines ``_diffusers_flash_attn_3::_flash_attn_forward`` (CUDA only) when its attention
    dispatcher is imported; the stand-in adds a CPU kernel to that very op."""
    import diffusers.models.attention_dispatch  # noqa: F401  (defines the op)

    def cpu(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None, v_descale=None,
            attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0):
        out, lse = _attention(q, k, v, 0.0, softmax_scale, causal)
        return out, lse.permute(0, 2, 1).contiguous()

    torch.library.register_kernel("_diffusers_flash_attn_3::_flash_attn_forward", "cpu", cpu)


def _register_natten():
    """NATTEN 0.21's ops (``natten/_libnatten/torch_wrappers.py``): tensors are (batch, tokens..., heads,
    features), the log-sum-exp heads-last. The neighbourhood-attention stand-ins compute plain
    attention over all tokens (their sites are only ever left dense)."""

    def fmha(query, key, value, is_causal, scale):
        out, lse = _attention(query, key, value, 0.0, scale, is_causal)
        return out, lse.transpose(1, 2).contiguous()

    def fmha_fake(query, value):
        return query.new_empty((*query.shape[:-1], value.shape[-1])), query.new_empty(query.shape[:-1],
                                                                                  dtype=torch.float32)

    @torch.library.custom_op("natten::fmha_forward", mutates_args=())
    def fmha_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool, scale: float,
                     q_tile_size: int, kv_tile_size: int, cumulative_seqlen_Q: Optional[torch.Tensor],
                     cumulative_seqlen_KV: Optional[torch.Tensor], max_seqlen_Q: int, max_seqlen_KV: int,
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        return fmha(query, key, value, is_causal, scale)

    @torch.library.custom_op("natten::hopper_fmha_forward", mutates_args=())
    def hopper_fmha_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool,
                            scale: float, q_tile_size: int, kv_tile_size: int, kernel_schedule_int: int,
                            cumulative_seqlen_Q: Optional[torch.Tensor], cumulative_seqlen_KV: Optional[torch.Tensor],
                            max_seqlen_Q: int, max_seqlen_KV: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return fmha(query, key, value, is_causal, scale)

    @torch.library.custom_op("natten::blackwell_fmha_forward", mutates_args=())
    def blackwell_fmha_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool,
                               scale: float, q_tile_size: int, kv_tile_size: int, run_persistent_kernel: bool,
                               cumulative_seqlen_Q: Optional[torch.Tensor],
                               cumulative_seqlen_KV: Optional[torch.Tensor], max_seqlen_Q: int, max_seqlen_KV: int,
                               ) -> Tuple[torch.Tensor, torch.Tensor]:
        return fmha(query, key, value, is_causal, scale)

    for op in (fmha_forward, hopper_fmha_forward, blackwell_fmha_forward):
        op.register_fake(lambda query, key, value, *args: fmha_fake(query, value))

    def na(query, key, value, scale):  # plain attention over the flattened tokens (see the docstring)
        b, h, d = query.shape[0], query.shape[-2], query.shape[-1]
        out, lse = _attention(query.reshape(b, -1, h, d), key.reshape(b, -1, h, d),
                              value.reshape(b, -1, h, value.shape[-1]), 0.0, scale, False)
        return out.reshape(*query.shape[:-1], value.shape[-1]), lse.transpose(1, 2).reshape(query.shape[:-1])

    for rank in (1, 2, 3):
        @torch.library.custom_op(f"natten::na{rank}d_forward", mutates_args=())
        def na_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: list[int],
                       stride: list[int], dilation: list[int], is_causal: list[bool], scale: float,
                       q_tile_shape: list[int], kv_tile_shape: list[int]) -> Tuple[torch.Tensor, torch.Tensor]:
            return na(query, key, value, scale)

        @torch.library.custom_op(f"natten::hopper_na{rank}d_forward", mutates_args=())
        def hopper_na_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: list[int],
                              stride: list[int], dilation: list[int], is_causal: list[bool], scale: float,
                              q_shape: list[int], kv_shape: list[int], qkv_shape: list[int],
                              q_tile_shape: list[int], kv_tile_shape: list[int], kernel_schedule_int: int,
                              ) -> Tuple[torch.Tensor, torch.Tensor]:
            return na(query, key, value, scale)

        @torch.library.custom_op(f"natten::blackwell_na{rank}d_forward", mutates_args=())
        def blackwell_na_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 kernel_size: list[int], stride: list[int], dilation: list[int],
                                 is_causal: list[bool], scale: float, q_shape: list[int], kv_shape: list[int],
                                 qkv_shape: list[int], q_tile_shape: list[int], kv_tile_shape: list[int],
                                 run_persistent_kernel: bool) -> Tuple[torch.Tensor, torch.Tensor]:
            return na(query, key, value, scale)

        @torch.library.custom_op(f"natten::reference_na{rank}d_forward", mutates_args=())
        def reference_na_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 kernel_size: list[int], stride: list[int], dilation: list[int],
                                 is_causal: list[bool], scale: float, qkv_shape: list[int], num_extra_kv: int,
                                 ) -> Tuple[torch.Tensor, torch.Tensor]:
            return na(query, key, value, scale)

        for op in (na_forward, hopper_na_forward, blackwell_na_forward, reference_na_forward):
            op.register_fake(lambda query, key, value, *args: fmha_fake(query, value))


# flash_attn_3::fwd as xformers 0.0.35 (ops/fmha/flash3.py) checks FA3's C++ op.
FA3_FWD_SCHEMA = (
    "fwd(Tensor q, Tensor k, Tensor v, Tensor(k_new!)? k_new=None, Tensor(v_new!)? v_new=None, Tensor? q_v=None, "
    "Tensor(out!)? out=None, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, Tensor? cu_seqlens_k_new=None, "
    "Tensor? seqused_q=None, Tensor? seqused_k=None, int? max_seqlen_q=None, int? max_seqlen_k=None, "
    "Tensor? page_table=None, Tensor? kv_batch_idx=None, Tensor? leftpad_k=None, Tensor? rotary_cos=None, "
    "Tensor? rotary_sin=None, Tensor? seqlens_rotary=None, Tensor? q_descale=None, Tensor? k_descale=None, "
    "Tensor? v_descale=None, float? softmax_scale=None, bool is_causal=False, int window_size_left=-1, "
    "int window_size_right=-1, int attention_chunk=0, float softcap=0., bool is_rotary_interleaved=False, "
    "Tensor? scheduler_metadata=None, int num_splits=0, bool? pack_gqa=None, int sm_margin=0) "
    "-> (Tensor(out!), Tensor, Tensor, Tensor)")
_LIBS = []   # torch.library.Library objects live as long as their registrations


def _lse_heads_first(q):
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


def _register_flash_attn_3():
    """FA3 (flash-attention's hopper/): the C++ ``fwd`` and the Python custom op
    ``_flash_attn_forward`` that flash_attn_interface.py wraps it in. The second's schema is written
    from FA3's interface as we know it (no FA3 source is reachable here): the op table reads
    arguments by name and leaves a site dense on any argument it does not know."""
    lib = torch.library.Library("flash_attn_3", "DEF")
    _LIBS.append(lib)
    lib.define(FA3_FWD_SCHEMA)

    def fwd(q, k, v, *args, softmax_scale=None, is_causal=False, **kwargs):
        out, lse = _attention(q, k, v, 0.0, softmax_scale, is_causal)
        return out, lse, q.new_empty(0), q.new_empty(0)

    def fwd_fake(q, k, v, *args, **kwargs):
        return torch.empty_like(q), _lse_heads_first(q), q.new_empty(0), q.new_empty(0)

    lib.impl("fwd", fwd, "CPU")
    torch.library.register_fake("flash_attn_3::fwd", fwd_fake, lib=lib)

    @torch.library.custom_op("flash_attn_3::_flash_attn_forward", mutates_args=())
    def _flash_attn_forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_new: Optional[torch.Tensor] = None,
        v_new: Optional[torch.Tensor] = None, qv: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
        cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
        cu_seqlens_k_new: Optional[torch.Tensor] = None, seqused_q: Optional[torch.Tensor] = None,
        seqused_k: Optional[torch.Tensor] = None, max_seqlen_q: Optional[int] = None,
        max_seqlen_k: Optional[int] = None, page_table: Optional[torch.Tensor] = None,
        kv_batch_idx: Optional[torch.Tensor] = None, leftpad_k: Optional[torch.Tensor] = None,
        rotary_cos: Optional[torch.Tensor] = None, rotary_sin: Optional[torch.Tensor] = None,
        seqlens_rotary: Optional[torch.Tensor] = None, q_descale: Optional[torch.Tensor] = None,
        k_descale: Optional[torch.Tensor] = None, v_descale: Optional[torch.Tensor] = None,
        softmax_scale: Optional[float] = None, causal: bool = False, window_size_left: int = -1,
        window_size_right: int = -1, attention_chunk: int = 0, softcap: float = 0.0, rotary_interleaved: bool = True,
        scheduler_metadata: Optional[torch.Tensor] = None, num_splits: int = 1, pack_gqa: Optional[bool] = None,
        sm_margin: int = 0,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        o, lse = _attention(q, k, v, 0.0, softmax_scale, causal)
        return o, lse, q.new_empty(0), q.new_empty(0)

    _flash_attn_forward.register_fake(lambda q, k, v, *args, **kwargs: fwd_fake(q, k, v))


def _register_xformers():
    """xformers 0.0.35: the op it defines for torch.compile (``ops/fmha/__init__.py``, a bare (B, M, H, K)
    tensor) and the custom ops of its flash / flash3 kernels (``ops/fmha/flash.py``, ``flash3.py``)."""
    lib = torch.library.Library("xformer", "DEF")
    _LIBS.append(lib)
    lib.define("memory_efficient_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? b = None, "
               "float? p = 0.0, float? scale = None) -> Tensor")
    lib.impl("memory_efficient_attention_forward",
             lambda q, k, v, b=None, p=0.0, scale=None: _attention(q, k, v, p, scale, False)[0], "CPU")
    torch.library.register_fake("xformer::memory_efficient_attention_forward",
                                lambda q, k, v, b=None, p=0.0, scale=None: q.new_empty(q.shape), lib=lib)

    @torch.library.custom_op("xformers_flash::flash_fwd", mutates_args=())
    def flash_fwd(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                  seqused_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, p: float,
                  softmax_scale: float, is_causal: bool, window_left: int, window_right: int, return_softmax: bool,
                  block_tables: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, lse = _attention(query, key, value, p, softmax_scale, is_causal)
        return out, lse, torch.zeros(2, dtype=torch.int64)

    flash_fwd.register_fake(lambda query, key, value, *args: (
        torch.empty_like(query), _lse_heads_first(query), query.new_empty((2,), dtype=torch.int64)))

    @torch.library.custom_op("xformers_flash3::flash_fwd", mutates_args=())
    def flash3_fwd(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                   seqused_k: Optional[torch.Tensor], leftpad_k: Optional[torch.Tensor], max_seqlen_q: int,
                   max_seqlen_k: int, p: float, softmax_scale: float, is_causal: bool,
                   descale_q: Optional[torch.Tensor] = None, descale_k: Optional[torch.Tensor] = None,
                   descale_v: Optional[torch.Tensor] = None, block_table: Optional[torch.Tensor] = None,
                   use_kvsplit: bool = False, window_left: int = -1, window_right: int = -1,
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
        return _attention(query, key, value, p, softmax_scale, is_causal)

    flash3_fwd.register_fake(lambda query, key, value, *args, **kwargs: (
        torch.empty_like(query), _lse_heads_first(query)))


def _register_aten_kernels_cpu():
    """SDPA's CUDA kernels have schemas and meta kernels on every build but no CPU kernel: these add one."""
    lib = torch.library.Library("aten", "IMPL")
    _LIBS.append(lib)

    def efficient(query, key, value, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                  custom_mask_type, compute_log_sumexp=False, *, scale=None, seqlen_k=None, window_size=None):
        out, lse = _attention(query, key, value, dropout_p, scale, custom_mask_type != 0)
        return out, lse, torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64), 0, 0

    def flash(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *,
              scale=None, window_size_left=None, window_size_right=None, seqused_k=None, alibi_slopes=None,
              block_table=None, num_splits=None):
        out, lse = _attention(query, key, value, dropout_p, scale, is_causal)
        empty = query.new_empty(0)
        return out, lse, torch.zeros(2, dtype=torch.int64), empty, empty

    lib.impl("_efficient_attention_forward", efficient, "CPU")
    lib.impl("_flash_attention_forward", flash, "CPU")


def _register_unlisted():
    """Ops the table does not list: a SageAttention-like quantised kernel and an unknown fused one."""
    for qualname in ("sageattention::qk_int8_sv_f16_accum_f32_attn", "mylab::fused_attention"):
        @torch.library.custom_op(qualname, mutates_args=())
        def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
            return _attention(q, k, v, 0.0, sm_scale, False)[0]

        op.register_fake(lambda q, k, v, sm_scale: torch.empty_like(q))


def register() -> None:
    """Idempotent: stand-ins only where no op of that name exists (the real package wins)."""
    if importlib.util.find_spec("flash_attn") is not None:
        import flash_attn.flash_attn_interface  # noqa: F401  (registers the real ops)
    elif not hasattr(torch.ops.flash_attn, "_flash_attn_forward"):
        _register_flash_attn_2()
    if importlib.util.find_spec("natten") is not None:
        import natten  # noqa: F401  (registers the real ops)
    elif not hasattr(torch.ops.natten, "fmha_forward"):
        _register_natten()
    if importlib.util.find_spec("flash_attn_interface") is not None:
        import flash_attn_interface  # noqa: F401  (FA3: registers the real ops)
    elif not hasattr(torch.ops.flash_attn_3, "fwd"):
        _register_flash_attn_3()
    if importlib.util.find_spec("xformers") is not None:
        import xformers.ops  # noqa: F401  (registers the real ops)
    elif not hasattr(torch.ops.xformer, "memory_efficient_attention_forward"):
        _register_xformers()
    if not getattr(register, "_cpu_done", False):
        if not torch.cuda.is_available():
            _register_aten_kernels_cpu()
        _register_unlisted()
        register._cpu_done = True
    if not getattr(register, "_fa3_done", False) and importlib.util.find_spec("diffusers") is not None:
        _register_diffusers_fa3_cpu()
        register._fa3_done = True

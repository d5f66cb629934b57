"""Whole-model FLOPs with ``torch.utils.flop_counter.FlopCounterMode``.

``FlopCounterMode`` has no formula for the CPU flash-attention op that
``F.scaled_dot_product_attention`` dispatches to on CPU
(``aten._scaled_dot_product_flash_attention_for_cpu``), so on a CPU build every SDPA call would
count as zero FLOPs. :func:`register_cpu_sdpa_flops` adds the same formula torch uses for the
CUDA flash/efficient kernels (two batched matmuls: ``2*B*H*Lq*Lk*(d + dv)``, masks and
causality not discounted); :func:`count_flops` registers it and counts one forward pass.

    from gridattn_fx.tools.flops import count_flops
    total = count_flops(model, (images,))     # int, FLOPs of model(images) under torch.no_grad()
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch.utils import flop_counter

__all__ = ["count_flops", "count_flops_by_kind", "register_cpu_sdpa_flops", "sdpa_cpu_flop"]

_aten = torch.ops.aten


def sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``_scaled_dot_product_flash_attention_for_cpu(q, k, v, ...)``.

    ``q`` is ``(B, Hq, Lq, d)``, ``k``/``v`` ``(B, Hk, Lk, d|dv)``; grouped-query attention
    (``Hk < Hq``) costs as if k/v were repeated to ``Hq`` heads, as the kernel computes it.
    """
    *lead, lq, d = query_shape
    lk, dv = key_shape[-2], value_shape[-1]
    batch_heads = 1
    for s in lead:
        batch_heads *= int(s)
    # Q K^T and P V: 2 FLOPs per multiply-add each.
    return 2 * batch_heads * int(lq) * int(lk) * (int(d) + int(dv))


def register_cpu_sdpa_flops() -> None:
    """Register :func:`sdpa_cpu_flop` for the CPU flash SDPA op (idempotent; a no-op where torch
    already has a formula for it)."""
    op = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry:
        return
    flop_counter.register_flop_formula(op)(sdpa_cpu_flop)


def count_flops(model: Any, inputs: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                *, fake: bool = True) -> int:
    """Total FLOPs of one ``model(*inputs, **kwargs)`` call under ``torch.no_grad()`` (see
    :func:`count_flops_by_kind`)."""
    return count_flops_by_kind(model, inputs, kwargs, fake=fake)[0]


def count_flops_by_kind(model: Any, inputs: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                        *, fake: bool = True) -> tuple[int, int]:
    """(all FLOPs, attention FLOPs) of one ``model(*inputs, **kwargs)`` call under ``torch.no_grad()``,
    from one counted run.

    ``model`` is any callable: an ``nn.Module``, the ``GraphModule`` returned by
    :func:`gridattn_fx.rewrite` (to count the rewritten graph), or a plain function. Counts what
    the call dispatches (matmuls, convolutions, attention, ...), with the CPU flash-SDPA formula
    registered. With ``fake=True`` (default) the inputs are fake tensors, so nothing is computed
    (milliseconds even for a large model); a model that needs real values (data-dependent control
    flow) is then run for real instead. The count is the same either way. Attention FLOPs are those
    of the scaled-dot-product-attention ops.
    """
    register_cpu_sdpa_flops()
    inputs, kwargs = tuple(inputs), dict(kwargs or {})
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.utils._pytree import tree_map

        mode = FakeTensorMode(allow_non_fake_inputs=True)

        def to_fake(x):
            return mode.from_tensor(x) if isinstance(x, torch.Tensor) else x

        try:
            fake_inputs, fake_kwargs = tree_map(to_fake, inputs), tree_map(to_fake, kwargs)
            with mode:
                return _count(model, fake_inputs, fake_kwargs)
        except Exception:  # data-dependent ops and the like: count a real run instead
            pass
    return _count(model, inputs, kwargs)


def _count(model, inputs, kwargs) -> tuple[int, int]:
    counter = flop_counter.FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*inputs, **kwargs)
    attention = sum(n for op, n in counter.get_flop_counts().get("Global", {}).items()
                    if "scaled_dot_product" in str(op))
    return int(counter.get_total_flops()), int(attention)

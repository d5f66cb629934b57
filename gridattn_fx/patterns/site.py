"""What the rest of the pipeline needs to know about one attention site, whatever form it had.

Every pattern describes its site in the SDPA convention - ``softmax(scale * q @ k^T + bias) @ v``
with the sequence on axis -2 - plus a *replacement factory*: given the site's :class:`GridPlan`
and the implementation name, it returns a function of ``site.inputs`` that computes the grid
form of the site. Layout inference, the policy and the rewrite only ever see this object, so a
new form is a new finder and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.fx as fx


@dataclass
class AttentionSite:
    form: str
    output: fx.Node          # the node whose value the replacement provides
    query: fx.Node           # the tensors whose sequence axes must carry proven image layouts
    key: fx.Node
    inputs: list[fx.Node]    # the replacement's arguments, in order
    build: Callable          # (plan, implementation) -> callable(*inputs)
    q_shape: tuple           # SDPA-convention shapes (..., L, d), possibly with SymInts
    k_shape: tuple
    v_shape: tuple
    query_dim: int = -2      # sequence axis of ``query`` / ``key`` (not -2 for e.g. seq-first MHA)
    key_dim: int = -2
    # Sequence axis of the value input (``inputs[2]``); -1 for channels-first ``v @ P^T`` sites,
    # whose output then carries the tokens on its last axis too (``query_dim`` is -1 there).
    value_dim: int = -2
    mask_shape: tuple | None = None   # the additive/bool attn_mask as the attention sees it
    mask_bool: bool = False
    relpos: tuple | None = None       # (qh, qw, kh, kw) for a decomposed relative-position bias
    dropout_p: float = 0.0
    scale: float | None = None
    is_causal: bool = False
    enable_gqa: bool = False
    nodes: list[fx.Node] = field(default_factory=list)   # matched nodes, erased when unused
    # Set when the matcher saw a site but cannot describe it exactly (e.g. a non-constant
    # dropout probability); the policy skips such sites with this reason.
    unsupported: str | None = None


def call_plan(plan, implementation: str):
    """The replacement of a site whose inputs are exactly (q, k, v[, mask])."""
    return getattr(plan, implementation)

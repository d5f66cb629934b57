"""What the rest of the pipeline needs to know about one attention site, whatever form it had."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx


@dataclass
class AttentionSite:
    """One ``softmax(scale * q @ k^T + bias) @ v`` found in a graph.

    ``output`` is the node whose value is the attention result ``(..., Lq, dv)``; the rewrite
    replaces its uses and then lets dead-code elimination drop ``nodes`` (the matched subgraph)
    once nothing else uses them. q/k/v have the sequence on axis -2 and features on axis -1.
    """

    form: str
    output: fx.Node
    query: fx.Node
    key: fx.Node
    value: fx.Node
    attn_mask: fx.Node | None = None
    dropout_p: float = 0.0
    scale: float | None = None
    is_causal: bool = False
    enable_gqa: bool = False
    nodes: list[fx.Node] = field(default_factory=list)
    # Set when the matcher saw the site but cannot describe it exactly (e.g. a non-constant
    # dropout probability); the policy skips such sites with this reason.
    unsupported: str | None = None

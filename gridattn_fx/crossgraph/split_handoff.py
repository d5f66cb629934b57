"""Layout facts carried across DDPOptimizer's bucket splits.

Under DistributedDataParallel, Dynamo's DDPOptimizer splits one captured graph at gradient-bucket
boundaries and calls the backend once per piece, in order. A piece's inputs are then plain
placeholders, so an attention site can be cut off from the conv output that proves its layout.

The pieces come from ``torch.fx.passes.split_module``, which names every placeholder after the
node of the original graph it stands for; node names are unique within that graph. So each piece
leaves the facts of its outputs under those names, and the next piece of the *same* split (keyed by
the split's DDPOptimizerContext object, which lives exactly as long as that one compile) picks them
up for its placeholders - only when the recorded shape matches as well.
"""

from __future__ import annotations

import weakref

import torch.fx as fx

from ..ir.values import shape_of

_facts_by_split: "weakref.WeakKeyDictionary[object, dict[str, tuple[object, tuple]]]" = weakref.WeakKeyDictionary()


def _current_split():
    """The DDPOptimizerContext of the split being compiled, or None outside DDPOptimizer."""
    try:
        from torch._guards import TracingContext

        ctx = TracingContext.try_get()
        return getattr(ctx, "ddp_optimizer_ctx", None) if ctx is not None else None
    except Exception:
        return None


def _signature(node: fx.Node) -> tuple | None:
    shape = shape_of(node)
    return None if shape is None else tuple(str(s) for s in shape)


def inherited_facts(gm: fx.GraphModule) -> dict[fx.Node, object]:
    """Facts for ``gm``'s placeholders left by earlier pieces of the same DDP split."""
    split = _current_split()
    known = _facts_by_split.get(split) if split is not None else None
    if not known:
        return {}
    seeds = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        fact, signature = known.get(node.name, (None, None))
        if fact is not None and signature == _signature(node):
            seeds[node] = fact
    return seeds


def leave_facts(gm: fx.GraphModule, facts: dict[fx.Node, object]) -> None:
    """Record the facts of ``gm``'s outputs for the later pieces of the same DDP split."""
    split = _current_split()
    if split is None:
        return
    known = _facts_by_split.setdefault(split, {})
    outputs = []
    fx.node.map_arg(gm.graph.output_node().args, outputs.append)
    for node in outputs:
        signature = _signature(node)
        if node in facts and signature is not None:
            known[node.name] = (facts[node], signature)

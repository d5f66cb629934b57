"""Reading the (fake) values that graph nodes carry: Dynamo's ``example_value`` or ``val``."""

from __future__ import annotations

import torch
import torch.fx as fx


def value_of(node):
    if not isinstance(node, fx.Node):
        return node
    return node.meta.get("val", node.meta.get("example_value"))


def shape_of(node) -> tuple | None:
    val = value_of(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def known_true(condition) -> bool:
    """A size condition that holds for every size the ShapeEnv allows (no guard is installed); a
    plain bool as it is."""
    if isinstance(condition, bool):
        return condition
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(condition)

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

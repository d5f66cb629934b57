"""Module paths of graph nodes, as users know them (``blocks.0.attn``), whatever the capture."""

from __future__ import annotations

import re

import torch.fx as fx
import torch.nn as nn


def module_path(node: fx.Node) -> str:
    """The dotted module path of the innermost module a node was traced in ("" at top level)."""
    entries = list((node.meta.get("nn_module_stack") or {}).values())
    # A softmax/dropout module inside an attention block is a detail: name the block.
    while len(entries) > 1 and isinstance(entries[-1][1], type) and issubclass(entries[-1][1], _LEAF_HELPERS):
        entries.pop()
    return normalize_module_path(entries[-1][0]) if entries else ""


_LEAF_HELPERS = (nn.Softmax, nn.Dropout)


def normalize_module_path(path: str) -> str:
    """Dynamo spells paths as ``L['self'].blocks[0].attn``; users know them as ``blocks.0.attn``."""
    path = re.sub(r"^L\['[^']*'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    path = re.sub(r"(^|\.)(__dict__|_modules)(?=\.)", "", path)
    # A module whose forward prepare() or diffusers' hooks wrapped (an instance attribute: a bound
    # method, or a partial over a closure that holds the module) is reached through the wrapper.
    path = re.sub(r"(^|\.)forward\.(__self__|func\.__closure__\.\d+\.cell_contents)(?=\.|$)", "", path)
    return path.lstrip(".")


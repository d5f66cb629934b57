"""The declaration that would rewrite a site whose tokens come from a model input as a flat sequence.

Pipelines that pack latents before calling the model (Flux, QwenImage, LTX-Video) hand it tokens:
no graph value proves they are an image, so the site stays dense. The fix is one line,
``gridattn_fx.prepare(model, inputs, hidden_states=ImageTokens(...))`` (crossgraph/declarations.py);
this module finds the input to name in it and, where the graph has them, the position ids that give
the grid (``ImageTokens.from_position_ids``), so that the skip reason can say that line.
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from ..ir.values import value_of

_MAX_VISITS = 5000
# Inputs whose names say they hold text or conditioning, never packed latents.
_TEXT = re.compile(r"encoder|text|caption|prompt|context|cond", re.IGNORECASE)


def input_name(node: fx.Node) -> str:
    """The forward argument a placeholder holds: named by capture() (frontends/api.py), by Dynamo's
    source (``L['hidden_states']``), or the node's target."""
    if "gridattn_input" in node.meta:
        return node.meta["gridattn_input"]
    source = _source(node)
    positional = re.fullmatch(r"L\['args'\]\[(\d+)\]", source)
    if positional:  # compiled through nn.Module.__call__(*args): the forward's name is not in the graph
        return f"<forward argument {positional.group(1)}>"
    keys = re.findall(r"\['([^']+)'\]", source)
    if keys:
        return keys[-1]
    name = str(node.target)
    return re.sub(r"^(l|L)_|_$", "", name) if name.lower().startswith("l_") else name


def _source(node: fx.Node) -> str:
    """Dynamo's name for where a placeholder's value came from (``L['self']...``, ``L['x']``)."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    if source is None:
        return ""
    name = source.name  # a property in torch 2.13, a method in older releases
    return str(name() if callable(name) else name)


def _is_parameter(node: fx.Node) -> bool:
    return "self" in _source(node) or isinstance(value_of(node), torch.nn.Parameter)


def _token_inputs(node: fx.Node) -> list[fx.Node]:
    """The model inputs of shape (B, N, C) the value of ``node`` is computed from."""
    seen, stack, found = {node}, [node], []
    while stack and len(seen) < _MAX_VISITS:
        cur = stack.pop()
        if cur.op == "placeholder":
            value = value_of(cur)
            if isinstance(value, torch.Tensor) and value.dim() == 3 and value.is_floating_point() \
                    and not _is_parameter(cur):
                found.append(cur)
            continue
        for a in cur.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return found


def _position_ids(gm: fx.GraphModule, tokens: int) -> fx.Node | None:
    """An input named like position ids holding (row, col) or (frame, row, col) for the last of
    ``tokens`` tokens (the ones before them are prefix tokens such as cls)."""
    for node in gm.graph.find_nodes(op="placeholder"):
        value = value_of(node)
        if ("ids" in input_name(node) and isinstance(value, torch.Tensor) and value.dim() in (2, 3)
                and value.shape[-1] in (2, 3) and isinstance(value.shape[-2], int) and 0 < value.shape[-2] <= tokens):
            return node
    return None


def declaration_for(gm: fx.GraphModule, node: fx.Node, seq_dim: int) -> str | None:
    """The prepare() line that would declare the tokens ``node`` attends over, or None when they do
    not come from a (B, N, C) model input."""
    try:
        return _declaration_for(gm, node, seq_dim)
    except Exception:  # a hint for the report must never cost the graph its rewrite
        return None


def _declaration_for(gm: fx.GraphModule, node: fx.Node, seq_dim: int) -> str | None:
    shape = getattr(value_of(node), "shape", None)
    if shape is None:
        return None
    if getattr(value_of(node), "placements", None) is not None:
        # torch's context parallelism: the model received one rank's chunk; declaring that chunk an
        # image would be wrong (the DTensor attends over every rank's tokens)
        return ("the query is a DTensor over every rank's tokens (torch's context parallelism): if the sharded "
                "input holds image tokens, shard it with gridattn_fx.GroupSharding(mesh, grid=..., stride=...) "
                "so that each rank holds whole grid groups")
    length = shape[seq_dim]
    inputs = [p for p in _token_inputs(node)
              if isinstance(value_of(p).shape[1], int) and isinstance(length, int) and value_of(p).shape[1] <= length]
    if not inputs:
        return None
    source = max(inputs, key=lambda p: value_of(p).shape[1])  # the image, not the text of a joint attention
    name, tokens = input_name(source), value_of(source).shape[1]
    if name.startswith("_"):
        return None  # a value Dynamo carried across a graph break (``___stack0``), not a model input
    ids = _position_ids(gm, tokens)
    if ids is None and _TEXT.search(name):
        return None  # text / conditioning tokens: a declaration would be wrong, not a fix
    if ids is not None:
        prefix = tokens - value_of(ids).shape[-2]
        extra = f", prefix={prefix}" if prefix else ""
        return (f"if `{name}` holds packed image tokens, declare them: gridattn_fx.prepare(model, inputs, "
                f"{name}=ImageTokens.from_position_ids(\"{input_name(ids)}\"{extra}))")
    return (f"if `{name}` holds {tokens} packed image tokens in raster order, declare them: "
            f"gridattn_fx.prepare(model, inputs, {name}=ImageTokens(height=H, width=W)) with H * W = {tokens} "
            f"(a video: ImageTokens(frames=T, height=H, width=W))")

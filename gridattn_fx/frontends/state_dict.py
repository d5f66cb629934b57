"""The model's own state_dict keys on the GraphModule that ``rewrite()`` returns.

Dynamo registers the parameters and buffers a graph reads under flat names
(``L__self___blocks_0_attn_qkv_weight``), so the model's checkpoints would not load into the graph
module. :func:`with_model_state` registers every parameter and buffer of the model under its
original path (``blocks.0.attn.qkv.weight``, in empty container modules shaped like the model's
tree, with the same persistence), points the graph's ``get_attr`` nodes at those paths, and drops
the flat names, on a copy of the graph module. Afterwards ``gm.state_dict()`` has exactly the keys of ``model.state_dict()`` and
``gm.load_state_dict(model.state_dict())`` works (strict). The tensors are the model's own (as in
Dynamo's graph), so loading into one loads into the other.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from ..ir.graphs import copy_graph_module

logger = logging.getLogger("gridattn_fx")

# Dynamo's record of which model path each flat attribute name came from.
_FLAT_TO_FQN = "dynamo_flat_name_to_original_fqn"


def with_model_state(gm: fx.GraphModule, model: torch.nn.Module) -> fx.GraphModule:
    """A copy of ``gm`` with the state_dict keys of ``model`` (see the module docstring). Where that
    is impossible (a top-level name of the model clashes with a GraphModule attribute: ``graph``,
    ``code``, ...; a tensor Dynamo attributes to the model is not the model's; anything failing)
    ``gm`` itself comes back, with Dynamo's flat names and ``gm.meta["dynamo_flat_name_to_original_fqn"]``
    (flat name -> model path)."""
    try:
        renamed = _renamed(gm, model)
    except Exception:  # never lose the rewrite over names
        logger.warning("gridattn: state_dict keys left as Dynamo's flat names", exc_info=True)
        return gm
    return gm if renamed is None else renamed


def _renamed(gm: fx.GraphModule, model: torch.nn.Module) -> fx.GraphModule | None:
    flat_to_fqn = dict(getattr(gm, "meta", {}).get(_FLAT_TO_FQN, {}))
    # The model's tensors by identity (Dynamo's own mapping names one path per tensor, and not
    # always the one a shared tensor is read through).
    path_of = {}
    for path, tensor in [*model.named_parameters(remove_duplicate=False),
                         *model.named_buffers(remove_duplicate=False)]:
        path_of.setdefault(id(tensor), path)
    retarget = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in retarget:
            continue
        tensor = _attr(gm, node.target)
        if isinstance(tensor, torch.Tensor) and id(tensor) in path_of:
            retarget[node.target] = path_of[id(tensor)]
        elif node.target in flat_to_fqn:  # Dynamo says it is the model's, but it is another tensor
            logger.info("gridattn: state_dict keys left as Dynamo's flat names (%s is not the model's %s)",
                        node.target, flat_to_fqn[node.target])
            return None
        # else: a constant that Dynamo or the pass added, not model state: left as it is
    top_level = {path.split(".")[0] for path in path_of.values()} | {name for name, _ in model.named_children()}
    top_level |= {key.split(".")[0] for key in model.state_dict()}
    clashes = sorted(name for name in top_level if hasattr(gm, name) and name not in retarget)
    if clashes:
        logger.info("gridattn: state_dict keys left as Dynamo's flat names (%s would clash with "
                    "GraphModule attributes)", ", ".join(clashes))
        return None

    gm = copy_graph_module(gm)
    for target in retarget:
        if hasattr(gm, target):
            delattr(gm, target)
    containers = {"": gm}
    for path, module in model.named_modules(remove_duplicate=False):
        if path:
            parent, _, name = path.rpartition(".")
            containers[path] = torch.nn.Module()
            containers[parent].add_module(name, containers[path])
    for path, module in model.named_modules(remove_duplicate=False):
        container = containers[path]
        for name, param in module._parameters.items():
            if param is not None:
                container.register_parameter(name, param)
        for name, buf in module._buffers.items():
            if buf is not None:
                container.register_buffer(name, buf, persistent=name not in module._non_persistent_buffers_set)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in retarget:
            node.target = retarget[node.target]
    gm.graph.lint()
    gm.recompile()
    return gm


def _attr(module: torch.nn.Module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj

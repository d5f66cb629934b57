"""``rewrite()``: the backend's pass without compiling, returning a GraphModule to inspect or run."""

from __future__ import annotations

import torch
import torch.fx as fx

from ..config.options import GridAttnConfig
from ..report import Report
from .backend import apply_pass
from .state_dict import with_model_state


def capture(model: torch.nn.Module, example_inputs) -> fx.GraphModule:
    """One Dynamo graph of ``model`` called as ``model(*example_inputs)``: the graph the backend sees.

    The returned module takes the same inputs and returns the same structure as ``model``.
    """
    import torch._dynamo

    # Static sizes, like the backend's first compile of a model: layouts are proven per resolution.
    # A model prepared by gridattn_fx.prepare has a forward pre-hook, which Dynamo would trace as a
    # frame of its own: export its forward (the whole model, which needs no remembered layouts).
    target = model.forward if "_gridattn_prepared" in model.__dict__ else model
    gm, _guards = torch._dynamo.export(target, assume_static_by_default=True)(*example_inputs)
    _name_inputs(gm, model.forward, example_inputs)
    return gm


def _name_inputs(gm: fx.GraphModule, forward, example_inputs) -> None:
    """Export names its inputs ``arg0``...; record the forward parameter each one is (``meta
    ["gridattn_input"]``), so that reports name ``hidden_states`` (crossgraph/suggest.py)."""
    import inspect

    from torch.utils._pytree import tree_leaves

    try:
        bound = inspect.signature(forward).bind(*example_inputs)
    except (TypeError, ValueError):
        return
    names = [name for name, value in bound.arguments.items() for _leaf in tree_leaves(value)]  # export's order
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    if len(names) == len(placeholders):
        for node, name in zip(placeholders, names):
            node.meta["gridattn_input"] = name


def rewrite(model_or_graph_module, example_inputs, config: GridAttnConfig | None = None, **options
            ) -> tuple[fx.GraphModule, Report]:
    """Run the gridattn pass on a model (captured with Dynamo) or an existing GraphModule.

    Options are the same as the backend's; they override fields of ``config`` when both are given.

    The returned GraphModule is specialised to the shapes of ``example_inputs``: its first op checks
    that every tensor input has exactly its example shape and raises a ``ValueError`` naming the
    shapes it was rewritten for otherwise. Token layouts are proven for one resolution (16x16 and
    8x32 tokens have the same count but different grids), and the batch size is held fixed too: the
    inserted grid attention does not depend on it, but the graph around it was captured with static
    sizes, so the model's own reshapes carry the example batch size as constants, and a view that
    folds the batch into the token axis would silently change the token count the layouts were
    proven for. For inputs of other shapes call ``rewrite()`` again, or use
    ``torch.compile(backend="gridattn")``, which rewrites every shape it compiles. Only a
    GraphModule passed in and returned unchanged (the pass fell back) is left without the check.

    For an ``nn.Module``, the returned GraphModule has the module's state_dict keys and shares its
    tensors: ``gm.load_state_dict(model.state_dict())`` works (gridattn_fx/frontends/state_dict.py).
    """
    example_inputs = tuple(example_inputs)
    config = config or GridAttnConfig()
    if options:
        config = config.with_options(**options)
    if isinstance(model_or_graph_module, fx.GraphModule):
        gm = model_or_graph_module
    elif isinstance(model_or_graph_module, torch.nn.Module):
        gm = capture(model_or_graph_module, example_inputs)
    else:
        raise TypeError(f"rewrite() takes an nn.Module or fx.GraphModule, got {type(model_or_graph_module).__name__}")
    # The returned graph is fixed: shuffle distributing is baked in when the module is training now.
    new_gm, report = apply_pass(gm, example_inputs, config, training=model_or_graph_module.training)
    if not isinstance(model_or_graph_module, fx.GraphModule):
        new_gm = with_model_state(new_gm, model_or_graph_module)  # the model's state_dict keys
    if new_gm is not model_or_graph_module:  # never edit the caller's own module
        insert_shape_check(new_gm)
    return new_gm, report


def _shape(value) -> tuple[int, ...] | None:
    """The example shape of a placeholder's value (symbolic sizes at their example hints)."""
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return tuple(int(s) for s in value.shape)
    except Exception:  # a size without a hint: nothing to check it against
        return None


@fx.node.has_side_effect  # no users, but must survive dead-code elimination
def check_input_shapes(inputs: tuple, expected: tuple, names: tuple) -> None:
    """Raise a ``ValueError`` unless every input has its ``expected`` shape (see :func:`rewrite`)."""
    got = tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs)
    if got == expected:
        return
    wrong = [f"{name} of shape {g} (rewritten for {e})" for name, g, e in zip(names, got, expected) if g != e]
    raise ValueError(
        "this GraphModule was rewritten by gridattn_fx.rewrite() for tensor inputs of shapes "
        f"{', '.join(str(e) for e in expected)} and only holds for them (token layouts, grid groups "
        f"and the captured graph's sizes are fixed); called with {', '.join(wrong)}. Call "
        "gridattn_fx.rewrite() again with example inputs of these shapes, or use "
        "torch.compile(model, backend='gridattn')."
    )


def insert_shape_check(gm: fx.GraphModule) -> None:
    """Insert one :func:`check_input_shapes` call on the tensor placeholders, after the placeholders."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    checked = []
    for index, node in enumerate(placeholders):
        shape = _shape(node.meta.get("val", node.meta.get("example_value")))
        if shape is not None:
            checked.append((node, shape, f"input {index} (`{node.name}`)"))
    if not checked:
        return
    with gm.graph.inserting_after(placeholders[-1]):
        gm.graph.call_function(check_input_shapes, (
            tuple(c[0] for c in checked), tuple(c[1] for c in checked), tuple(c[2] for c in checked)))
    gm.graph.lint()
    gm.recompile()

"""``rewrite()``: the backend's pass without compiling, returning a GraphModule to inspect or run."""

from __future__ import annotations

import torch
import torch.fx as fx

from .config import GridAttnConfig
from .dynamo_backend import apply_pass
from .report import Report
from .state_dict import with_model_state


def capture(model: torch.nn.Module, example_inputs) -> fx.GraphModule:
    """One Dynamo graph of ``model`` called as ``model(*example_inputs)``: the graph the backend sees.

    The returned module takes the same inputs and returns the same structure as ``model``.
    """
    import torch._dynamo

    # Static sizes, like the backend's first compile of a model: layouts are proven per resolution.
    gm, _guards = torch._dynamo.export(model, assume_static_by_default=True)(*example_inputs)
    return gm


def rewrite(model_or_graph_module, example_inputs, config: GridAttnConfig | None = None, **options
            ) -> tuple[fx.GraphModule, Report]:
    """Run the gridattn pass on a model (captured with Dynamo) or an existing GraphModule.

    Options are the same as the backend's; they override fields of ``config`` when both are given.
    For an ``nn.Module``, the returned GraphModule has the module's state_dict keys and shares its
    tensors: ``gm.load_state_dict(model.state_dict())`` works (gridattn_fx/state_dict.py).
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
    return new_gm, report

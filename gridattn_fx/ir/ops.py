"""Canonical names for what a node computes, across Dynamo, fx.symbolic_trace and ATen graphs.

``torch.conv2d``, ``F.conv2d``, ``nn.Conv2d`` modules and ``aten.conv2d`` all read as "conv2d";
``x.add_(y)``, ``operator.add`` and ``torch.add`` as "add". Patterns and the layout analysis match
on these names instead of on every spelling.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

# --- op naming --------------------------------------------------------------------------------

_TRUSTED_MODULES = ("torch", "_operator", "operator", "builtins", "math")

_MODULE_OPS = {
    nn.Conv2d: "conv2d", nn.ConvTranspose2d: "conv_transpose2d", nn.MaxPool2d: "max_pool2d",
    nn.AvgPool2d: "avg_pool2d", nn.AdaptiveAvgPool2d: "adaptive_avg_pool2d",
    nn.AdaptiveMaxPool2d: "adaptive_max_pool2d", nn.Upsample: "interpolate", nn.PixelShuffle: "pixel_shuffle",
    nn.Linear: "linear", nn.LayerNorm: "layer_norm", nn.GroupNorm: "group_norm", nn.BatchNorm2d: "batch_norm",
    nn.InstanceNorm2d: "instance_norm", nn.Dropout: "dropout", nn.Identity: "clone", nn.GELU: "gelu",
    nn.ReLU: "relu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Mish: "mish",
    nn.Hardswish: "hardswish", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu", nn.Softplus: "softplus",
    nn.Flatten: "flatten", nn.BatchNorm1d: "batch_norm", nn.Conv3d: "conv3d", nn.ConvTranspose3d: "conv_transpose3d",
    nn.MaxPool3d: "max_pool3d", nn.AvgPool3d: "avg_pool3d", nn.AdaptiveAvgPool3d: "adaptive_avg_pool3d",
    nn.AdaptiveMaxPool3d: "adaptive_max_pool3d", nn.BatchNorm3d: "batch_norm", nn.InstanceNorm3d: "instance_norm",
}


def op_name(node: fx.Node, gm: fx.GraphModule | None = None) -> str | None:
    """A canonical name for what a node computes, across Dynamo, symbolic_trace and ATen graphs."""
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            name = target.overloadpacket.__name__
        else:
            module = getattr(target, "__module__", None)
            if module is not None and not module.startswith(_TRUSTED_MODULES):
                return None
            name = getattr(target, "__name__", None)
    elif node.op == "call_module" and gm is not None:
        mod = gm.get_submodule(node.target)
        name = next((n for cls, n in _MODULE_OPS.items() if type(mod) is cls), None)
    else:
        return None
    if name is None:
        return None
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]  # operator.__add__ and friends
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]  # in-place variants keep positions exactly like their functional twins
    return name


# --- mutation ---------------------------------------------------------------------------------

_INPLACE_OPERATORS = {
    "iadd", "isub", "imul", "itruediv", "ifloordiv", "ipow", "imod", "iand", "ior", "ixor", "ilshift",
    "irshift", "imatmul", "setitem",
}


def mutates(node: fx.Node) -> bool:
    """Whether ``node`` writes into one of its tensor arguments (``x.copy_(y)``, ``x[i] = y``,
    ``x += y``, a mutable ATen overload, an ``out=`` argument)."""
    target = node.target
    if node.op == "call_method":
        if target.startswith("__") and target.endswith("__"):
            return target[2:-2] in _INPLACE_OPERATORS  # x.__setitem__(i, y), x.__iadd__(y)
        return target.endswith("_") and not target.startswith("_")
    if node.op != "call_function":
        return False
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    if isinstance(node.kwargs.get("out"), fx.Node):
        return True
    name = getattr(target, "__name__", "") or ""
    return (name.endswith("_") and not name.startswith("_")) or name in _INPLACE_OPERATORS


def written_args(node: fx.Node) -> list[fx.Node]:
    """The arguments a mutating node writes into (its destination; for ATen overloads, every
    argument the schema marks as written)."""
    if isinstance(node.target, torch._ops.OpOverload):
        written = []
        for i, arg in enumerate(node.target._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
                if isinstance(value, fx.Node):
                    written.append(value)
        return written
    out = node.kwargs.get("out")
    if isinstance(out, fx.Node):
        return [out]
    return [node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else []

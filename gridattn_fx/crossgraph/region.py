"""Which modules of a prepared model a graph belongs to: the module paths of regional compilation.

Regional compilation (``block.compile()``, diffusers' ``compile_repeated_blocks``) and graph breaks
hand the backend a graph whose module paths start at the compiled module (``attn`` rather than
``blocks.3.attn``), and Dynamo serves every module that runs the same code under the same guards
from that one graph. Options that depend on the path (``include`` / ``exclude``, ``site_strides``,
presets that select by path) need the path in the whole model, and may only be applied when they
decide alike for every module the graph can serve.

For a model :func:`gridattn_fx.prepare` has seen, the real parameters among the graph's inputs name
the compiled module (Dynamo lifts them as inputs and hands the backend the parameters themselves);
the modules that can share its graph are those of the same class with parameters of the same
shapes (a graph is specialised on both). That set may be larger than the modules that really share
it (other guards can split them further), which only makes the agreement check stricter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from .prepare import prepared_models

_SEGMENT = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_][A-Za-z0-9_]*)")
_ROOT = re.compile(r"^L\['[^']+'\]")


@dataclass(frozen=True)
class Region:
    prefix: str                 # the compiled module's path in the prepared model ("" = the model)
    sharing: tuple[str, ...]    # every module path that may run this same graph, prefix first

    def full_path(self, relative: str, prefix: str | None = None) -> str:
        return ".".join(p for p in (self.prefix if prefix is None else prefix, relative) if p)

    def paths(self, relative: str) -> list[str]:
        """The site's path in every module this graph may serve."""
        return [self.full_path(relative, prefix) for prefix in self.sharing]


def _relative_name(source_name: str) -> str | None:
    """``L['self']._modules['attn']._parameters['weight']`` -> ``attn.weight``."""
    root = _ROOT.match(source_name)
    if root is None:
        return None
    rest, names = source_name[root.end():], []
    while rest:
        m = _SEGMENT.match(rest)
        if m is None:
            return None
        names.append(m.group(1) or m.group(2))
        rest = rest[m.end():]
    return ".".join(names) if names else None


def _shape_signature(module: torch.nn.Module) -> tuple:
    return (type(module), tuple((n, tuple(p.shape)) for n, p in module.named_parameters()))


def find_region(gm: fx.GraphModule, example_inputs) -> Region | None:
    """The region of a prepared model this graph was compiled from, or None (not a prepared model's,
    or no parameter among the inputs to tell)."""
    models = prepared_models()
    if not models:
        return None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for model in models:
        names = {id(t): n for n, t in model.named_parameters(remove_duplicate=False)}
        names.update({id(t): n for n, t in model.named_buffers(remove_duplicate=False)})
        prefixes = set()
        for node, value in zip(placeholders, example_inputs):
            full = names.get(id(value)) if isinstance(value, torch.Tensor) else None
            grapharg = node.meta.get("grapharg")
            source = getattr(getattr(grapharg, "source", None), "name", None)
            relative = _relative_name(source() if callable(source) else source) if source else None
            if full is None or relative is None:
                continue
            if full == relative:
                prefixes.add("")
            elif full.endswith("." + relative):
                prefixes.add(full[: -len(relative) - 1])
        if len(prefixes) != 1:
            continue  # none of this model's parameters, or tied weights that name two modules
        (prefix,) = prefixes
        if not prefix:
            return Region("", ("",))
        root = model.get_submodule(prefix)
        signature = _shape_signature(root)
        sharing = [prefix] + [path for path, module in model.named_modules()
                              if path != prefix and path and _shape_signature(module) == signature]
        return Region(prefix, tuple(sharing))
    return None

"""Reading and removing the ``gridattn::layout_hint`` markers that prepare() puts into graphs.

A marker says "this tensor holds that layout" (gridattn_fx/crossgraph/markers.py). The pass takes it off
the graph before anything else looks at the graph (patterns and the regrouping motion then see the
same graph as without prepare()), and hands the layout to :class:`LayoutAnalysis` as a fact about
the marked tensor itself: the marker is an alias, so the fact holds for every reader of that tensor.
"""

from __future__ import annotations

import torch.fx as fx

from .markers import is_layout_hint, is_probe
from ..layout.analysis import Spatial, Tokens, _positions, _resolve, _single_frame_is_an_image, module_path

DECLARED = "declared"
REMEMBERED = "remembered by prepare"


def hint_fact(node: fx.Node):
    """The fact a marker node states about its input."""
    _x, dims, sizes, transposed, declared = node.args
    dims, sizes = list(dims), [_resolve(s) for s in sizes]
    where = module_path(node)
    origin = (DECLARED if declared else REMEMBERED) + (f" (at `{where}`)" if where else f" (`{node.args[0].name}`)")
    # The marked tensor is one image per batch entry, named after the tensor it marks, like a
    # spatial source (layout/analysis.py): two marked tensors are two images to the cross-image rule.
    image, batch = (("root", node.args[0].name),), (1,) if 0 in dims else (0,)
    if len(dims) == 1 and len(sizes) in (4, 5):
        # [prefix, (frames,) height, width, suffix]; ``transposed``: the last two axes column-major
        prefix, *image_shape, suffix = sizes
        order = list(range(len(image_shape)))
        if transposed:
            order[-2:] = order[-1], order[-2]
        return _single_frame_is_an_image(Tokens(dims[0], prefix, tuple(image_shape), suffix, tuple(order),
                                                origin=origin, image=image, batch=batch))
    if len(dims) in (2, 3) and len(sizes) == len(dims) and not transposed:
        return _single_frame_is_an_image(Spatial(tuple(dims), tuple(sizes), origin=origin, image=image, batch=batch))
    raise ValueError(f"malformed gridattn::layout_hint {node.name}: dims={dims}, sizes={sizes}")


def strip_layout_hints(gm: fx.GraphModule) -> tuple[dict[fx.Node, object], dict[fx.Node, str]]:
    """Remove every marker (and capture probe) from ``gm``; returns the hinted facts by marked
    tensor, and the tensors whose markers disagree with each other (no fact, with the reason)."""
    hints: dict[fx.Node, object] = {}
    conflicts: dict[fx.Node, str] = {}
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not (is_layout_hint(node.target) or is_probe(node.target)):
            continue
        source = node.args[0]
        if is_layout_hint(node.target) and source not in conflicts:
            fact = hint_fact(node)
            if source in hints and _positions(hints[source]) != _positions(fact):
                del hints[source]
                conflicts[source] = f"two layouts stated for `{source.name}` ({fact.origin} and another)"
            else:
                hints.setdefault(source, fact)
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
    return hints, conflicts

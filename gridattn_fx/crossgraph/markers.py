"""The ``gridattn::layout_hint`` marker: a token layout attached to a tensor inside a traced graph.

``gridattn_fx.prepare`` (crossgraph/prepare.py) puts it, through forward pre-hooks, on the inputs of the
modules whose tokens carry an image layout, so that a graph that starts at tokens (a regionally
compiled block, the piece after a graph break) still knows what they are. It is an alias of its
input (CompositeImplicitAutograd: any backend other than ``gridattn`` sees ``aten.alias``, a free
view); the ``gridattn`` pass reads it as a layout source (crossgraph/hints.py) and removes it.

Encoding: ``dims`` is ``[seq_dim]`` for a token axis, with ``sizes = [prefix, height, width,
suffix]`` (a video: ``[prefix, frames, height, width, suffix]``; ``transposed``: the last two image
axes are stored column-major), or one axis per image axis (``[h_dim, w_dim]``, a video ``[t_dim,
h_dim, w_dim]``) with ``sizes`` the image's sizes;
``declared`` tells the report whether the layout was declared by the user (gridattn_fx.ImageTokens)
or remembered by prepare() from a whole-model proof.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.fx as fx

from ..ir.module_paths import module_path
from ..ir.op_catalogue import resolve
from ..layout.facts import LayoutSource, Spatial, Tokens, _single_frame_is_an_image

_LIB = torch.library.Library("gridattn", "DEF")
_LIB.define("layout_hint(Tensor(a) x, int[] dims, SymInt[] sizes, bool transposed, bool declared) -> Tensor(a)")
# prepare()'s capture marks every module input with its own key, to read the facts there.
_LIB.define("probe(Tensor(a) x, int key) -> Tensor(a)")


def _alias(x, *_args):
    return torch.ops.aten.alias.default(x)


_LIB.impl("layout_hint", _alias, "CompositeImplicitAutograd")
_LIB.impl("probe", _alias, "CompositeImplicitAutograd")

LAYOUT_HINT = torch.ops.gridattn.layout_hint.default
PROBE = torch.ops.gridattn.probe.default


def is_layout_hint(target) -> bool:
    return target is LAYOUT_HINT or target is torch.ops.gridattn.layout_hint


def is_probe(target) -> bool:
    return target is PROBE or target is torch.ops.gridattn.probe


# --- the codec: a fact <-> a marker's arguments -----------------------------------------------------

class MarkerHint(NamedTuple):
    """A layout as a marker states it. ``lengths`` are the sizes of ``dims`` the marked tensor must
    have (checked before marking); the rest is the op's arguments (see the module docstring)."""

    ndim: int
    dims: tuple
    sizes: tuple
    lengths: tuple
    transposed: bool
    declared: bool

    @classmethod
    def tokens(cls, ndim: int, dim: int, prefix: int, image_shape, suffix: int, transposed: bool,
               declared: bool) -> "MarkerHint":
        """The marker of ``prefix`` tokens, an image (or video) in raster order (``transposed``: the
        last two axes column-major), then ``suffix`` tokens, on axis ``dim`` of a rank-``ndim`` tensor."""
        length = prefix + math.prod(image_shape) + suffix
        return cls(ndim, (dim,), (prefix, *image_shape, suffix), (length,), transposed, declared)

    @classmethod
    def of_fact(cls, fact, ndim: int) -> "MarkerHint | None":
        """The marker for a proven fact of a tensor of rank ``ndim``; None when a marker cannot
        state it (symbolic sizes, tokens merged with outer axes, an order other than row-major or
        "last two axes column-major")."""
        declared = fact.source is LayoutSource.DECLARED
        if isinstance(fact, Tokens):
            if fact.lead:
                return None  # tokens merged with outer axes: not a layout of this input's token axis
            sizes = (fact.prefix, *fact.image_shape, fact.suffix)
            if not all(isinstance(s, int) for s in sizes):
                return None
            row_major = tuple(range(fact.rank))
            transposed = fact.order != row_major
            if transposed and fact.order != row_major[:-2] + (fact.rank - 1, fact.rank - 2):
                return None
            return cls.tokens(ndim, fact.dim, fact.prefix, fact.image_shape, fact.suffix, transposed, declared)
        if isinstance(fact, Spatial):
            sizes = tuple(fact.sizes)
            if not all(isinstance(s, int) for s in sizes):
                return None
            return cls(ndim, tuple(fact.axes), sizes, sizes, False, declared)
        return None

    def mark(self, x: torch.Tensor) -> torch.Tensor:
        return LAYOUT_HINT(x, list(self.dims), list(self.sizes), self.transposed, self.declared)

    def __str__(self) -> str:
        if len(self.dims) == 1:
            prefix, *image_shape, suffix = self.sizes
            text = f"{prefix}+{'x'.join(map(str, image_shape))}+{suffix} tokens on axis {self.dims[0]}"
        else:
            kind = "video" if len(self.sizes) == 3 else "image"
            text = f"{'x'.join(map(str, self.sizes))} {kind} on axes {self.dims}"
        return text + (" (col-major)" if self.transposed else "") + (" (declared)" if self.declared else "")


def fact_of_marker(node: fx.Node):
    """The fact a marker node states about its input (the inverse of :meth:`MarkerHint.of_fact`)."""
    x, dims, sizes, transposed, declared = node.args
    dims, sizes = list(dims), [resolve(s) for s in sizes]
    source = LayoutSource.DECLARED if declared else LayoutSource.REMEMBERED
    where = module_path(node)
    origin = source.value + (f" (at `{where}`)" if where else f" (`{x.name}`)")
    # The marked tensor is one image per batch entry, named after the tensor it marks, like a
    # spatial source (layout/analysis.py): two marked tensors are two images to the cross-image rule.
    image, batch = (("root", x.name),), (1,) if 0 in dims else (0,)
    if len(dims) == 1 and len(sizes) in (4, 5):
        # [prefix, (frames,) height, width, suffix]; ``transposed``: the last two axes column-major
        prefix, *image_shape, suffix = sizes
        order = list(range(len(image_shape)))
        if transposed:
            order[-2:] = order[-1], order[-2]
        return _single_frame_is_an_image(Tokens(dims[0], prefix, tuple(image_shape), suffix, tuple(order),
                                                origin=origin, image=image, batch=batch, source=source,
                                                marked=x.name))
    if len(dims) in (2, 3) and len(sizes) == len(dims) and not transposed:
        return _single_frame_is_an_image(Spatial(tuple(dims), tuple(sizes), origin=origin, image=image, batch=batch,
                                                 source=source, marked=x.name))
    raise ValueError(f"malformed gridattn::layout_hint {node.name}: dims={dims}, sizes={sizes}")

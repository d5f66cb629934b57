"""Position values as a layout source: tokens whose image is known only from the positions the model
gives them.

Flux, Chroma, Flux 2 and LTX-Video receive latents that the pipeline packed into a sequence before
calling the model: no op of the graph shows rows and columns. What the model does know is where each
token is: a rotary embedding built from per-token coordinates (Flux's ``img_ids``: one row
``(0, r, c)`` per token) or from a coordinate grid computed in the graph (LTX-Video:
``meshgrid(arange(F), arange(H), arange(W))``). A table computed position by position from those
coordinates and multiplied into q and k gives each query and key token the model's own position;
grouping tokens by those positions is the grid of the positions the model attends with.

Two sources, both facts with ``source=LayoutSource.POSITIONS``:

* :func:`position_grid` reads a model input's *values* (at compile time) and recognises the
  coordinates of a grid in raster order. A value read at compile time is true only of the call it
  was read from, so the backend checks the input at every call (frontends/position_guard.py) and
  compiles again for other positions.
* :func:`coordinate_grid` proves it structurally: ``torch.meshgrid`` of increasing ``arange``s is
  a grid by construction, whatever the sizes.

The layout analysis then carries these facts like any other (cat with text ids, rotary tables,
pointwise products with q and k).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
import torch.fx as fx

from ..ir.graphs import placeholder_inputs
from ..ir.op_catalogue import CASTS
from ..ir.ops import op_name
from ..ir.values import value_of
from .facts import LayoutSource, Spatial, Tokens, _single_frame_is_an_image

# Coordinates per token: (frame,) row and column, plus constant columns (Flux's 0, Flux 2's t and l).
_MAX_COORDINATES = 4


class PositionGrid(NamedTuple):
    """What a position-id input holds: axis ``dim`` enumerates the tokens of an image (a video:
    ``sizes`` has three entries) whose coordinate of logical axis i is column ``columns[i]``,
    stored in ``order`` (the logical axes outermost first)."""

    dim: int
    sizes: tuple
    columns: tuple
    order: tuple

    def text(self) -> str:
        return "x".join(str(s) for s in self.sizes)


def position_grid(value) -> PositionGrid | None:
    """The grid whose coordinates ``value`` lists, one token per row: a real ``(tokens, k)`` or
    ``(batch, tokens, k)`` tensor (every batch entry the same) with ``k <= 4`` columns, of which
    two (an image) or three (a video) vary and enumerate every point of a grid of at least 2 x 2
    exactly once, in a raster order; the other columns are constant. Coordinates need not be
    0, 1, 2, ...: any increasing values along an axis are that axis's positions (LTX-Video's are
    scaled, Qwen-Image's centred). None for anything else, including fake tensors."""
    if not _readable(value) or value.dim() not in (2, 3) or not 2 <= value.shape[-1] <= _MAX_COORDINATES:
        return None
    ids = value
    if ids.dim() == 3:
        if ids.shape[0] == 0 or not all(torch.equal(ids[0], ids[b]) for b in range(1, ids.shape[0])):
            return None
        ids = ids[0]
    length = ids.shape[0]
    ranks, columns, sizes = [], [], []
    for c in range(ids.shape[1]):
        levels, rank = torch.unique(ids[:, c], sorted=True, return_inverse=True)
        if levels.numel() > 1:
            columns.append(c)
            sizes.append(levels.numel())
            ranks.append(rank)
    if len(columns) not in (2, 3) or math.prod(sizes) != length or min(sizes[-2:]) < 2:
        return None
    expected = torch.arange(length, device=ids.device)
    for order in itertools.permutations(range(len(columns))):
        flat, stride = torch.zeros_like(expected), 1
        for axis in reversed(order):  # the innermost axis has stride 1
            flat = flat + ranks[axis] * stride
            stride *= sizes[axis]
        if torch.equal(flat, expected):
            return PositionGrid(value.dim() - 2, tuple(sizes), tuple(columns), tuple(order))
    return None


def _readable(value) -> bool:
    """A tensor whose values exist here (not a fake or meta tensor, not a symbolic size)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return (isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor) and value.device.type != "meta"
            and not value.is_complex() and value.numel() > 0
            and all(isinstance(s, int) for s in value.shape))


def position_fact(grid: PositionGrid, node: fx.Node, gm: fx.GraphModule) -> Tokens:
    """The fact of a position-id input: its token axis is the grid, read from its values."""
    text = f"position values of model input `{node.name}` ({grid.text()}, checked at every call)"
    return _single_frame_is_an_image(Tokens(
        grid.dim, 0, grid.sizes, 0, grid.order, origin=text, image=(("root", node.name, id(gm)),),
        batch=(0,) if grid.dim == 1 else (), source=LayoutSource.POSITIONS))


def read_position_inputs(gm: fx.GraphModule, example_inputs) -> dict[fx.Node, Tokens]:
    """The placeholders of ``gm`` whose example input lists grid coordinates (:func:`position_grid`)."""
    found = {}
    for node, value in placeholder_inputs(gm, example_inputs):
        traced = value_of(node)
        if isinstance(traced, torch.Tensor) and not all(isinstance(s, int) for s in traced.shape):
            continue  # symbolic sizes: the compile-time values fix only one of the sizes it serves
        grid = position_grid(value)
        if grid is not None:
            found[node] = position_fact(grid, node, gm)
    return found


def coordinate_grid(node: fx.Node, gm: fx.GraphModule):
    """``torch.meshgrid(a, b[, c], indexing="ij")`` of increasing ``arange``s: each output's axes
    are the grid's axes (frames,) rows and columns. A tuple of facts, one per output, or None."""
    first = node.args[0] if node.args else node.kwargs.get("tensors")
    tensors = list(first) if isinstance(first, (list, tuple)) else list(node.args)
    if node.kwargs.get("indexing") != "ij" or len(tensors) not in (2, 3):
        return None  # "xy" swaps the first two axes; no indexing given is "ij" with a warning, rare
    if not all(isinstance(t, fx.Node) and _increasing_arange(t, gm) for t in tensors):
        return None
    sizes = tuple(value_of(t).shape[0] for t in tensors)
    origin = f"coordinate grid `{node.name}` ({'x'.join(str(s) for s in sizes)}, position values computed in the graph)"
    fact = _single_frame_is_an_image(Spatial(tuple(range(len(sizes))), sizes, origin=origin,
                                             image=(("root", node.name, id(gm)),), source=LayoutSource.POSITIONS))
    return tuple(fact for _ in tensors)


def _increasing_arange(node: fx.Node, gm: fx.GraphModule) -> bool:
    """``arange(...)`` with a positive step (positions in increasing order), seen through casts."""
    while op_name(node, gm) in CASTS and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    if op_name(node, gm) != "arange":
        return False
    values = [a for a in node.args if not isinstance(a, (torch.dtype, torch.device))]
    step = node.kwargs.get("step", values[2] if len(values) > 2 else 1)
    value = value_of(node)
    return (isinstance(step, (int, float)) and step > 0 and isinstance(value, torch.Tensor) and value.dim() == 1)

"""Grid Clustering / Recovering: the regrouping of a token axis, and shuffle assignments."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import Stride, TokenLayout, _ceil_div, normalize_stride


def _storage_grid(layout: TokenLayout, stride: Stride) -> tuple[int, int, int, int]:
    """(rows, cols, row stride, col stride) of the image as it is laid out in memory."""
    gh, gw = stride
    if layout.transposed:
        return layout.width, layout.height, gw, gh
    return layout.height, layout.width, gh, gw


def _padded(rows: int, cols: int, sr: int, sc: int) -> bool:
    """Whether the storage grid needs zero-padding to a multiple of the stride."""
    return rows % sr != 0 or cols % sc != 0


def _blocks(rows: int, cols: int, sr: int, sc: int) -> tuple[int, int]:
    """How many stride blocks tile the (padded) storage grid: (block rows, block cols)."""
    return _ceil_div(rows, sr), _ceil_div(cols, sc)


def _permute_offsets(x, assignment):
    """(..., a, b, G, d): inside every block (a, b), put the token at offset ``assignment[a, b, g]``
    at position g. One index_select over the flattened blocks, whatever the leading rank."""
    a, b, g = assignment.shape
    flat = (torch.arange(a * b, device=assignment.device).unsqueeze(-1) * g + assignment.flatten(0, 1)).flatten()
    return x.flatten(-4, -2).index_select(-2, flat).unflatten(-2, (a, b, g))


def _cluster_rows_cols(x, rows: int, cols: int, sr: int, sc: int, assignment=None):
    """(..., rows*cols, d) -> (..., sr*sc, n, d), zero-padding rows/cols up to multiples of the stride."""
    a, b = _blocks(rows, cols, sr, sc)
    rows_p, cols_p = a * sr, b * sc
    x = x.unflatten(-2, (rows, cols))
    if _padded(rows, cols, sr, sc):
        x = F.pad(x, (0, 0, 0, cols_p - cols, 0, rows_p - rows))
    x = x.unflatten(-3, (a, sr)).unflatten(-2, (b, sc))
    if assignment is not None:
        # (..., a, sr, b, sc, d) -> (..., a, b, sr*sc, d), shuffle every block's offsets, then the
        # (now permuted) offset axis leads as in the straightforward case.
        x = _permute_offsets(x.movedim(-3, -4).flatten(-3, -2), assignment)
        return x.movedim(-2, -4).flatten(-3, -2)
    # (..., a, sr, b, sc, d) -> (..., sr, sc, a, b, d): the group offsets lead.
    x = x.movedim(-4, -5).movedim(-2, -4)
    return x.flatten(-5, -4).flatten(-3, -2)


def _recover_rows_cols(xg, rows: int, cols: int, sr: int, sc: int, assignment=None):
    a, b = _blocks(rows, cols, sr, sc)
    if assignment is not None:
        # (..., G, a*b, d) -> (..., a, b, G, d), undo the block shuffle, back to (..., a, sr, b, sc, d)
        x = _permute_offsets(xg.unflatten(-2, (a, b)).movedim(-4, -2), assignment.argsort(-1))
        x = x.unflatten(-2, (sr, sc)).movedim(-3, -4)
    else:
        x = xg.unflatten(-3, (sr, sc)).unflatten(-2, (a, b))
        x = x.movedim(-4, -2).movedim(-5, -4)
    x = x.flatten(-5, -4).flatten(-3, -2)
    if _padded(rows, cols, sr, sc):
        x = x.narrow(-3, 0, rows).narrow(-2, 0, cols)
    return x.flatten(-3, -2)


def _swap_group_axes(xg, first: int, second: int):
    """Reorder the group axis from (first, second) offsets to (second, first)."""
    return xg.unflatten(-3, (first, second)).transpose(-4, -3).flatten(-4, -3)


def cluster(x, height: int, width: int, stride, transposed: bool = False, assignment=None):
    """Grid Clustering: image tokens ``(..., H*W, d)`` -> groups ``(..., Gh*Gw, n, d)``.

    Group ``g = (r % Gh) * Gw + (c % Gw)``; inside a group tokens keep raster order. Sides that are
    not multiples of the stride are zero-padded (the padded keys must be masked by the caller).
    With an ``assignment`` (shuffle distributing, :func:`draw_assignment`) block ``(a, b)`` sends
    its offset ``assignment[a, b, g]`` to group ``g`` instead.
    """
    layout = TokenLayout(0, height, width, 0, transposed)
    rows, cols, sr, sc = _storage_grid(layout, normalize_stride(stride))
    xg = _cluster_rows_cols(x, rows, cols, sr, sc, assignment)
    # A column-major image clusters with (Gw, Gh) offsets; put the group axis back in (Gh, Gw) order
    # so that groups of two differently stored grids line up.
    return _swap_group_axes(xg, sr, sc) if transposed else xg


def recover(xg, height: int, width: int, stride, transposed: bool = False, assignment=None):
    """Grid Recovering: the exact inverse of :func:`cluster` (padding dropped)."""
    layout = TokenLayout(0, height, width, 0, transposed)
    rows, cols, sr, sc = _storage_grid(layout, normalize_stride(stride))
    if transposed:
        xg = _swap_group_axes(xg, sc, sr)
    return _recover_rows_cols(xg, rows, cols, sr, sc, assignment)


def cluster_axis(x, axis: int, height: int, width: int, stride):
    """Grid Clustering in place along one axis: the ``height*width`` raster tokens of ``axis`` are
    reordered group after group (groups as in :func:`cluster`, raster order inside each), keeping
    the shape. For images whose sides are multiples of the stride; ``axis`` must be non-negative.

    The last op is the flatten that makes the reorder a copy, so the result is laid out in its own
    axis order: a later linear reads it without another copy.
    """
    gh, gw = normalize_stride(stride)
    x = x.unflatten(axis, (height // gh, gh, width // gw, gw))
    x = x.movedim(axis + 1, axis).movedim(axis + 3, axis + 1)  # (a, gh, b, gw) -> (gh, gw, a, b)
    return x.flatten(axis, axis + 3)


def recover_axis(x, axis: int, height: int, width: int, stride):
    """Grid Recovering along one axis: the exact inverse of :func:`cluster_axis`."""
    gh, gw = normalize_stride(stride)
    x = x.unflatten(axis, (gh, gw, height // gh, width // gw))
    x = x.movedim(axis + 2, axis).movedim(axis + 3, axis + 2)  # (gh, gw, a, b) -> (a, gh, b, gw)
    return x.flatten(axis, axis + 3)


def assignment_shape(layout: TokenLayout, stride) -> tuple[int, int, int]:
    """Shape of a shuffle assignment for ``layout``: (block rows, block cols, Gh*Gw), in storage order."""
    rows, cols, sr, sc = _storage_grid(layout, normalize_stride(stride))
    return (*_blocks(rows, cols, sr, sc), sr * sc)


def draw_assignment(layout: TokenLayout, stride, device=None) -> torch.Tensor:
    """Shuffle distributing: an independent uniformly random permutation of offsets per stride block.

    Entry ``[a, b, g]`` is the (storage-order) offset inside block ``(a, b)`` whose token joins group
    ``g``. Drawn from the default generator, so ``torch.manual_seed`` reproduces it.
    """
    return torch.rand(assignment_shape(layout, stride), device=device).argsort(-1)

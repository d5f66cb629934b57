"""Groupings: which group every image token joins, and how to regroup a token axis cheaply.

A grouping splits every image axis of size ``n`` under its stride ``g`` into ``g`` groups of
``a = ceil(n / g)`` tokens (the axis zero-padded to ``a * g``); a token's group is the tuple of its
per-axis groups. Two groupings plug into the same rewrite (docs/design.md section 1):

* :class:`GridGrouping`, the paper's Grid Clustering: axis position ``x`` joins group ``x % g``
  (the axis splits into ``(a, g)``: the group offset is the *inner* index);
* :class:`WindowGrouping`, contiguous tiles (Swin's windows, STA's tiles): ``x`` joins group
  ``x // a`` (the axis splits into ``(g, a)``: the group is the *outer* index).

Both therefore give groups of the same shape at the same stride (equal FLOPs), and regrouping is
one reshape per axis followed by moving the group axes in front: the functions below are written
once for any rank (a tuple of image sizes, slowest first; 2-D is the rank-2 case) and any storage
``order`` of the axes (a column-major image is order ``(1, 0)``). Groups are numbered row-major over
the *logical* axes, so two grids stored in different orders name the same groups alike.

Shuffle distributing (grid grouping only) permutes, inside every ``g_0 x g_1 x ...`` block, which
offset goes to which group (:func:`draw_assignment`); window grouping has no blocks to shuffle.

Every size decision depends only on the sizes passed in (plan constants, possibly symbolic: see
passes/rewrite.py), never on ``tensor.shape`` read at run time, and every axis is addressed
from the end, so leading batch/head axes of any number pass through.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .layout import Stride, TokenLayout, _ceil_div, format_stride, normalize_stride


class Grouping:
    """The seam a grouping implements: its name, where the group sits when an axis is split into
    (group, position) halves, each token's group along one axis, and whether shuffle applies."""

    name: str = ""
    group_inner: bool = True        # the axis splits into (a, g) (True) or (g, a) (False)
    shuffle_unsupported: str | None = None

    @property
    def supports_shuffle(self) -> bool:
        return self.shuffle_unsupported is None

    def axis_group(self, x, n, g):
        """Group (0 .. g-1) of position(s) ``x`` along an axis of ``n`` tokens at stride ``g``."""
        raise NotImplementedError

    def check(self, q_layout: TokenLayout, k_layout: TokenLayout, stride: Stride) -> str | None:
        """Why this grouping cannot serve a site with these layouts at ``stride`` (None: it can).
        The policy asks it after its own, grouping-independent rules (passes/policy.py)."""
        return None

    def split(self, blocks, g) -> tuple:
        """The sizes an axis of ``blocks * g`` (padded) tokens unflattens into."""
        return (blocks, g) if self.group_inner else (g, blocks)

    def __eq__(self, other):
        return type(other) is type(self)

    def __hash__(self):
        return hash(type(self))

    def __repr__(self):
        return f"{type(self).__name__}()"

    def __str__(self):
        return self.name


class GridGrouping(Grouping):
    """The paper's Grid Clustering: ``group(x) = x mod g`` on every axis."""

    name = "grid"
    group_inner = True

    def axis_group(self, x, n, g):
        return x % g


class WindowGrouping(Grouping):
    """Contiguous tiles of ``ceil(n / g)`` tokens per axis: ``group(x) = x // ceil(n / g)``."""

    name = "window"
    group_inner = False
    shuffle_unsupported = "shuffle distributing is undefined for window grouping"

    def axis_group(self, x, n, g):
        return x // _ceil_div(n, g)

    def check(self, q_layout: TokenLayout, k_layout: TokenLayout, stride: Stride) -> str | None:
        """On two grids (reduced keys), a query tile whose key tile holds no key would leave its
        queries with nothing to attend to."""
        for axis, (nq, nk, g) in enumerate(zip(q_layout.image_shape, k_layout.image_shape, stride)):
            # -(-n // d): ceil without a branch, so symbolic sizes add no guard here
            tiles_q, tiles_k = -(-nq // -(-nq // g)), -(-nk // -(-nk // g))
            if tiles_q > tiles_k:
                return (f"window grouping, stride {format_stride(stride)}: query image {q_layout} has {tiles_q} "
                        f"tiles along axis {axis} but key image {k_layout} only {tiles_k} (queries without keys)")
        return None


GRID = GridGrouping()
WINDOW = WindowGrouping()
GROUPINGS = {g.name: g for g in (GRID, WINDOW)}


def grouping_named(name) -> Grouping:
    """The grouping called ``name`` ("grid" / "window"); a Grouping is returned as it is."""
    if isinstance(name, Grouping):
        return name
    try:
        return GROUPINGS[name]
    except (KeyError, TypeError):
        raise ValueError(f"grouping must be one of {tuple(GROUPINGS)}, got {name!r}") from None


# --- geometry -------------------------------------------------------------------------------------

def _order(order, rank: int) -> tuple:
    return tuple(range(rank)) if order is None else tuple(order)


def _storage(shape, stride, order):
    """(sizes, strides, blocks) of the image axes as stored, outermost first."""
    ns = [shape[o] for o in order]
    gs = [stride[o] for o in order]
    return ns, gs, [_ceil_div(n, g) for n, g in zip(ns, gs)]


def _needs_padding(shape, stride) -> bool:
    """Whether some axis is not a multiple of its stride (regrouping zero-pads it)."""
    return any(n % g != 0 for n, g in zip(shape, stride))


def layout_padded(layout: TokenLayout, stride: Stride) -> bool:
    return _needs_padding(layout.image_shape, stride)


def _split_axis(x, dim: int, sizes: tuple):
    """``x.unflatten(dim, sizes)`` for a negative ``dim``.

    Always a view, never ``as_strided`` with strides read off ``x``: inductor may store an
    intermediate with other strides than it was traced with, and ``as_strided`` reads the storage
    (with symbolic sizes, a strided split of flash-attn's (B, L, H, D) tensors projected from a
    transposed input read wrong values). The price: with symbolic sizes a view's shape rule derives
    inner sizes by floor division (``H*H // H``), which stays in the kernels' index math
    (benchmarks ``--cases dynamic``: about 1.5x the static latency at 32x32 tokens).
    """
    return x.unflatten(dim, tuple(sizes))


def _to_blocks_then_groups(x, k: int, grouping: Grouping):
    """(..., pair_0, ..., pair_{k-1}, d) (each axis split as ``grouping.split`` says) ->
    (..., a_0 .. a_{k-1}, g_0 .. g_{k-1}, d), storage order throughout."""
    start = -(2 * k + 1)
    inner = 1 if grouping.group_inner else 0
    src = [start + 2 * i + 1 - inner for i in range(k)] + [start + 2 * i + inner for i in range(k)]
    return x.movedim(src, list(range(start, -1)))


def _from_blocks_then_groups(x, k: int, grouping: Grouping):
    """The inverse of :func:`_to_blocks_then_groups`."""
    start = -(2 * k + 1)
    inner = 1 if grouping.group_inner else 0
    dst = [start + 2 * i + 1 - inner for i in range(k)] + [start + 2 * i + inner for i in range(k)]
    return x.movedim(list(range(start, -1)), dst)


def _permute_offsets(x, assignment, blocks, groups: int):
    """(..., a_0 .. a_{k-1}, G, d): inside every block, put the token at offset
    ``assignment[*block, g]`` at position g. One index_select over the flattened blocks."""
    k = len(blocks)
    n_blocks = math.prod(blocks)
    flat = (torch.arange(n_blocks, device=assignment.device).unsqueeze(-1) * groups
            + assignment.reshape(n_blocks, groups)).flatten()
    return x.flatten(-(k + 2), -2).index_select(-2, flat).unflatten(-2, (*blocks, groups))


def _cluster_storage(x, shape, stride, order=None, grouping: Grouping = None, assignment=None):
    """(..., prod(shape), d) -> (..., G, n, d): the rank-generic regrouping (what the 2-D
    ``_cluster_rows_cols`` did for rows and columns). The image is stored with its axes in
    ``order``; axes are zero-padded up to multiples of the stride; groups come out numbered over
    the logical axes, tokens inside a group in storage order."""
    grouping = GRID if grouping is None else grouping
    k = len(shape)
    order = _order(order, k)
    ns, gs, blocks = _storage(shape, stride, order)
    x = _split_axis(x, -2, tuple(ns))
    if _needs_padding(ns, gs):
        pad = [0, 0]
        for n, g, a in reversed(list(zip(ns, gs, blocks))):
            pad += [0, a * g - n]
        x = F.pad(x, pad)
    for i in range(k):  # negative indices of later axes do not move as earlier ones split
        x = _split_axis(x, -(k + 1) + i, grouping.split(blocks[i], gs[i]))
    x = _to_blocks_then_groups(x, k, grouping)  # (..., a..., g..., d)
    if assignment is not None:
        x = _permute_offsets(x.flatten(-(k + 1), -2), assignment, blocks, math.prod(gs)).unflatten(-2, tuple(gs))
    # (..., a..., g..., d) -> (..., g in logical order..., a..., d)
    src = [-(k + 1) + order.index(j) for j in range(k)] + [-(2 * k + 1) + i for i in range(k)]
    x = x.movedim(src, list(range(-(2 * k + 1), -1)))
    return x.flatten(-(2 * k + 1), -(k + 2)).flatten(-(k + 1), -2)


def _recover_storage(xg, shape, stride, order=None, grouping: Grouping = None, assignment=None):
    """The exact inverse of :func:`_cluster_storage` (padding dropped)."""
    grouping = GRID if grouping is None else grouping
    k = len(shape)
    order = _order(order, k)
    ns, gs, blocks = _storage(shape, stride, order)
    x = _split_axis(_split_axis(xg, -3, tuple(stride)), -2, tuple(blocks))  # (..., g logical..., a..., d)
    dst = [-(k + 1) + order.index(j) for j in range(k)] + [-(2 * k + 1) + i for i in range(k)]
    x = x.movedim(list(range(-(2 * k + 1), -1)), dst)  # (..., a..., g storage..., d)
    if assignment is not None:
        x = _permute_offsets(x.flatten(-(k + 1), -2), assignment.argsort(-1), blocks,
                             math.prod(gs)).unflatten(-2, tuple(gs))
    x = _from_blocks_then_groups(x, k, grouping)
    for i in range(k):
        x = x.flatten(-(2 * k + 1) + 2 * i, -(2 * k) + 2 * i)
    if _needs_padding(ns, gs):
        for i, n in enumerate(ns):
            x = x.narrow(-(k + 1) + i, 0, n)
    return x.flatten(-(k + 1), -2)


def cluster_layout(x, layout: TokenLayout, stride: Stride, grouping: Grouping = None, assignment=None):
    """Regroup the image tokens ``(..., N, d)`` of ``layout`` into ``(..., G, n, d)`` (``stride``
    already normalised to the layout's rank)."""
    return _cluster_storage(x, layout.image_shape, stride, layout.order, grouping, assignment)


def recover_layout(xg, layout: TokenLayout, stride: Stride, grouping: Grouping = None, assignment=None):
    """The exact inverse of :func:`cluster_layout`."""
    return _recover_storage(xg, layout.image_shape, stride, layout.order, grouping, assignment)


def cluster(x, height: int, width: int, stride, transposed: bool = False, assignment=None):
    """Grid Clustering of a 2-D image: tokens ``(..., H*W, d)`` -> groups ``(..., Gh*Gw, n, d)``.

    Group ``g = (r % Gh) * Gw + (c % Gw)``; inside a group tokens keep raster (storage) order. Sides
    that are not multiples of the stride are zero-padded (the padded keys must be masked by the
    caller). With an ``assignment`` (shuffle distributing, :func:`draw_assignment`) block ``(a, b)``
    sends its offset ``assignment[a, b, g]`` to group ``g`` instead.
    """
    layout = TokenLayout(0, height, width, 0, transposed)
    return cluster_layout(x, layout, normalize_stride(stride, 2), GRID, assignment)


def recover(xg, height: int, width: int, stride, transposed: bool = False, assignment=None):
    """Grid Recovering: the exact inverse of :func:`cluster` (padding dropped)."""
    layout = TokenLayout(0, height, width, 0, transposed)
    return recover_layout(xg, layout, normalize_stride(stride, 2), GRID, assignment)


def cluster_image_axis(x, axis: int, shape, stride, grouping: Grouping = None):
    """Regroup in place along one (non-negative) axis: the row-major image tokens of ``axis`` are
    reordered group after group, keeping the shape. For images whose sides are multiples of the
    stride. The last op is the flatten that makes the reorder a copy, so the result is laid out in
    its own axis order: a later linear reads it without another copy."""
    grouping = GRID if grouping is None else grouping
    k = len(shape)
    inner = 1 if grouping.group_inner else 0
    sizes = [s for n, g in zip(shape, stride) for s in grouping.split(n // g, g)]
    x = x.unflatten(axis, sizes)
    src = [axis + 2 * i + inner for i in range(k)] + [axis + 2 * i + 1 - inner for i in range(k)]
    return x.movedim(src, list(range(axis, axis + 2 * k))).flatten(axis, axis + 2 * k - 1)


def recover_image_axis(x, axis: int, shape, stride, grouping: Grouping = None):
    """The exact inverse of :func:`cluster_image_axis`."""
    grouping = GRID if grouping is None else grouping
    k = len(shape)
    inner = 1 if grouping.group_inner else 0
    x = x.unflatten(axis, [*stride, *(n // g for n, g in zip(shape, stride))])
    dst = [axis + 2 * i + inner for i in range(k)] + [axis + 2 * i + 1 - inner for i in range(k)]
    return x.movedim(list(range(axis, axis + 2 * k)), dst).flatten(axis, axis + 2 * k - 1)


def cluster_axis(x, axis: int, height: int, width: int, stride):
    """Grid Clustering in place along one axis of a 2-D image (:func:`cluster_image_axis`)."""
    return cluster_image_axis(x, axis, (height, width), normalize_stride(stride, 2))


def recover_axis(x, axis: int, height: int, width: int, stride):
    """Grid Recovering along one axis: the exact inverse of :func:`cluster_axis`."""
    return recover_image_axis(x, axis, (height, width), normalize_stride(stride, 2))


def assignment_shape(layout: TokenLayout, stride) -> tuple[int, ...]:
    """Shape of a shuffle assignment for ``layout``: (blocks per storage axis..., G)."""
    stride = normalize_stride(stride, layout.rank)
    _, gs, blocks = _storage(layout.image_shape, stride, layout.order)
    return (*blocks, math.prod(gs))


def draw_assignment(layout: TokenLayout, stride, device=None) -> torch.Tensor:
    """Shuffle distributing: an independent uniformly random permutation of offsets per stride block
    (``g_0 x g_1 x ...``; a video's ``Gt x Gh x Gw``).

    Entry ``[*block, g]`` is the offset inside ``block`` (both counted in storage order, row-major
    over the stored axes) whose token joins group ``g`` (numbered over the storage-order strides;
    the regrouping then names groups over the logical axes). Drawn from the default generator, so
    ``torch.manual_seed`` reproduces it.
    """
    return torch.rand(assignment_shape(layout, stride), device=device).argsort(-1)


def group_ids(layout: TokenLayout, stride: Stride, device=None, assignment=None,
              grouping: Grouping = None) -> torch.Tensor:
    """Group id of every token of the sequence (row-major over the logical axes' groups, as the
    regrouping numbers them), -1 for prefix/suffix tokens. ``stride``: normalised to the rank."""
    grouping = GRID if grouping is None else grouping
    k, order = layout.rank, layout.order
    ns, gs, _ = _storage(layout.image_shape, stride, order)
    idx = torch.arange(layout.image_tokens, device=device)
    storage = []
    for n in reversed(ns):  # the sequence is row-major over the stored axes
        storage.append(idx % n)
        idx = idx // n
    storage.reverse()
    logical = [storage[order.index(j)] for j in range(k)]
    if assignment is None:
        gid = 0
        for j in range(k):
            gid = gid * stride[j] + grouping.axis_group(logical[j], layout.image_shape[j], stride[j])
    else:
        # the offset inside the block, the group whose slot holds it, then that group's name over
        # the logical axes (the storage-order group axes relabelled as the regrouping does)
        offset, block = 0, []
        for x, g in zip(storage, gs):
            offset = offset * g + x % g
            block.append(x // g)
        slot = assignment.to(device).argsort(-1)[(*block, offset)]
        offs = []
        for g in reversed(gs):
            offs.append(slot % g)
            slot = slot // g
        offs.reverse()
        gid = 0
        for j in range(k):
            gid = gid * stride[j] + offs[order.index(j)]
    pre = torch.full((layout.prefix,), -1, dtype=gid.dtype, device=device)
    suf = torch.full((layout.suffix,), -1, dtype=gid.dtype, device=device)
    return torch.cat([pre, gid, suf])

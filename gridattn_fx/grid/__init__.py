"""The grid semantics as plain tensor functions (a package: one concept per module).

Everything here runs eagerly on real tensors *and* is what the rewrite inserts into graphs:
``passes/rewrite.py`` traces :meth:`GridPlan.grouped` / :meth:`GridPlan.masked` with
``torch.fx`` and inlines the result, so the code tested directly is the code that runs compiled.
For that reason every shape decision here depends only on plan constants (layouts, stride, ranks),
never on ``tensor.shape`` read at run time; batch and head sizes flow through ``-1`` and
``size()`` calls, so a batch size that changes (even symbolically) needs no new plan.

Reference semantics (docs/design.md section 1): a rewritten site computes
``SDPA(q, k, v, attn_mask = B + log M)`` where ``M`` (see :func:`grid_mask`) keeps a query/key pair
iff one of them is not an image token or both fall into the same group: ``(r % Gh, c % Gw)``
under grid grouping (``(t % Gt, r % Gh, c % Gw)`` on a video), per-axis contiguous tiles under
window grouping (gridattn_fx/grid/groupings.py).

Shuffle distributing (training) replaces the fixed offset -> group map by a random permutation per
``Gh x Gw`` block (``Gt x Gh x Gw`` on a video). It is one gather on top of the same regrouping:
inside every block, the token that goes to group ``g`` is the one at offset
``assignment[*block, g]`` (see :func:`draw_assignment`).

The package: ``layout`` (token layouts, strides), ``groupings`` (which group a token joins and
how to regroup a token axis: grid and window grouping), ``reference`` (the mask ``M``), ``plan``
(one site's plan, built from small specs, and its grouped and masked forms), ``attention`` (how
the grouped attention runs), ``relpos`` (a decomposed relative-position bias under a plan).
"""

from .groupings import (
                        GRID,
                        GROUPINGS,
                        WINDOW,
                        GridGrouping,
                        Grouping,
                        WindowGrouping,
                        assignment_shape,
                        cluster,
                        cluster_axis,
                        cluster_image_axis,
                        cluster_layout,
                        draw_assignment,
                        group_ids,
                        grouping_named,
                        recover,
                        recover_axis,
                        recover_image_axis,
                        recover_layout,
)
from .layout import Stride, TokenLayout, data_dependent, format_stride, normalize_stride
from .plan import GridPlan, MaskSpec, RelPosSpec, attention_flops, grouped_attention, masked_attention
from .reference import grid_mask

__all__ = [
    "Stride",
    "TokenLayout",
    "GridPlan",
    "MaskSpec",
    "RelPosSpec",
    "cluster",
    "recover",
    "grid_mask",
    "grouped_attention",
    "masked_attention",
    "normalize_stride",
    "draw_assignment",
    "cluster_axis",
    "recover_axis",
    "assignment_shape",
    "attention_flops",
    "format_stride",
    "data_dependent",
    "Grouping",
    "GridGrouping",
    "WindowGrouping",
    "GRID",
    "WINDOW",
    "GROUPINGS",
    "grouping_named",
    "cluster_layout",
    "recover_layout",
    "cluster_image_axis",
    "recover_image_axis",
    "group_ids",
]

"""The grid semantics as plain tensor functions (a package: one concept per module).

Everything here runs eagerly on real tensors *and* is what the rewrite inserts into graphs:
``passes/grid_rewrite.py`` traces :meth:`GridPlan.grouped` / :meth:`GridPlan.masked` with
``torch.fx`` and inlines the result, so the code tested directly is the code that runs compiled.
For that reason every shape decision here depends only on plan constants (layouts, stride, ranks),
never on ``tensor.shape`` read at run time; batch and head sizes flow through ``-1`` and
``size()`` calls, so a batch size that changes (even symbolically) needs no new plan.

Reference semantics (docs/design.md section 1): a rewritten site computes
``SDPA(q, k, v, attn_mask = B + log M)`` where ``M`` (see :func:`grid_mask`) keeps a query/key pair
iff one of them is not an image token or both fall into the same group ``(r % Gh, c % Gw)``.

Shuffle distributing (training) replaces the fixed offset -> group map by a random permutation per
``Gh x Gw`` block. It is one gather on top of the same regrouping: inside every block, the token
that goes to group ``g`` is the one at offset ``assignment[block, g]`` (see :func:`draw_assignment`).

The package: ``layout`` (token layouts, strides), ``groupings`` (regrouping a token axis),
``reference`` (the grid mask), ``plan`` (one site's plan, grouped and masked forms).
"""

from .groupings import (_blocks, _cluster_rows_cols, _padded, _permute_offsets, _recover_rows_cols,
                        _storage_grid, _swap_group_axes, assignment_shape, cluster, cluster_axis,
                        draw_assignment, recover, recover_axis)
from .layout import Stride, TokenLayout, _ceil_div, normalize_stride
from .plan import GridPlan, attention_flops, grouped_attention, masked_attention
from .reference import _additive, _group_ids, grid_mask

__all__ = [
    "TokenLayout",
    "GridPlan",
    "cluster",
    "recover",
    "grid_mask",
    "grouped_attention",
    "masked_attention",
    "normalize_stride",
    "draw_assignment",
    "cluster_axis",
    "recover_axis",
]

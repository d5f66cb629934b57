"""The masked reference: the mask ``M`` of docs/design.md section 1, built from each token's group
under the site's grouping (grid or window), and SDPA's view of a boolean mask."""

from __future__ import annotations

import torch

from .groupings import Grouping, group_ids, grouping_named
from .layout import TokenLayout, normalize_stride


def grid_mask(q_layout: TokenLayout, k_layout: TokenLayout, stride, device=None, assignment=None,
              grouping: Grouping | str = "grid") -> torch.Tensor:
    """The mask ``M`` (bool, ``(Lq, Lk)``): True where attention is kept, i.e. where the query or the
    key is not an image token or both fall into the same group. Query and key groups are each
    computed on their own grid with the same stride (normalised to the layouts' rank).

    ``assignment``: the (query, key) pair of shuffle assignments (:func:`draw_assignment`), or None
    for straightforward distributing.
    """
    grouping = grouping_named(grouping)
    qa, ka = assignment if assignment is not None else (None, None)
    gq = group_ids(q_layout, normalize_stride(stride, q_layout.rank), device, qa, grouping)
    gk = group_ids(k_layout, normalize_stride(stride, k_layout.rank), device, ka, grouping)
    return (gq[:, None] == gk[None, :]) | (gq < 0)[:, None] | (gk < 0)[None, :]


def _additive(mask, is_bool: bool, dtype):
    """A boolean mask (True = keep) as the additive 0 / -inf bias SDPA would apply."""
    if is_bool:
        return torch.where(mask, 0.0, float("-inf")).to(dtype)
    return mask

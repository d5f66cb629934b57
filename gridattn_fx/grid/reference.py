"""The masked reference: the grid mask ``M`` of docs/design.md section 1, from each token's group."""

from __future__ import annotations

import torch

from .groupings import _storage_grid
from .layout import Stride, TokenLayout, normalize_stride


def _group_ids(layout: TokenLayout, stride: Stride, device, assignment=None) -> torch.Tensor:
    """Group id of every token of the sequence, -1 for prefix/suffix tokens."""
    gh, gw = stride
    idx = torch.arange(layout.image_tokens, device=device)
    if layout.transposed:
        r, c = idx % layout.height, idx // layout.height
    else:
        r, c = idx // layout.width, idx % layout.width
    if assignment is None:
        gid = (r % gh) * gw + (c % gw)
    else:
        # storage coordinates, then the group whose slot holds this token's offset
        _, _, sr, sc = _storage_grid(layout, stride)
        sr_pos, sc_pos = (c, r) if layout.transposed else (r, c)
        offset = (sr_pos % sr) * sc + (sc_pos % sc)
        gid = assignment.to(device).argsort(-1)[sr_pos // sr, sc_pos // sc, offset]
        if layout.transposed:  # cluster() relabels groups to (Gh, Gw) order; name them the same way
            gid = (gid % sc) * sr + gid // sc
    pre = torch.full((layout.prefix,), -1, dtype=gid.dtype, device=device)
    suf = torch.full((layout.suffix,), -1, dtype=gid.dtype, device=device)
    return torch.cat([pre, gid, suf])


def grid_mask(q_layout: TokenLayout, k_layout: TokenLayout, stride, device=None, assignment=None) -> torch.Tensor:
    """The grid mask ``M`` (bool, ``(Lq, Lk)``): True where attention is kept.

    ``assignment``: the (query, key) pair of shuffle assignments (:func:`draw_assignment`), or None
    for straightforward distributing.
    """
    stride = normalize_stride(stride)
    qa, ka = assignment if assignment is not None else (None, None)
    gq = _group_ids(q_layout, stride, device, qa)
    gk = _group_ids(k_layout, stride, device, ka)
    return (gq[:, None] == gk[None, :]) | (gq < 0)[:, None] | (gk < 0)[None, :]


def _additive(mask, is_bool: bool, dtype):
    """A boolean mask (True = keep) as the additive 0 / -inf bias SDPA would apply."""
    if is_bool:
        return torch.where(mask, 0.0, float("-inf")).to(dtype)
    return mask

"""A decomposed relative-position bias (SAM's ``rel_h`` / ``rel_w``) under a grid plan.

The bias of query ``(i, j)`` and key ``(k, l)`` is ``rel_h[i, j, k] + rel_w[i, j, l]``. Restricted to
a group, a query keeps only the key rows and columns its own group owns, so the grouped bias is
built from the two small tables without ever forming the L x L one. ``plan`` is the site's
:class:`GridPlan` (gridattn_fx/grid/plan.py) with a :class:`RelPosSpec`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import attend_groups
from .layout import _ceil_div


def _own_offsets(plan, x, size: int, first: bool):
    """Keep, for every group, only the key rows (``first``) or columns its own offset owns.

    ``x`` is (..., G, nq, size) indexed by a key row/column; returns (..., G, nq, ceil(size/g)).
    """
    gh, gw = plan.stride
    step = gh if first else gw
    n = _ceil_div(size, step)
    if n * step != size:
        x = F.pad(x, (0, n * step - size))
    x = x.unflatten(-1, plan.grouping.split(n, step))
    if not plan.grouping.group_inner:  # (g, n) -> (n, g): the group offset last
        x = x.transpose(-1, -2)
    x = x.unflatten(-4, (gh, gw))  # (..., gh, gw, nq, n, step)
    x = torch.diagonal(x, dim1=-5 if first else -4, dim2=-1)
    # the matched offset axis went last; put it back in front of the group's other offset
    x = x.movedim(-1, -4) if first else x.movedim(-1, -3)  # (..., gh, gw, nq, n)
    return x.flatten(-4, -3)


def _relpos_lead(plan, bias):
    return bias.unflatten(0, (-1, plan.relpos.heads)) if plan.relpos.heads else bias


def grouped_relpos_bias(plan, rel_h, rel_w):
    """The decomposed bias restricted to each group: (N, G, nq, nk) without ever forming L x L."""
    ql, kl = plan.q_layout, plan.k_layout
    rh = plan._cluster(rel_h.flatten(-3, -2), ql)  # (N, G, nq, kh)
    rw = plan._cluster(rel_w.flatten(-3, -2), ql)  # (N, G, nq, kw)
    rh = _own_offsets(plan, rh, kl.height, first=True)
    rw = _own_offsets(plan, rw, kl.width, first=False)
    return _relpos_lead(plan, (rh.unsqueeze(-1) + rw.unsqueeze(-2)).flatten(-2, -1))


def dense_relpos_bias(plan, rel_h, rel_w):
    bias = (rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).flatten(-4, -3).flatten(-2, -1)
    return _relpos_lead(plan, bias)


def grouped_relpos_attention(plan, qg, kg, vg, rel):
    group_mask = grouped_relpos_bias(plan, *rel)
    pad = plan._key_padding_bias(qg.dtype, qg.device)
    if pad is not None:
        group_mask = group_mask + pad
    return attend_groups(plan, qg, kg, vg, group_mask, plan.mask.ndim + 1)

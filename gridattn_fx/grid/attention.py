"""How a plan's grouped attention runs: SDPA inside every group, batched over the groups.

The groups are folded into SDPA's head (or batch) axis so that one call of its fast 4-D kernels
serves them all, keeping every query head paired with the key/value head the original site gave
it (broadcast MQA heads, ``enable_gqa``). ``plan`` is the site's :class:`GridPlan`
(gridattn_fx/grid/plan.py); its grouping recovers the outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .groupings import recover_layout


def sdpa(plan, q, k, v, mask):
    """The site's own SDPA call (its dropout, scale and GQA flag) on whatever q, k, v it is given."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=plan.dropout_p, scale=plan.scale, enable_gqa=plan.enable_gqa
    )


def attend_groups(plan, qg, kg, vg, group_mask, mask_rank: int, qa=None):
    """SDPA inside every group, then Grid Recovering of the image queries' outputs.

    ``qg`` / ``kg`` / ``vg`` are (..., heads, G, n, d); their batch and head axes may differ as
    SDPA allows: broadcast (MQA written as k/v with one head) or, with ``enable_gqa``, fewer
    key/value heads than query heads. Either way every query head meets the key/value head the
    original site paired it with.
    """
    if plan.enable_gqa and plan.ndim >= 3:
        out = _attend_groups_gqa(plan, qg, kg, vg, group_mask, mask_rank)
    elif plan.ndim >= 4:
        # Fold the group axis into the head axis so SDPA sees 4-D inputs (its fast CPU/GPU kernels).
        # Folding merges heads with groups, so broadcast batch/head axes are expanded first (a view
        # with nothing to expand where q, k and v agree already, the usual case).
        qg, kg, vg = _broadcast_lead(plan, qg, kg, vg)
        if group_mask is not None:
            if mask_rank < plan.ndim + 1:
                group_mask = group_mask[(None,) * (plan.ndim + 1 - mask_rank)]
            heads = qg.size(-4)
            group_mask = group_mask.expand(
                *([-1] * (plan.ndim - 3)), heads, plan.groups, -1, -1
            ).flatten(-4, -3)
        out = sdpa(plan, qg.flatten(-4, -3), kg.flatten(-4, -3), vg.flatten(-4, -3), group_mask)
        out = out.unflatten(-3, (-1, plan.groups))
    else:
        out = sdpa(plan, qg, kg, vg, group_mask)
    return recover_layout(out, plan.q_layout, plan.stride, plan.grouping, qa)


def _broadcast_lead(plan, qg, kg, vg):
    """q, k, v (..., G, n, d) with their leading (batch, head) axes expanded to the common
    broadcast sizes, exactly as SDPA broadcasts them (sizes read at run time, as batch sizes are)."""
    corner = [x.narrow(-1, 0, 1).narrow(-2, 0, 1) for x in (qg, kg, vg)]
    lead = torch.broadcast_tensors(*corner)[0]
    sizes = [lead.size(i) for i in range(plan.ndim - 2)]
    return [x.expand(*sizes, -1, -1, -1) for x in (qg, kg, vg)]


def _attend_groups_gqa(plan, qg, kg, vg, group_mask, mask_rank: int):
    """SDPA with ``enable_gqa`` inside every group: (..., H, G, n, d) in, (..., Hq, G, n, dv) out.

    SDPA pairs query head ``h`` with key/value head ``h // (Hq / Hkv)`` along axis -3. Folding
    the groups *behind* the heads (index ``h * G + g``) would break that pairing; folded *in
    front* (index ``g * H + h``) it holds: ``(g * Hq + h) // (Hq / Hkv) == g * Hkv + h // (Hq / Hkv)``.
    A 3-D site (heads, tokens, d) keeps the group axis as a batch axis in front of the heads.
    """
    fold_heads = plan.ndim >= 4

    def fold(x):  # (..., H, G, n, d) -> (..., G*H, n, d), or (G, H, n, d) for a 3-D site
        x = x.movedim(-3, -4)
        return x.flatten(-4, -3) if fold_heads else x

    if group_mask is not None:
        if mask_rank < plan.ndim + 1:
            group_mask = group_mask[(None,) * (plan.ndim + 1 - mask_rank)]
        if fold_heads:  # the mask's head axis is the query heads' (SDPA broadcasts it to Hq)
            group_mask = group_mask.expand(*([-1] * (plan.ndim - 3)), qg.size(-4), plan.groups, -1, -1)
        group_mask = fold(group_mask)
    out = sdpa(plan, fold(qg), fold(kg), fold(vg), group_mask)
    if fold_heads:
        out = out.unflatten(-3, (plan.groups, -1))
    return out.movedim(-4, -3)


def attend_pregrouped(plan, q, k, v):
    """SDPA inside every group of group-major (B, h, G*n, d) inputs; the output stays group-major.

    The group axis folds into the batch: when q/k/v are the usual transposed views of
    (B, L, h, d) projection outputs, every step here is a view, and so is the way back."""
    g = plan.groups

    def fold(x):  # (B, h, G*n, d) -> (B*G, h, n, d)
        return x.unflatten(-2, (g, -1)).movedim(-3, -4).flatten(0, 1)

    out = sdpa(plan, fold(q), fold(k), fold(v), None)
    return out.unflatten(0, (-1, g)).movedim(1, 2).flatten(2, 3)

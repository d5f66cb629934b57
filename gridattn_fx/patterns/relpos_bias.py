"""SAM's decomposed relative-position bias as graphs spell it: two broadcast terms,
``rel_h[..., None]`` of shape (N, qh, qw, kh, 1) and ``rel_w[..., None, :]`` of shape
(N, qh, qw, 1, kw), added to the 5-D view of the scores (hand-written attention, patterns/manual.py)
or summed and reshaped into an SDPA mask (patterns/sdpa.py). The plan regroups the two small terms
(gridattn_fx/grid/relpos.py) instead of the L x L bias.
"""

from __future__ import annotations

import torch.fx as fx

from ..ir.op_catalogue import SHAPED_RESHAPES
from ..ir.ops import op_name
from ..ir.values import shape_of


def _op(node) -> str | None:
    return op_name(node) if isinstance(node, fx.Node) else None


def relpos_terms(a, b):
    """(rel_h term, rel_w term) when ``a`` and ``b`` are (N, qh, qw, kh, 1) and (N, qh, qw, 1, kw)."""
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    terms = {_broadcast_axis(a): a, _broadcast_axis(b): b}
    return (terms[-1], terms[-2]) if set(terms) == {-1, -2} else None


def relpos_bias_terms(bias: fx.Node):
    """``(rel_h[..., None] + rel_w[..., None, :]).reshape(N, L, L)`` -> the two terms, else None."""
    if _op(bias) not in SHAPED_RESHAPES:
        return None
    total = bias.args[0]
    if _op(total) != "add" or len(shape_of(total) or ()) != 5:
        return None
    return relpos_terms(total.args[0], total.args[1])


def relpos_grid(h_term, w_term) -> tuple:
    """(qh, qw, kh, kw) of the decomposed bias the two terms describe."""
    h_shape, w_shape = shape_of(h_term), shape_of(w_term)
    return h_shape[1], h_shape[2], h_shape[3], w_shape[4]


def call_plan_relpos(plan, implementation):
    """Replacement for sites whose inputs are (q, k, v, rel_h term, rel_w term)."""
    attend = getattr(plan, implementation)

    def replacement(q, k, v, h_term, w_term):
        return attend(q, k, v, (h_term.squeeze(-1), w_term.squeeze(-2)))

    return replacement


def _broadcast_axis(node) -> int | None:
    """-1 for a (N, qh, qw, kh, 1) term, -2 for a (N, qh, qw, 1, kw) term."""
    shape = shape_of(node)
    if shape is None or len(shape) != 5:
        return None
    if shape[-1] == 1 and shape[-2] != 1:
        return -1
    if shape[-2] == 1 and shape[-1] != 1:
        return -2
    return None

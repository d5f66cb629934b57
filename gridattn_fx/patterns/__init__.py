"""Attention-site patterns: each module finds one form of attention in an FX graph.

Every finder takes an ``fx.GraphModule`` and returns :class:`AttentionSite` objects; adding a new
form means adding a finder to :data:`FINDERS`, nothing downstream changes.
"""

from .attention_ops import find_op_sites
from .manual import find_manual_sites
from .mha import find_mha_sites
from .sdpa import find_sdpa_sites
from .site import AttentionSite

FINDERS = (find_sdpa_sites, find_manual_sites, find_mha_sites, find_op_sites)


def find_attention_sites(gm):
    sites = []
    for finder in FINDERS:
        sites.extend(finder(gm))
    return sites


__all__ = ["AttentionSite", "FINDERS", "find_attention_sites"]

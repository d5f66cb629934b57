"""The ``gridattn::layout_hint`` marker: a token layout attached to a tensor inside a traced graph.

``gridattn_fx.prepare`` (crossgraph/prepare.py) puts it, through forward pre-hooks, on the inputs of the
modules whose tokens carry an image layout, so that a graph that starts at tokens (a regionally
compiled block, the piece after a graph break) still knows what they are. It is an alias of its
input (CompositeImplicitAutograd: any backend other than ``gridattn`` sees ``aten.alias``, a free
view); the ``gridattn`` pass reads it as a layout source (crossgraph/hints.py) and removes it.

Encoding: ``dims`` is ``[seq_dim]`` for a token axis, with ``sizes = [prefix, height, width,
suffix]`` (a video: ``[prefix, frames, height, width, suffix]``; ``transposed``: the last two image
axes are stored column-major), or one axis per image axis (``[h_dim, w_dim]``, a video ``[t_dim,
h_dim, w_dim]``) with ``sizes`` the image's sizes;
``declared`` tells the report whether the layout was declared by the user (gridattn_fx.ImageTokens)
or remembered by prepare() from a whole-model proof.
"""

from __future__ import annotations

import torch

_LIB = torch.library.Library("gridattn", "DEF")
_LIB.define("layout_hint(Tensor(a) x, int[] dims, SymInt[] sizes, bool transposed, bool declared) -> Tensor(a)")
# prepare()'s capture marks every module input with its own key, to read the facts there.
_LIB.define("probe(Tensor(a) x, int key) -> Tensor(a)")


def _alias(x, *_args):
    return torch.ops.aten.alias.default(x)


_LIB.impl("layout_hint", _alias, "CompositeImplicitAutograd")
_LIB.impl("probe", _alias, "CompositeImplicitAutograd")

LAYOUT_HINT = torch.ops.gridattn.layout_hint.default
PROBE = torch.ops.gridattn.probe.default


def is_layout_hint(target) -> bool:
    return target is LAYOUT_HINT or target is torch.ops.gridattn.layout_hint


def is_probe(target) -> bool:
    return target is PROBE or target is torch.ops.gridattn.probe

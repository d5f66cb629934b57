"""The op catalogue (gridattn_fx/ir/op_catalogue.py): one place says what each op does to token
axes, and the layout proof, the regrouping motion and the manual-form reader all read it.

The tests check the catalogue itself, that its consumers hold no second copy, and the cases where
the consumers used to disagree: the motion now moves a ``where`` / ``masked_fill`` whose other
operands are constant along the tokens (exactly, against the oracle), still refuses one whose
condition varies along the tokens, and refuses a random channel dropout in training.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import DIM, HEADS, attend, build, image

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx.ir import op_catalogue as op_rules  # noqa: E402
from gridattn_fx.ir.op_catalogue import RULES, OpRule, source_rank  # noqa: E402


def test_every_kind_is_known_and_every_op_has_one_rule():
    kinds = {op_rules.POINTWISE, op_rules.CAST, op_rules.IDENTITY, op_rules.RESHAPE, op_rules.PERMUTE,
             op_rules.SPLIT, op_rules.CAT, op_rules.FEATURES, op_rules.CHANNEL_NORM,
             op_rules.KEEPDIM_REDUCTION, op_rules.SOURCE, op_rules.FRESH, op_rules.STACK, op_rules.SOFTMAX,
             op_rules.INDEX, op_rules.NARROW, op_rules.SELECT, op_rules.REPEAT, op_rules.BROADCAST, op_rules.PAD,
             op_rules.PRODUCT, op_rules.ATTRIBUTE, op_rules.OUTER, op_rules.TILE, op_rules.POOL1D, op_rules.IM2COL}
    assert {r.kind for r in RULES.values()} <= kinds
    with pytest.raises(ValueError, match="twice"):
        op_rules._add(OpRule(op_rules.POINTWISE), "add")


def test_derived_sets_answer_each_consumers_question():
    # the manual reader looks through casts, never through detach (it cuts autograd)
    assert "detach" not in op_rules.CASTS and "detach" in op_rules.KEEPS_POSITIONS
    assert {"to", "float", "contiguous", "clone", "_to_copy"} <= op_rules.CASTS
    # it reads only reshapes given a whole target shape; the layout proof reads every reshape
    assert op_rules.SHAPED_RESHAPES == {"view", "reshape", "_unsafe_view", "view_as", "reshape_as"}
    assert {"flatten", "unflatten", "squeeze", "unsqueeze"} <= op_rules.RESHAPES - op_rules.SHAPED_RESHAPES
    assert {"dropout", "feature_dropout", "dropout2d"} <= op_rules.RANDOM
    assert {"dropout", "contiguous", "to"} <= op_rules.MAYBE_ALIASING
    assert "clone" not in op_rules.MAYBE_ALIASING and "_to_copy" not in op_rules.MAYBE_ALIASING
    assert op_rules.RESHAPES | op_rules.PERMUTES | op_rules.SPLITS <= op_rules.VIEWING


@pytest.mark.parametrize("name,ndim,rank", [
    ("conv2d", 4, 2), ("conv2d", 3, None), ("conv3d", 5, 3), ("avg_pool3d", 5, 3), ("convolution", 4, 2),
    ("convolution", 5, 3), ("convolution", 3, None), ("interpolate", 5, 3), ("linear", 4, None),
])
def test_source_rank(name, ndim, rank):
    assert source_rank(name, ndim) == rank


def test_consumers_hold_no_second_copy():
    from gridattn_fx.layout import analysis as layout
    from gridattn_fx.passes import motion as regroup_motion
    from gridattn_fx.patterns import manual

    assert manual.CASTS is op_rules.CASTS and manual.SHAPED_RESHAPES is op_rules.SHAPED_RESHAPES
    assert manual.PRODUCTS is op_rules.PRODUCTS and manual.SCORE_PATH is op_rules.SCORE_PATH
    # the layout proof dispatches on the catalogue's kinds: every op name it reads is in the catalogue
    assert set(layout._TRANSFERS) <= {r.kind for r in RULES.values()}
    for module in (layout, regroup_motion):
        leftovers = [n for n in ("_POINTWISE", "_ELEMENTWISE", "_VIEWS", "_PERMUTES", "_SPLITS", "_LAST_DIM",
                                 "_CHANNEL_NORMS", "_VIEWING", "_MAYBE_ALIASING", "_SOURCES") if hasattr(module, n)]
        assert not leftovers, f"{module.__name__} keeps its own op sets {leftovers}"


# --- the motion reads the same pointwise rule as the layout proof ----------------------------------

class GatedAttention(nn.Module):
    """A ViT-like block whose q/k/v input passes a pointwise gate first: ``where`` / ``masked_fill``
    with an operand that is constant along the tokens (per channel), or one that varies along them."""

    def __init__(self, gate="where", dim=DIM):
        super().__init__()
        self.gate = gate
        self.embed = nn.Conv2d(3, dim, 2, 2)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.channel_keep = nn.Parameter(torch.rand(dim) > 0.3, requires_grad=False)
        self.oracle = None

    def forward(self, img):
        x = self.embed(img).flatten(2).transpose(1, 2)
        h = self.norm(x)
        if self.gate == "where":
            h = torch.where(self.channel_keep, h, 0.0)
        elif self.gate == "masked_fill":
            h = h.masked_fill(~self.channel_keep, 0.0)
        elif self.gate == "token_where":  # the condition varies along the tokens
            h = torch.where(h[..., :1] > 0, h, -h)
        elif self.gate == "dropout1d":
            h = F.dropout1d(h.transpose(1, 2), 0.5, self.training).transpose(1, 2)
        elif self.gate == "feature_dropout":
            h = torch.feature_dropout(h.transpose(1, 2), 0.5, self.training).transpose(1, 2)
        B, N, C = h.shape
        q, k, v = self.qkv(h).reshape(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        return x + self.proj(attend(self, q, k, v).transpose(1, 2).reshape(B, N, C))


def _moved_ops(model, inputs):
    from test_motion import motions, ops

    (motion, why, gm), = motions(model, inputs)
    return (ops(motion.moved, gm) if motion is not None else None), why


@pytest.mark.parametrize("gate", ["where", "masked_fill"])
def test_motion_crosses_a_gate_constant_along_the_tokens_exactly(gate):
    from test_motion import check_against_oracle

    model = build(GatedAttention, gate=gate)
    inputs = (image(2, 16, 12),)
    moved, why = _moved_ops(model, inputs)
    assert moved is not None and gate in moved and "layer_norm" in moved, why
    check_against_oracle(model, inputs, (0, 8, 6))


def test_motion_stops_at_a_where_whose_condition_varies_along_the_tokens():
    from test_motion import check_against_oracle

    model = build(GatedAttention, gate="token_where")
    inputs = (image(2, 16, 12),)
    moved, why = _moved_ops(model, inputs)
    assert moved is None or ("where" not in moved and "layer_norm" not in moved), moved
    check_against_oracle(model, inputs, (0, 8, 6))


@pytest.mark.parametrize("gate", ["dropout1d", "feature_dropout"])
def test_motion_stops_at_random_channel_dropout_in_training_only(gate):
    model = build(GatedAttention, gate=gate)
    inputs = (image(2, 16, 12),)
    moved, why = _moved_ops(model, inputs)  # eval: dropout1d is the identity, moved across
    assert moved is not None and "layer_norm" in moved, why
    model.train()
    moved, why = _moved_ops(model, inputs)
    assert moved is None or "layer_norm" not in moved, moved

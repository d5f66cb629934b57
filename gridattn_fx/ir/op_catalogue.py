"""What each op does to token axes: the one catalogue of op knowledge.

The layout proof (layout/analysis.py), the regrouping motion (passes/motion.py), the
manual-form reader (patterns/manual.py) and the mutation tracking all ask the same questions about
an op (by its canonical name, ir/ops.py ``op_name``): does it keep every value at its position,
does it reshape or permute axes, does it act on the trailing feature axes only, is it random, may its
output share storage with its input. The answers are written here once, one line per op; adding an
op is adding its name to the line of its kind.

Kinds (what the op does to the axes of its first tensor operand):

``POINTWISE``   every output element is computed from the elements at the same (broadcast) position
                of its tensor operands: positions are kept (add, gelu, where, dropout, ...).
``CAST``        the same values in another dtype or memory format, autograd intact (to, float,
                contiguous, clone): pointwise, and transparent to the manual-form reader.
``IDENTITY``    the same values, but not a cast the manual reader may look through: ``detach`` cuts
                autograd, ``alias`` / ``lift_fresh_copy`` are graph artefacts. Pointwise for the
                layout proof and the motion.
``RESHAPE``     a row-major reshape (view, flatten, unsqueeze, ...). ``shaped=True`` marks the ones
                given a whole target shape (view / reshape / view_as ...): the manual reader reads
                SAM's decomposed relative-position bias only through those (a 5-D (N, qh, qw, kh, kw)
                view of the flat scores and back); a chain of flatten/unflatten could reach the same
                shapes through an intermediate rank that reading does not model.
``PERMUTE``     reorders axes (permute, transpose, movedim, t).
``SPLIT``       pieces along one axis (split, chunk, unbind, ...).
``CAT``         concatenation along one axis.
``FEATURES``    acts on the trailing feature axes only, token by token (linear, layer_norm, rms_norm).
``CHANNEL_NORM`` a norm over the channel axis 1 (batch / group / instance norm): never moves a value.
                ``per_channel``: statistics per channel (batch norm) rather than per sample.
``KEEPDIM_REDUCTION`` ``x.mean(dim, keepdim=True)`` and friends (hand-written norms over features).
``SOURCE``      a spatial source: the output's trailing axes are an image (conv / pool / resize); a
                ``rank`` of None means "the output's rank minus 2" (ATen's rank-generic convolution).
``FRESH``       a new tensor whose values depend on no position (uninitialised or constant): what
                ``x[..., idx] = y`` fills of it hold is decided by the writes (layout/analysis.py).
``STACK``       stacks tensors along a new axis.
``SOFTMAX``     a softmax along one axis (keeps positions when that axis is no image axis).
``INDEX``       ``x[idx]`` (getitem). ``NARROW``: one slice along one axis (narrow, aten.slice).
                ``SELECT``: one index along one axis.
``REPEAT``      ``repeat_interleave`` (along a batch-like axis: each image repeated).
``BROADCAST``   expand / broadcast_to: new leading axes or size-1 axes stretched.
``TILE``        ``x.repeat(*sizes)``: the whole tensor tiled along each axis (and new leading axes).
``POOL1D``      a 1-D pooling of the last axis (NextViT's AvgPool1d over its token sequence).
``IM2COL``      ``F.unfold`` (im2col): (N, C, H, W) -> (N, C * kh * kw, patches), patches in raster order.
``PAD``         constant padding of the trailing axes (``F.pad``).
``PRODUCT``     a matrix product (matmul, bmm, baddbmm, einsum): what attention is built from, and,
                with a 2-D constant right operand, a per-token linear map.
``ATTRIBUTE``   a tensor attribute read through ``getattr`` (``x.mT`` / ``x.T`` transpose).
``OUTER``       ``outer(a, b)``: the 1-D ``a``'s positions on axis 0 (a rotary table from positions).

Flags:

``template``    ``x.view_as(t)`` / ``reshape_as`` / ``expand_as`` / ``type_as``: ``t`` is read for its shape
                or dtype only, its values flow nowhere.
``random``      draws random numbers (dropout): it keeps positions, so the layout proof carries a fact
                through it, but recomputed in another token order it is not the same draw, so the
                regrouping motion moves it only when it is the identity (p == 0 or not training).
``may_alias``   may return its argument itself (a no-op cast, contiguous on a contiguous tensor,
                dropout in eval mode): an alias for the mutation tracking unless values show a fresh
                storage.

Every consumer reads the same rule: the motion moves a pointwise op (``where``, ``masked_fill``,
``lerp``, in-place operators included) only when every other tensor operand is constant along the
token axis, never moves a node that mutates (in-place operators are refused before the catalogue is
asked), and checks ``random`` before moving a draw. The manual reader looks through ``CAST`` ops
and shaped reshapes only (see ``shaped`` and ``IDENTITY`` above).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from .values import value_of

POINTWISE = "pointwise"
CAST = "cast"
IDENTITY = "identity"
RESHAPE = "reshape"
PERMUTE = "permute"
SPLIT = "split"
CAT = "cat"
FEATURES = "features"
CHANNEL_NORM = "channel_norm"
KEEPDIM_REDUCTION = "keepdim_reduction"
SOURCE = "source"
FRESH = "fresh"
STACK = "stack"
SOFTMAX = "softmax"
INDEX = "index"
NARROW = "narrow"
SELECT = "select"
REPEAT = "repeat"
BROADCAST = "broadcast"
PAD = "pad"
PRODUCT = "product"
ATTRIBUTE = "attribute"
OUTER = "outer"
TILE = "tile"
POOL1D = "pool1d"
IM2COL = "im2col"


@dataclass(frozen=True)
class OpRule:
    kind: str
    random: bool = False
    may_alias: bool = False
    shaped: bool = False       # RESHAPE: given a whole target shape
    per_channel: bool = False  # CHANNEL_NORM: statistics per channel (batch norm), not per sample
    template: bool = False     # x.op_as(template): the second operand is read for its shape / dtype only
    rank: int | None = None    # SOURCE: image rank of the output (None: output rank - 2)


RULES: dict[str, OpRule] = {}


def _add(rule: OpRule, *names: str) -> None:
    for name in names:
        if name in RULES:
            raise ValueError(f"op {name!r} is in the catalogue twice")
        RULES[name] = rule


# --- the catalogue: one line per op (or per group of ops with the same rule) -------------------

_add(OpRule(POINTWISE), "add", "sub", "mul", "div", "truediv", "floordiv", "pow", "neg", "abs", "exp", "log",
     "sqrt", "rsqrt", "reciprocal", "square", "erf", "sin", "cos", "clamp", "clamp_min", "clamp_max")
_add(OpRule(POINTWISE), "sigmoid", "tanh", "relu", "gelu", "silu", "mish", "hardswish", "hardsigmoid",
     "leaky_relu", "elu", "softplus")
_add(OpRule(POINTWISE), "where", "masked_fill", "lerp", "addcmul")
_add(OpRule(POINTWISE), "radd", "rmul", "rsub")                    # operator's reflected forms
_add(OpRule(POINTWISE), "iadd", "imul", "isub", "itruediv")        # x += y (mutates: see ops.mutates)
_add(OpRule(POINTWISE, random=True, may_alias=True), "dropout", "feature_dropout", "dropout1d", "dropout2d",
     "dropout3d", "alpha_dropout", "feature_alpha_dropout")
_add(OpRule(CAST, may_alias=True), "to", "type", "float", "half", "double", "bfloat16", "contiguous")
_add(OpRule(CAST, may_alias=True, template=True), "type_as")
_add(OpRule(CAST), "_to_copy", "clone")
_add(OpRule(IDENTITY), "detach", "alias", "lift_fresh_copy")

_add(OpRule(RESHAPE, shaped=True), "view", "reshape", "_unsafe_view")
_add(OpRule(RESHAPE, shaped=True, template=True), "view_as", "reshape_as")
_add(OpRule(RESHAPE), "flatten", "unflatten", "squeeze", "unsqueeze")
_add(OpRule(PERMUTE), "permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t")
_add(OpRule(SPLIT), "split", "chunk", "unbind", "tensor_split", "split_with_sizes")
_add(OpRule(CAT), "cat", "concat", "concatenate")
_add(OpRule(STACK), "stack")
_add(OpRule(INDEX), "getitem")
_add(OpRule(NARROW), "narrow", "slice")
_add(OpRule(SELECT), "select")
_add(OpRule(REPEAT), "repeat_interleave")
_add(OpRule(BROADCAST), "expand", "broadcast_to")
_add(OpRule(TILE), "repeat", "tile")
_add(OpRule(POOL1D), "avg_pool1d", "max_pool1d")
_add(OpRule(IM2COL), "im2col", "unfold")   # "unfold" is also Tensor.unfold: the transfer tells them apart
_add(OpRule(BROADCAST, template=True), "expand_as")
_add(OpRule(PAD), "pad")
_add(OpRule(ATTRIBUTE), "getattr")
_add(OpRule(SOFTMAX), "softmax", "log_softmax", "_softmax")
_add(OpRule(PRODUCT), "matmul", "bmm", "baddbmm", "einsum")
_add(OpRule(OUTER), "outer", "ger")

_add(OpRule(FEATURES), "linear", "layer_norm", "rms_norm")
_add(OpRule(CHANNEL_NORM, per_channel=True), "batch_norm", "_native_batch_norm_legit_no_training")
_add(OpRule(CHANNEL_NORM), "group_norm", "instance_norm")
_add(OpRule(KEEPDIM_REDUCTION), "mean", "sum", "amax", "amin")   # all (x, dim, keepdim)

_add(OpRule(SOURCE, rank=2), "conv2d", "conv_transpose2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
     "adaptive_max_pool2d", "_adaptive_avg_pool2d", "upsample_nearest2d", "upsample_bilinear2d",
     "upsample_bicubic2d", "_upsample_nearest_exact2d", "pixel_shuffle", "pixel_unshuffle")
_add(OpRule(SOURCE, rank=3), "conv3d", "conv_transpose3d", "max_pool3d", "avg_pool3d", "adaptive_avg_pool3d",
     "adaptive_max_pool3d", "_adaptive_avg_pool3d", "upsample_nearest3d", "upsample_trilinear3d",
     "_upsample_nearest_exact3d")
# Rank-generic spellings: the image is every axis after (N, C).
_add(OpRule(SOURCE), "convolution", "_convolution", "interpolate", "upsample")
_add(OpRule(FRESH), "empty_like", "zeros_like", "ones_like", "full_like", "new_empty", "new_zeros", "new_ones",
     "new_full", "empty", "zeros", "ones", "full")


def rule(name: str | None) -> OpRule | None:
    return RULES.get(name) if name is not None else None


def names_of(*kinds: str) -> frozenset:
    return frozenset(n for n, r in RULES.items() if r.kind in kinds)


# --- derived sets, named after the question each consumer asks -----------------------------------

# Keeps every value at its position (layout proof: a fact passes; mutation tracking: an in-place
# form writes nothing elsewhere; motion: per-token when the other operands do not vary along it).
KEEPS_POSITIONS = names_of(POINTWISE, CAST, IDENTITY)
# Same values, other dtype / memory format: the manual reader looks through them.
CASTS = names_of(CAST)
RESHAPES = names_of(RESHAPE)
SHAPED_RESHAPES = frozenset(n for n, r in RULES.items() if r.kind == RESHAPE and r.shaped)
PERMUTES = names_of(PERMUTE)
SPLITS = names_of(SPLIT)
CATS = names_of(CAT)
FEATURE_OPS = names_of(FEATURES)
CHANNEL_NORMS = names_of(CHANNEL_NORM)
KEEPDIM_REDUCTIONS = names_of(KEEPDIM_REDUCTION)
SOURCES = names_of(SOURCE)
FRESH_TENSORS = names_of(FRESH)
RANDOM = frozenset(n for n, r in RULES.items() if r.random)
# ``x.view_as(t)`` and friends: ``t`` gives a shape or dtype, its values flow nowhere.
TEMPLATE_READS = frozenset(n for n, r in RULES.items() if r.template)
PRODUCTS = names_of(PRODUCT)
# The steps between the product and the softmax of a hand-written attention that the manual reader
# reads exactly (patterns/manual.py): scales, added biases, keep-masks, casts and shaped views.
SCORE_STEPS = frozenset({"add", "iadd", "radd", "mul", "div", "truediv", "masked_fill", "where"}) | CASTS | SHAPED_RESHAPES
# What a score tensor may pass through on its way to a softmax for the site to look like attention
# even when the reader cannot read it (reported, not rewritten): none of these moves an axis (a
# softmax over a transposed product is over the queries, not attention).
SCORE_PATH = SCORE_STEPS | {"sub", "rsub", "neg", "tanh", "clamp", "clamp_min", "clamp_max"}
# Output shares storage with the first argument (views) ...
VIEWING = RESHAPES | PERMUTES | SPLITS | {
    "getitem", "narrow", "slice", "select", "expand", "expand_as", "broadcast_to", "detach", "alias",
    "as_strided", "diagonal", "unfold", "view_as_real", "view_as_complex", "real", "imag", "getattr",
}
# ... or may be the argument itself (see ``may_alias``).
MAYBE_ALIASING = frozenset(n for n, r in RULES.items() if r.may_alias)


def source_rank(name: str, out_ndim: int) -> int | None:
    """The image rank of a spatial source's output of rank ``out_ndim`` ((N, C, *image)), or None."""
    r = rule(name)
    if r is None or r.kind != SOURCE:
        return None
    rank = r.rank if r.rank is not None else out_ndim - 2
    return rank if out_ndim == rank + 2 and rank in (2, 3) else None


# --- reading an op's arguments -------------------------------------------------------------------

def arg(node: fx.Node, index: int, name: str, default=None):
    """Argument ``index`` of ``node``, or its keyword ``name``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def resolve(a):
    """Arguments as values: nodes that compute sizes become their SymInt / int values."""
    if isinstance(a, fx.Node):
        return value_of(a)
    if isinstance(a, (list, tuple)):
        return type(a)(resolve(x) for x in a)
    return a


def is_identity_draw(node: fx.Node) -> bool:
    """Whether a ``random`` op is the identity at this call (p == 0, or not training): ``dropout(x, p,
    training)`` / ``feature_dropout(x, p, train)`` in every spelling."""
    p = arg(node, 1, "p", 0.5)
    training = arg(node, 2, "training", node.kwargs.get("train", True))
    return p == 0 or training is False


def permutation(node: fx.Node, name: str, ndim: int) -> list[int]:
    """A PERMUTE op's ``perm``: output axis i = input axis perm[i]."""
    args = [resolve(a) for a in node.args[1:]]
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        if not dims:
            dims = resolve(node.kwargs.get("dims"))
        return [d % ndim for d in dims]
    perm = list(range(ndim))
    if name == "t":
        return perm[::-1]
    if name in ("transpose", "swapaxes", "swapdims"):
        a = args[0] if args else resolve(node.kwargs.get("dim0"))
        b = args[1] if len(args) > 1 else resolve(node.kwargs.get("dim1"))
        a, b = a % ndim, b % ndim
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    # movedim / moveaxis
    src = args[0] if args else resolve(node.kwargs.get("source"))
    dst = args[1] if len(args) > 1 else resolve(node.kwargs.get("destination"))
    src = [s % ndim for s in (src if isinstance(src, (list, tuple)) else [src])]
    dst = [d % ndim for d in (dst if isinstance(dst, (list, tuple)) else [dst])]
    rest = [d for d in range(ndim) if d not in src]
    out = [None] * ndim
    for s, d in zip(src, dst):
        out[d] = s
    it = iter(rest)
    return [o if o is not None else next(it) for o in out]


def narrowed(node: fx.Node, name: str) -> tuple:
    """A NARROW op's (dim, slice): ``narrow(x, dim, start, length)`` or ``aten.slice(x, dim, start,
    end, step)``."""
    if name == "narrow":
        dim, start, length = (resolve(arg(node, i, n)) for i, n in ((1, "dim"), (2, "start"), (3, "length")))
        return dim, slice(start, start + length)
    return resolve(arg(node, 1, "dim", 0)), slice(resolve(arg(node, 2, "start")), resolve(arg(node, 3, "end")),
                                                  resolve(arg(node, 4, "step", 1)))


def split_dim(node: fx.Node, name: str):
    """The axis a SPLIT op cuts along (unbind: argument 1, the others: argument 2)."""
    return arg(node, 1 if name == "unbind" else 2, "dim", 0)

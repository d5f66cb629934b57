"""Hand-written attention: ``softmax(scale * q @ k^T + bias) @ v`` spelled out op by op.

Real models write it many ways (timm/SAM/Swin scale q first, diffusers uses ``baddbmm``, HF adds
masks with ``masked_fill`` or ``where``, SAM adds a decomposed relative-position bias through a
5-D view). Rather than one pattern per spelling, the matcher starts at every softmax over the last
axis and reads the chain around it into one canonical description:

    product      q @ k^T  (matmul, @, bmm, baddbmm, einsum; k transposed by transpose/permute/mT);
                 q and k may be ``F.normalize``d over their features (cosine attention, Swin-V2)
    score steps  applied to the product in order: scale by a constant or by a tensor that is
                 constant along both token axes (Swin-V2's ``logit_scale.exp()``, XCiT's
                 temperature: shape (heads, 1, 1)), add a bias tensor, keep-masks (masked_fill /
                 where with -inf), SAM's decomposed rel-pos add
    softmax      tensor method / F.softmax / torch.softmax, casts around it
    weights      optional dropout, then probabilities @ v, or ``v @ P^T`` on channels-first
                 tensors (timm CoAtNet/MaxxViT ``Attention2d``, EfficientViT-MSRA): q, k, v of
                 shape (..., d, N), read in the SDPA convention as ``out^T = P @ v^T``

Anything it cannot read exactly (a finite fill value, a scale that varies along the tokens,
probabilities used elsewhere) is still reported as a site, skipped with the reason; so is a
softmax over the last axis of a product of two batched tensors whose chain matches no reading
(it looks like attention: leaving it out of the report would be a silent omission).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..ir.op_catalogue import CASTS, PRODUCTS, SCORE_PATH, SCORE_STEPS, SHAPED_RESHAPES, TEMPLATE_READS, arg
from ..ir.ops import op_name
from ..ir.values import shape_of, value_of
from .manual_replacement import ManualReplacement
from .relpos_bias import relpos_bias_terms, relpos_grid, relpos_terms
from .site import AttentionSite

# Casts the reading looks through, and the reshapes it reads (given a whole target shape): from the
# op catalogue (ir/op_catalogue.py), which says why detach and flatten-like reshapes are not among them.
# Users that read only a tensor's shape (``x.reshape_as(scores)``) do not use its values.
# Users that read a node only as a shape template (type_as is a cast the reader looks through).
_SHAPE_ONLY = TEMPLATE_READS - CASTS


class NoMatch(Exception):
    """The chain around a softmax is not attention (or not one we can read); not a site."""


class Unsupported(Exception):
    """It is attention, but some part cannot be expressed exactly; a skipped site."""


@dataclass
class _Reading:
    """What the walk has read so far; score steps are kept in the order they are applied."""

    nodes: list = field(default_factory=list)
    # ("scale", c) | ("tscale", node, divide) | ("bias", node) | ("base", node, beta)
    # | ("keep", node, negate) | ("relpos", h, w)
    steps: list = field(default_factory=list)
    q_scale: float = 1.0
    product: str = ""
    # F.normalize arguments (p, dim, eps) taken off q / k (cosine attention), applied in the replacement
    q_norm: tuple | None = None
    k_norm: tuple | None = None
    # ``v @ P^T``: q, k, v and the output are channels-first, (..., d, N)
    channels_first: bool = False


def _name(node) -> str | None:
    return op_name(node) if isinstance(node, fx.Node) else None


def _const(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, numbers.Number):
        return None
    return float(x)


def _value_users(node: fx.Node) -> list:
    return [u for u in node.users
            if not (_name(u) in _SHAPE_ONLY and u.args[0] is not node) and _name(u) not in ("size", "dim")]


def _single_user(node: fx.Node) -> bool:
    return len(_value_users(node)) == 1


def _last_axis(node: fx.Node, dim) -> bool:
    shape = shape_of(node)
    return isinstance(dim, int) and shape is not None and dim % len(shape) == len(shape) - 1


def _skip_casts_back(node, reading):
    while _name(node) in CASTS and _single_user(node):
        reading.nodes.append(node)
        node = node.args[0]
    return node


def _is_neg_inf(x) -> bool:
    return isinstance(x, numbers.Number) and math.isinf(x) and x < 0


# --- the score chain, read backwards from the softmax input -----------------------------------

def _read_scores(node, reading: _Reading):
    """Walk from the softmax input back to the q @ k^T product; returns the product node."""
    while True:
        node = _skip_casts_back(node, reading)
        name = _name(node)
        if not isinstance(node, fx.Node):
            raise NoMatch("scores are not a tensor")
        if not _single_user(node):
            raise Unsupported(f"the attention scores `{node.name}` are also used outside the attention")
        reading.nodes.append(node)
        if name in PRODUCTS:
            reading.product = name
            return node
        if name in ("mul", "div", "truediv"):
            a, b = node.args[0], node.args[1]
            c, other = (_const(b), a) if _const(b) is not None else (_const(a), b)
            if c is None:
                node, factor = _tensor_scale(node, name)
                reading.steps.append(("tscale", factor, name != "mul"))
                continue
            if name != "mul" and other is not a:
                raise Unsupported("a constant divided by the scores is not a scale")
            reading.steps.append(("scale", c if name == "mul" else 1.0 / c))
            node = other
        elif name in ("add", "iadd", "radd"):
            chain, bias = _which_is_chain(node.args[0], node.args[1])
            reading.steps.append(("bias", bias))
            node = chain
        elif name == "masked_fill":
            value = arg(node, 2, "value")
            if not _is_neg_inf(value):
                raise Unsupported(f"masked_fill with {value!r} (only -inf is an exact additive mask)")
            reading.steps.append(("keep", arg(node, 1, "mask"), True))
            node = node.args[0]
        elif name == "where":
            cond, a, b = node.args[0], node.args[1], node.args[2]
            if _is_neg_inf(b) and isinstance(a, fx.Node):
                reading.steps.append(("keep", cond, False))
                node = a
            elif _is_neg_inf(a) and isinstance(b, fx.Node):
                reading.steps.append(("keep", cond, True))
                node = b
            else:
                raise Unsupported("where() with a finite fill value is not an additive mask")
        elif name in SHAPED_RESHAPES:
            flat = _read_relpos(node.args[0], reading)
            if flat is None:
                if _reaches_product(node.args[0]):  # e.g. Swin's shifted-window mask added in 5-D
                    raise Unsupported("a bias added through a reshape of the scores (not a decomposed "
                                      "relative-position bias)")
                raise NoMatch("a reshape between the product and the softmax")
            node = flat
        else:
            raise NoMatch(f"{name or node.op} between the product and the softmax")


def _tensor_scale(node, name):
    """``scores * t`` / ``scores / t`` with ``t`` constant along both token axes (its last two
    sizes are 1, e.g. a per-head (heads, 1, 1) logit scale): (the chain, t)."""
    a, b = node.args[0], node.args[1]
    for chain, factor in ((a, b), (b, a)) if name == "mul" else ((a, b),):
        if not (isinstance(chain, fx.Node) and _reaches_product(chain)):
            continue
        shape = shape_of(factor) if isinstance(factor, fx.Node) else None
        if shape is None:
            raise Unsupported(f"the scores are scaled by a non-tensor value `{getattr(factor, 'name', factor)}`")
        if any(not (isinstance(s, int) and s == 1) for s in shape[-2:]):
            raise Unsupported(f"the scores are multiplied by a tensor of shape {tuple(shape)} that varies "
                              "along the token axes (not a scale)")
        return chain, factor
    raise NoMatch(f"{name} of two tensors, neither of which leads to a q @ k^T product")


def _which_is_chain(a, b):
    """In ``scores + bias`` the chain is the operand that leads back to a product."""
    for chain, bias in ((a, b), (b, a)):
        if isinstance(chain, fx.Node) and _reaches_product(chain):
            if not isinstance(bias, fx.Node):
                raise Unsupported("adding a constant to the scores")
            return chain, bias
    raise NoMatch("neither operand of the add leads to a q @ k^T product")


def _reaches_product(node, depth=8) -> bool:
    """Whether ``node`` is the product itself or a score step away from it."""
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            name = _name(n)
            if name in PRODUCTS:
                return True
            if name in SCORE_STEPS:
                nxt.extend(a for a in n.args if isinstance(a, fx.Node))
        frontier = nxt
    return False


def _read_relpos(add_node, reading: _Reading):
    """SAM: ``(S.view(N, qh, qw, kh, kw) + rel_h[..., None] + rel_w[..., None, :]).view(N, L, L)``.

    ``add_node`` is what the view back to (N, L, L) reads. Returns the flat scores S to continue
    the walk from, or None when this is not that pattern.
    """
    shape = shape_of(add_node)
    if _name(add_node) not in ("add", "iadd") or shape is None or len(shape) != 5:
        return None
    inner, outer_term = None, None
    for a, b in ((add_node.args[0], add_node.args[1]), (add_node.args[1], add_node.args[0])):
        if _name(a) in ("add", "iadd") and isinstance(b, fx.Node):
            inner, outer_term = a, b
            break
    if inner is None:
        return None
    for x, y in ((inner.args[0], inner.args[1]), (inner.args[1], inner.args[0])):
        if _name(x) in SHAPED_RESHAPES and isinstance(y, fx.Node) and len(shape_of(x.args[0]) or ()) in (3, 4):
            terms = relpos_terms(y, outer_term)
            if terms is None:
                return None
            reading.nodes.extend([add_node, inner, x])
            reading.steps.append(("relpos", *terms))
            return x.args[0]
    return None


# --- the product's operands --------------------------------------------------------------------

def _strip_scale(node, reading: _Reading):
    """``x * c`` / ``x / c`` on an operand: fold c into the score scale."""
    while _name(node) in ("mul", "div", "truediv") and _single_user(node):
        a, b = node.args[0], node.args[1]
        if _const(b) is not None and isinstance(a, fx.Node):
            reading.q_scale *= _const(b) if _name(node) == "mul" else 1.0 / _const(b)
            reading.nodes.append(node)
            node = a
        elif _name(node) == "mul" and _const(a) is not None and isinstance(b, fx.Node):
            reading.q_scale *= _const(a)
            reading.nodes.append(node)
            node = b
        else:
            break
    return node


def _untranspose(node, reading: _Reading):
    """k^T -> (k, True) when the transpose of the last two axes is explicit, else (k^T, False)."""
    name = _name(node)
    shape = shape_of(node)
    if shape is None:
        raise NoMatch("key operand has no shape")
    nd = len(shape)
    swapped = False
    if name in ("transpose", "swapaxes", "swapdims"):
        dims = sorted(d % nd for d in node.args[1:3])
        swapped = dims == [nd - 2, nd - 1]
    elif name == "permute":
        perm = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        perm = [p % nd for p in perm]
        swapped = perm == list(range(nd - 2)) + [nd - 1, nd - 2]
    elif name == "getattr" and node.args[1] == "mT":
        swapped = True
    elif name == "t" and nd == 2:
        swapped = True
    if swapped and _single_user(node):
        reading.nodes.append(node)
        return _strip_scale(node.args[0], reading), True
    return node, False


def _einsum_operands(node):
    """(a, b, form) for ``...id,...jd->...ij`` (scores) or ``...ij,...jd->...id`` (output)."""
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str) or len(operands) != 2 or "..." in equation:
        raise NoMatch("einsum form")
    lhs, out = equation.replace(" ", "").split("->")
    x, y = lhs.split(",")
    if len(x) != len(y) or len(x) != len(out) or x[:-2] != y[:-2] or x[:-2] != out[:-2]:
        raise NoMatch("einsum is not a batched product")
    i, d1 = x[-2:]
    j, d2 = y[-2:]
    if d1 == d2 and out[-2:] == i + j:
        return operands[0], operands[1], "qk"
    if x[-1] == y[-2] and out[-2:] == x[-2] + y[-1]:
        return operands[0], operands[1], "pv"
    raise NoMatch("einsum is not an attention product")


def _strip_normalize(node, feature_dim: int, reading: _Reading):
    """``F.normalize(x, p, dim=features)`` on an operand -> (x, (p, dim, eps)); else (node, None).

    Normalizing over the features treats every token on its own: the replacement applies it to
    the (possibly regrouped) operand, and the operand's own token layout is the one to prove.
    """
    shape = shape_of(node)
    if _name(node) != "normalize" or shape is None or not _single_user(node) or node.kwargs.get("out") is not None:
        return node, None
    p, dim, eps = arg(node, 1, "p", 2.0), arg(node, 2, "dim", 1), arg(node, 3, "eps", 1e-12)
    nd = len(shape)
    if not isinstance(dim, int) or dim % nd != feature_dim % nd or _const(p) is None or _const(eps) is None:
        return node, None
    reading.nodes.append(node)
    return node.args[0], (_const(p), dim % nd - nd, _const(eps))


def _read_product(prod: fx.Node, reading: _Reading):
    """(q, k, k_is_transposed_input) from the score product; records alpha/beta of baddbmm.

    ``q`` and ``k`` are given as the site reads them: without a feature-wise ``F.normalize``
    (kept in ``reading.q_norm`` / ``k_norm``), and for a channels-first site (``v @ P^T``) ``q``
    is the (..., d, N) tensor the product transposes.
    """
    name = _name(prod)
    if name == "einsum":
        a, b, form = _einsum_operands(prod)
        if form != "qk":
            raise NoMatch("einsum is not q k^T")
        if reading.channels_first:
            raise Unsupported("v @ P^T with the scores from an einsum")
        q, reading.q_norm = _strip_normalize(_strip_scale(a, reading), -1, reading)
        k, reading.k_norm = _strip_normalize(_strip_scale(b, reading), -1, reading)
        return q, k, False
    if name == "baddbmm":
        base, a, b = prod.args[0], prod.args[1], prod.args[2]
        beta, alpha = arg(prod, 3, "beta", 1), arg(prod, 4, "alpha", 1)
        if _const(alpha) is None or _const(beta) is None:
            raise Unsupported("baddbmm with non-constant alpha/beta")
        # scores = beta * base + alpha * a @ b: the alpha scale acts on the product only.
        reading.q_scale *= _const(alpha)
        if _const(beta) != 0:
            reading.steps.append(("base", base, _const(beta)))
    else:
        a, b = prod.args[0], prod.args[1]
    q = _strip_scale(a, reading)
    if reading.channels_first:
        # The output's token axis is the last one: the query must be given on that axis too, so
        # that the output inherits the query's layout on the right axis (layout/analysis.py).
        q, explicit_q = _untranspose(q, reading)
        if not explicit_q:
            raise Unsupported("v @ P^T whose query is not a transposed channels-first (..., d, N) tensor")
        q, reading.q_norm = _strip_normalize(q, -2, reading)
    else:
        q, reading.q_norm = _strip_normalize(q, -1, reading)
    kt, explicit = _untranspose(_strip_scale(b, reading), reading)
    k, reading.k_norm = _strip_normalize(kt, -1 if explicit else -2, reading)
    return q, k, not explicit


# --- after the softmax ----------------------------------------------------------------------------

def _swaps_last_two(node) -> bool:
    """Whether ``node`` transposes the last two axes of its input (transpose / permute / mT)."""
    name, shape = _name(node), shape_of(node)
    if shape is None:
        return False
    nd = len(shape)
    if name in ("transpose", "swapaxes", "swapdims"):
        dims = node.args[1:3]
        return all(isinstance(d, int) for d in dims) and sorted(d % nd for d in dims) == [nd - 2, nd - 1]
    if name == "permute":
        perm = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        return all(isinstance(p, int) for p in perm) and [p % nd for p in perm] == list(range(nd - 2)) + [nd - 1, nd - 2]
    return name == "getattr" and node.args[1] == "mT"


def _read_output(softmax: fx.Node, reading: _Reading):
    """Follow the probabilities through casts and dropout to ``P @ v`` (or ``v @ P^T``, which sets
    ``reading.channels_first``); returns (output, v, p)."""
    node, dropout_p = softmax, 0.0
    while True:
        if len(node.users) != 1:
            raise Unsupported("the attention probabilities are used outside the attention")
        user = next(iter(node.users))
        name = _name(user)
        if name in CASTS:
            reading.nodes.append(user)
            node = user
            continue
        if name in ("dropout", "feature_dropout"):
            p, training = arg(user, 1, "p", 0.5), arg(user, 2, "training", True)
            if _const(p) is None or not isinstance(training, bool):
                raise Unsupported("dropout with non-constant p or training flag")
            dropout_p = float(p) if training else 0.0
            reading.nodes.append(user)
            node = user
            continue
        if name in ("matmul", "bmm") and user.args[0] is node:
            reading.nodes.append(user)
            return user, user.args[1], dropout_p
        if _swaps_last_two(user) and len(user.users) == 1:
            product = next(iter(user.users))
            if _name(product) in ("matmul", "bmm") and product.args[1] is user and product.args[0] is not user:
                reading.nodes.extend([user, product])
                reading.channels_first = True
                return product, product.args[0], dropout_p
        if name == "einsum":
            a, b, form = _einsum_operands(user)
            if form == "pv" and a is node:
                reading.nodes.append(user)
                return user, b, dropout_p
        raise NoMatch(f"softmax output goes to {name or user.op}, not to a product with v")


# --- the site -------------------------------------------------------------------------------------

def _score_program(reading: _Reading):
    """Fold the steps into ``scores = scale * prod(t) * q @ k^T + sum(m * bias) + keep-masks
    [+ rel-pos]``; ``t`` are the tensor scales, as (node, divide) pairs."""
    scale = reading.q_scale
    biases, keeps, relpos, tscales = [], [], None, []
    for step in reversed(reading.steps):  # recorded outermost first; apply innermost first
        kind = step[0]
        if kind == "tscale":
            # Folded into q, a tensor scale must act on the product alone.
            if keeps:
                raise Unsupported("a tensor scale after a -inf mask (its sign is not known)")
            if biases or relpos is not None:
                raise Unsupported("a tensor scale applied after a bias (it would scale the bias too)")
            tscales.append((step[1], step[2]))
        elif kind == "scale":
            if step[1] <= 0 and keeps:
                raise Unsupported("a non-positive scale after a -inf mask")
            if relpos is not None:
                raise Unsupported("scaling after the relative-position bias")
            scale *= step[1]
            biases = [(b, m * step[1]) for b, m in biases]
        elif kind == "bias":
            biases.append((step[1], 1.0))
        elif kind == "base":  # baddbmm's beta * input
            biases.append((step[1], step[2]))
        elif kind == "keep":
            keeps.append((step[1], step[2]))
        elif kind == "relpos":
            relpos = (step[1], step[2])
    return scale, biases, keeps, relpos, tscales


def _match(softmax: fx.Node) -> AttentionSite:
    dim = arg(softmax, 1, "dim")
    if not _last_axis(softmax, dim):
        raise NoMatch("softmax is not over the last axis")
    reading = _Reading()
    output, v, dropout_p = _read_output(softmax, reading)
    prod = _read_scores(_skip_casts_back(softmax.args[0], reading), reading)
    q, k, k_transposed_input = _read_product(prod, reading)
    if not all(isinstance(x, fx.Node) for x in (q, k, v)):
        raise NoMatch("operands are not tensors")
    scale, biases, keeps, relpos, tscales = _score_program(reading)
    if relpos is None and not keeps and len(biases) == 1 and biases[0][1] == 1.0:
        terms = relpos_bias_terms(biases[0][0])
        if terms is not None:  # timm samvit / HF SAM add the decomposed bias as one tensor
            bias = biases.pop()[0]
            reading.nodes.extend([bias, bias.args[0]])
            relpos = terms
    if relpos is not None and (biases or keeps):
        raise Unsupported("relative-position bias combined with other biases or masks")
    return _site(softmax, output, q, k, v, k_transposed_input, scale, biases, keeps, relpos, tscales, dropout_p,
                 reading)


def _swapped(shape):
    return shape[:-2] + (shape[-1], shape[-2])


def _site(softmax, output, q, k, v, k_transposed_input, scale, biases, keeps, relpos, tscales, dropout_p, reading):
    channels_first = reading.channels_first
    q_shape, v_shape = shape_of(q), shape_of(v)
    k_shape = shape_of(k)
    if None in (q_shape, k_shape, v_shape):
        raise NoMatch("operands without shapes")
    if channels_first:
        q_shape, v_shape = _swapped(q_shape), _swapped(v_shape)
    if k_transposed_input:
        k_shape = _swapped(k_shape)
    for factor, _ in tscales:
        try:
            widened = tuple(torch.broadcast_shapes(q_shape, shape_of(factor))) != tuple(q_shape)
        except Exception:  # symbolic or incompatible sizes: not provably a per-head scale of q
            widened = True
        if widened:
            raise Unsupported(f"a tensor scale of shape {tuple(shape_of(factor))} that does not broadcast into "
                              f"the query {tuple(q_shape)}")
    q_norm, k_norm = reading.q_norm, reading.k_norm
    extra = [b for b, _ in biases] + [m for m, _ in keeps] + (list(relpos) if relpos else [])
    factors = [t for t, _ in tscales]
    divides = [d for _, d in tscales]
    inputs = [q, k, v] + extra + factors
    multipliers = [m for _, m in biases]
    negations = [neg for _, neg in keeps]
    n_bias, n_keep = len(biases), len(keeps)
    mask_shape = None
    if biases or keeps:
        mask_shape = tuple(torch.broadcast_shapes(*[tuple(value_of(n).shape) for n in extra]))
    elif relpos:
        h_shape = shape_of(relpos[0])  # (N, qh, qw, kh, 1)
        mask_shape = (h_shape[0], h_shape[1] * h_shape[2], h_shape[3] * shape_of(relpos[1])[4])
    grid = relpos_grid(*relpos) if relpos else None

    # diffusers' upcast_attention runs q @ k^T in float32 while v stays in the model dtype: attend
    # in the scores' dtype and give the output the dtype the original product had.
    build = ManualReplacement(
        q_norm=q_norm, k_norm=k_norm, channels_first=channels_first, k_transposed=k_transposed_input,
        divides=tuple(divides), n_bias=n_bias, n_keep=n_keep, multipliers=tuple(multipliers),
        negations=tuple(negations), relpos=grid is not None, score_dtype=value_of(q).dtype,
        v_cast=value_of(v).dtype != value_of(q).dtype, out_dtype=value_of(output).dtype)

    form = ("manual-" + reading.product + ("+relpos" if relpos else "") + ("+cosine" if q_norm or k_norm else "")
            + ("+tensor-scale" if factors else "") + ("+channels-first" if channels_first else ""))
    return AttentionSite(
        form=form,
        output=output,
        query=q,
        key=k,
        query_dim=-1 if channels_first else -2,
        key_dim=-1 if k_transposed_input else -2,
        value_dim=-1 if channels_first else -2,
        inputs=inputs,
        build=build,
        q_shape=q_shape,
        k_shape=k_shape,
        v_shape=v_shape,
        mask_shape=mask_shape,
        relpos=grid,
        dropout_p=dropout_p,
        scale=scale,
        nodes=list(reversed(reading.nodes)) + [softmax],
    )


def find_manual_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    sites = []
    for node in list(gm.graph.nodes):
        if _name(node) not in ("softmax", "_softmax"):
            continue
        try:
            site = _match(node)
        except (NoMatch, Unsupported) as why:
            # Reported only when it looks like attention: a classifier's softmax is not a site,
            # whatever the reading tripped over.
            if not _attention_like(node):
                continue
            reason = str(why) if isinstance(why, Unsupported) else f"attention-like softmax whose chain is not read ({why})"
            site = _unsupported_site(node, reason)
            if site is None:
                continue
        sites.append(site)
    return sites


def _attention_like(softmax: fx.Node, depth: int = 16) -> bool:
    """A softmax over the last axis of scores from a product of two batched (>= 3-D) tensors: what
    attention looks like even when its chain is spelled in a way the reading does not know. A
    classifier's softmax (logits from a linear or a product with a 2-D weight) is not."""
    if not _last_axis(softmax, arg(softmax, 1, "dim")):
        return False
    frontier = [softmax.args[0]]
    for _ in range(depth):
        nxt = []
        for node in frontier:
            name = _name(node)
            if name in PRODUCTS:
                if name == "einsum":
                    operands = node.args[1:]
                    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
                        operands = operands[0]
                else:
                    operands = node.args[1:3] if name == "baddbmm" else node.args[:2]
                tensors = [a for a in operands if isinstance(a, fx.Node)]
                if len(tensors) == 2 and all(len(shape_of(a) or ()) >= 3 for a in tensors):
                    return True
            elif name in SCORE_PATH:
                nxt.extend(a for a in node.args if isinstance(a, fx.Node))
        frontier = nxt
    return False


def _unsupported_site(softmax: fx.Node, why: str) -> AttentionSite | None:
    """A site we recognise but will not rewrite: reported against the softmax node."""
    shape = shape_of(softmax)
    if shape is None:
        return None
    return AttentionSite(
        form="manual", output=softmax, query=softmax, key=softmax, inputs=[], build=None,
        q_shape=None, k_shape=None, v_shape=None, nodes=[], unsupported=why,
    )

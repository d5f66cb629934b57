"""Independent Grid-Attention oracle (DESIGN.md section 1).

Deliberately does NOT import gridattn_fx: the grid mask is rebuilt here with plain Python loops
from the definition, so a bug in gridattn_fx.grid cannot hide itself by also living in the oracle.

A layout is given as a tuple ``(prefix, height, width[, suffix[, transposed]])`` or any object with
``prefix/height/width/suffix/transposed`` attributes (e.g. a gridattn_fx.TokenLayout, only read).
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

# float64 everywhere: a wrong group assignment changes outputs by O(1e-2), rounding by O(1e-15),
# so these tolerances separate the two by many orders of magnitude.
ATOL = 1e-10
RTOL = 1e-9


def layout_tuple(layout) -> tuple[int, int, int, int, bool]:
    if isinstance(layout, (tuple, list)):
        t = tuple(layout)
        if len(t) == 3:
            t = t + (0,)
        if len(t) == 4:
            t = t + (False,)
        p, h, w, s, tr = t
        return int(p), int(h), int(w), int(s), bool(tr)
    return (int(layout.prefix), int(layout.height), int(layout.width), int(layout.suffix),
            bool(getattr(layout, "transposed", False)))


def stride_tuple(stride) -> tuple[int, int]:
    if isinstance(stride, int):
        return (stride, stride)
    gh, gw = stride
    return (int(gh), int(gw))


def token_groups(layout, stride) -> list:
    """Group of every token along the sequence; None for prefix/suffix (non-image) tokens."""
    p, h, w, s, transposed = layout_tuple(layout)
    gh, gw = stride_tuple(stride)
    groups: list = [None] * p
    for t in range(h * w):
        if transposed:  # column-major: walk down a column first
            c, r = divmod(t, h)
        else:
            r, c = divmod(t, w)
        groups.append((r % gh, c % gw))
    groups += [None] * s
    return groups


def shuffled_token_groups(layout, stride, assignment) -> list:
    """Groups under shuffle distributing, from DESIGN.md section 1 and the documented encoding of
    ``gridattn_fx.grid.draw_assignment``: ``assignment[a, b, g]`` is the offset, counted in storage
    order, of the token of block ``(a, b)`` that joins group ``g``. Storage order is row-major, or
    for a column-major image: blocks and offsets enumerated column-first, and group ``g`` then names
    the group ``(g % Gh, g // Gh)``.
    """
    p, h, w, s, transposed = layout_tuple(layout)
    gh, gw = stride_tuple(stride)
    a_np = np.asarray(assignment)
    groups: list = [None] * p
    for t in range(h * w):
        if transposed:
            c, r = divmod(t, h)
            block, offset = (c // gw, r // gh), (c % gw) * gh + (r % gh)
        else:
            r, c = divmod(t, w)
            block, offset = (r // gh, c // gw), (r % gh) * gw + (c % gw)
        g = int(np.nonzero(a_np[block] == offset)[0][0])
        groups.append((g % gh, g // gh) if transposed else divmod(g, gw))
    groups += [None] * s
    return groups


def mask_from_groups(gq, gk) -> np.ndarray:
    m = np.zeros((len(gq), len(gk)), dtype=bool)
    for i, a in enumerate(gq):
        for j, b in enumerate(gk):
            m[i, j] = a is None or b is None or a == b
    return m


@functools.lru_cache(maxsize=256)
def _grid_mask_cached(q, k, stride) -> np.ndarray:
    return mask_from_groups(token_groups(q, stride), token_groups(k, stride))


def grid_mask_np(q_layout, k_layout, stride) -> np.ndarray:
    """M[i, j] = i not image, or j not image, or group(i) == group(j)."""
    return _grid_mask_cached(layout_tuple(q_layout), layout_tuple(k_layout), stride_tuple(stride)).copy()


def log_grid_mask(q_layout, k_layout, stride, dtype=torch.float64, device=None) -> torch.Tensor:
    m = grid_mask_np(q_layout, k_layout, stride)
    return torch.from_numpy(np.where(m, 0.0, -np.inf)).to(dtype=dtype, device=device)


def as_additive(attn_mask, dtype) -> torch.Tensor | None:
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(
        ~attn_mask, -math.inf)


def oracle_mask(attn_mask, q_layout, k_layout, stride, dtype, device=None, assignment=None) -> torch.Tensor:
    """B + log M (B converted from bool to 0/-inf first); M for a shuffle ``assignment`` pair if given."""
    if assignment is None:
        logm = log_grid_mask(q_layout, k_layout, stride, dtype=dtype, device=device)
    else:
        m = mask_from_groups(shuffled_token_groups(q_layout, stride, assignment[0].cpu()),
                             shuffled_token_groups(k_layout, stride, assignment[1].cpu()))
        logm = torch.from_numpy(np.where(m, 0.0, -np.inf)).to(dtype=dtype, device=device)
    b = as_additive(attn_mask, dtype)
    return logm if b is None else b + logm


def oracle_sdpa(q, k, v, attn_mask=None, scale=None, *, q_layout, k_layout, stride, assignment=None):
    """The reference semantics: SDPA(Q, K, V, attn_mask = B + log M)."""
    mask = oracle_mask(attn_mask, q_layout, k_layout, stride, q.dtype, q.device, assignment)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def naive_attention(q, k, v, allowed: np.ndarray, bias=None, scale=None):
    """Loop-level attention over explicitly allowed keys: used once to check the oracle itself."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)
    lead = q.shape[:-2]
    for idx in np.ndindex(*lead):
        for i in range(q.shape[-2]):
            js = [j for j in range(k.shape[-2]) if allowed[i, j]]
            logits = torch.stack([(q[idx + (i,)] * k[idx + (j,)]).sum() * scale for j in js])
            if bias is not None:
                b = bias.expand(lead + bias.shape[-2:])[idx]
                logits = logits + torch.stack([b[i, j] for j in js])
            p = torch.softmax(logits, 0)
            out[idx + (i,)] = sum(p[n] * v[idx + (j,)] for n, j in enumerate(js))
    return out


def assert_close64(actual, expected, atol=ATOL, rtol=RTOL, msg=""):
    """Compare (nested tuples/lists/dicts of) tensors in float64 with the oracle tolerance."""
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected), (
            f"structure differs: {type(actual)} vs {type(expected)}")
        for a, e in zip(actual, expected):
            assert_close64(a, e, atol, rtol, msg)
        return
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys()
        for key in expected:
            assert_close64(actual[key], expected[key], atol, rtol, msg)
        return
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{msg} dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=msg or None)


def assert_equal_exact(actual, expected):
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_equal_exact(a, e)
        return
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.equal(actual, expected), f"max abs diff {(actual - expected).abs().max().item()}"


def assert_differs(a, b, min_diff=1e-6):
    """Guard: the oracle must differ from plain attention, otherwise a no-op rewrite would pass."""
    if isinstance(a, (tuple, list)):
        a, b = a[0], b[0]
    assert (a - b).abs().max().item() > min_diff, "oracle equals plain attention: test has no teeth"


@contextlib.contextmanager
def oracle_mode(model, q_layout, k_layout=None, stride=2, only=None, assignment=None):
    """Make (some of) the model's attention modules compute the oracle. Eager use only.

    ``only``: iterable of module paths (as in model.named_modules()) to switch; default all modules
    that have an ``oracle`` attribute. ``assignment``: a shuffle (query, key) assignment pair.
    """
    k_layout = q_layout if k_layout is None else k_layout
    switched = []
    for name, mod in model.named_modules():
        if hasattr(mod, "oracle") and (only is None or name in set(only)):
            mod.oracle = (q_layout, k_layout, stride) + ((assignment,) if assignment is not None else ())
            switched.append(mod)
    assert switched, "no attention module switched to the oracle"
    try:
        yield model
    finally:
        for mod in switched:
            mod.oracle = None

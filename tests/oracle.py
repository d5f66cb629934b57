"""Independent Grid-Attention oracle (docs/design.md section 1), N-D and window grouping included.

Deliberately does NOT import gridattn_fx: the grid mask is rebuilt here with plain Python loops
from the definition, so a bug in gridattn_fx.grid cannot hide itself by also living in the oracle.

A layout is given as a tuple ``(prefix, height, width[, suffix[, transposed]])``, a tuple
``(prefix, image_shape[, suffix[, order]])`` (N-D, e.g. ``(1, (2, 4, 4))`` for a video), or any
object with ``prefix/image_shape/suffix/order`` or ``prefix/height/width/suffix/transposed``
attributes (e.g. a gridattn_fx.TokenLayout, only read). A grouping is ``"grid"`` (the paper's) or
``"window"`` (contiguous tiles); see :func:`token_groups`.
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
    """A 2-D layout as ``(prefix, height, width, suffix, transposed)`` (kept for older tests)."""
    p, shape, s, order = layout_nd(layout)
    if len(shape) != 2:
        raise ValueError(f"layout_tuple: a {len(shape)}-D layout has no 2-D tuple form")
    return p, shape[0], shape[1], s, order == (1, 0)


def layout_nd(layout) -> tuple[int, tuple[int, ...], int, tuple[int, ...]]:
    """Any layout as ``(prefix, image_shape, suffix, order)``.

    Accepted: a tuple ``(prefix, height, width[, suffix[, transposed]])``; a tuple
    ``(prefix, image_shape[, suffix[, order]])`` whose second entry is a shape (``(T, H, W)``);
    an object with ``prefix/image_shape/suffix/order`` (a TokenLayout) or with
    ``prefix/height/width/suffix/transposed``. ``order`` is the storage order of the logical axes,
    outermost first (identity: row-major, time slowest).
    """
    if isinstance(layout, (tuple, list)):
        t = tuple(layout)
        if len(t) >= 2 and isinstance(t[1], (tuple, list)):
            p, shape = int(t[0]), tuple(int(n) for n in t[1])
            s = int(t[2]) if len(t) > 2 else 0
            order = tuple(t[3]) if len(t) > 3 else tuple(range(len(shape)))
            return p, shape, s, order
        if len(t) == 3:
            t = t + (0,)
        if len(t) == 4:
            t = t + (False,)
        p, h, w, s, tr = t
        return int(p), (int(h), int(w)), int(s), ((1, 0) if tr else (0, 1))
    if hasattr(layout, "image_shape"):
        shape = tuple(int(n) for n in layout.image_shape)
        order = tuple(getattr(layout, "order", None) or range(len(shape)))
        return int(layout.prefix), shape, int(layout.suffix), tuple(int(o) for o in order)
    tr = bool(getattr(layout, "transposed", False))
    return (int(layout.prefix), (int(layout.height), int(layout.width)), int(layout.suffix),
            (1, 0) if tr else (0, 1))


def stride_tuple(stride, rank: int = 2) -> tuple[int, ...]:
    """The stride per image axis of a rank-``rank`` layout (docs/design.md section 1's normalisation): on an image,
    an int G is (G, G), a pair is (Gh, Gw), a triple (Gt, Gh, Gw) applies its (Gh, Gw); on a video,
    G is (1, G, G) (temporal stride 1), a pair (Gh, Gw) is (1, Gh, Gw), a triple is taken as is."""
    if isinstance(stride, int):
        stride = (stride, stride)
    stride = tuple(int(g) for g in stride)
    if rank == 2:
        return stride[-2:]
    if rank == 3:
        return stride if len(stride) == 3 else (1, *stride)
    raise ValueError(f"no stride rule for a rank-{rank} image")


def _unravel(index: int, sizes) -> tuple[int, ...]:
    """Row-major coordinates of ``index`` over ``sizes`` (outermost first)."""
    coords = []
    for n in reversed(sizes):
        index, x = divmod(index, n)
        coords.append(x)
    return tuple(reversed(coords))


def _to_logical(storage: tuple, order) -> tuple[int, ...]:
    """Coordinates in storage-axis order -> in logical-axis order (storage axis i is logical ``order[i]``)."""
    logical = [0] * len(order)
    for i, o in enumerate(order):
        logical[o] = storage[i]
    return tuple(logical)


def _coords(layout):
    """(prefix, suffix, [(logical coords, storage coords) of every image token, in sequence order],
    image shape, order)."""
    p, shape, s, order = layout_nd(layout)
    storage_shape = [shape[o] for o in order]
    tokens = []
    for t in range(math.prod(shape)):
        storage = _unravel(t, storage_shape)
        tokens.append((_to_logical(storage, order), storage))
    return p, s, tokens, shape, order


def token_groups(layout, stride, grouping: str = "grid") -> list:
    """Group of every token along the sequence; None for prefix/suffix (non-image) tokens.

    grid: ``(x_0 % g_0, x_1 % g_1, ...)`` over the logical axes (t, r, c); window (contiguous
    tiles): ``x_i // ceil(n_i / g_i)`` per axis.
    """
    p, s, tokens, shape, _ = _coords(layout)
    return [None] * p + [coord_group(logical, shape, stride, grouping) for logical, _ in tokens] + [None] * s


def coord_group(logical, shape, stride, grouping: str = "grid") -> tuple[int, ...]:
    """The group of the image token at logical coordinates ``logical`` ((r, c) or (t, r, c)) of an
    image of logical ``shape``: grid ``x_i % g_i``, window ``x_i // ceil(n_i / g_i)`` per axis, with
    the stride normalised to the image's rank (:func:`stride_tuple`)."""
    g = stride_tuple(stride, len(shape))
    if grouping == "grid":
        return tuple(x % gi for x, gi in zip(logical, g))
    if grouping == "window":
        return tuple(x // -(-n // gi) for x, n, gi in zip(logical, shape, g))
    raise ValueError(f"unknown grouping {grouping!r}")


def shuffled_token_groups(layout, stride, assignment) -> list:
    """Groups under shuffle distributing, from docs/design.md section 1 and the documented encoding
    of ``gridattn_fx.grid.draw_assignment``: ``assignment[*block, g]`` is the offset, counted in
    storage order, of the token of ``block`` that joins group ``g``. Storage order: the image axes
    in the layout's ``order`` (row-major: as they are; column-major 2-D: columns outermost), blocks
    and offsets enumerated row-major over them, and group ``g``, unravelled over the storage-order
    strides, names the group whose logical offsets are those, put back in logical axis order (2-D
    column-major: ``(g % Gh, g // Gh)``).
    """
    p, s, tokens, shape, order = _coords(layout)
    g = stride_tuple(stride, len(shape))
    g_storage = [g[o] for o in order]
    a_np = np.asarray(assignment)
    groups: list = [None] * p
    for _, storage in tokens:
        block = tuple(x // gi for x, gi in zip(storage, g_storage))
        offset = 0
        for x, gi in zip(storage, g_storage):
            offset = offset * gi + x % gi
        gid = int(np.nonzero(a_np[block] == offset)[0][0])
        groups.append(_to_logical(_unravel(gid, g_storage), order))
    groups += [None] * s
    return groups


def mask_from_groups(gq, gk) -> np.ndarray:
    m = np.zeros((len(gq), len(gk)), dtype=bool)
    for i, a in enumerate(gq):
        for j, b in enumerate(gk):
            m[i, j] = a is None or b is None or a == b
    return m


@functools.lru_cache(maxsize=256)
def _grid_mask_cached(q, k, stride, grouping) -> np.ndarray:
    return mask_from_groups(token_groups(q, stride, grouping), token_groups(k, stride, grouping))


def _key(stride):
    return stride if isinstance(stride, int) else tuple(int(g) for g in stride)


def grid_mask_np(q_layout, k_layout, stride, grouping: str = "grid") -> np.ndarray:
    """M[i, j] = i not image, or j not image, or group(i) == group(j) (each side on its own grid)."""
    return _grid_mask_cached(layout_nd(q_layout), layout_nd(k_layout), _key(stride), grouping).copy()


def log_grid_mask(q_layout, k_layout, stride, dtype=torch.float64, device=None, grouping: str = "grid"):
    m = grid_mask_np(q_layout, k_layout, stride, grouping)
    return torch.from_numpy(np.where(m, 0.0, -np.inf)).to(dtype=dtype, device=device)


def as_additive(attn_mask, dtype) -> torch.Tensor | None:
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(
        ~attn_mask, -math.inf)


def oracle_mask(attn_mask, q_layout, k_layout, stride, dtype, device=None, assignment=None,
                grouping: str | tuple = "grid", heads: int = 0) -> torch.Tensor:
    """B + log M (B converted from bool to 0/-inf first); M for a shuffle ``assignment`` pair if
    given (grid grouping only: shuffle is undefined for window grouping).

    ``grouping`` may be a tuple (per-head groupings): heads split into that many equal contiguous
    sets, set i masked by grouping i; the mask then has a head axis, (heads, Lq, Lk), and
    ``heads`` must be given."""
    if isinstance(grouping, tuple):
        assert heads % len(grouping) == 0, (heads, grouping)
        per_set = heads // len(grouping)
        logm = torch.stack([oracle_mask(None, q_layout, k_layout, stride, dtype, device, assignment, g)
                            for g in grouping for _ in range(per_set)])
        b = as_additive(attn_mask, dtype)
        return logm if b is None else b + logm
    if assignment is None:
        logm = log_grid_mask(q_layout, k_layout, stride, dtype=dtype, device=device, grouping=grouping)
    else:
        assert grouping == "grid", "shuffle distributing is defined for grid grouping only"
        m = mask_from_groups(shuffled_token_groups(q_layout, stride, assignment[0].cpu()),
                             shuffled_token_groups(k_layout, stride, assignment[1].cpu()))
        logm = torch.from_numpy(np.where(m, 0.0, -np.inf)).to(dtype=dtype, device=device)
    b = as_additive(attn_mask, dtype)
    return logm if b is None else b + logm


def oracle_sdpa(q, k, v, attn_mask=None, scale=None, *, q_layout, k_layout, stride, assignment=None,
                grouping: str | tuple = "grid"):
    """The reference semantics: SDPA(Q, K, V, attn_mask = B + log M); per-head groupings (a tuple)
    read the heads from q's axis -3."""
    heads = q.shape[-3] if q.dim() >= 3 else 1
    mask = oracle_mask(attn_mask, q_layout, k_layout, stride, q.dtype, q.device, assignment, grouping, heads)
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
def oracle_mode(model, q_layout, k_layout=None, stride=2, only=None, assignment=None, grouping="grid"):
    """Make (some of) the model's attention modules compute the oracle. Eager use only.

    ``only``: iterable of module paths (as in model.named_modules()) to switch; default all modules
    that have an ``oracle`` attribute. ``assignment``: a shuffle (query, key) assignment pair;
    ``grouping``: "grid" or "window" (read by the modules of tests/models.py that take a 4th entry).
    """
    k_layout = q_layout if k_layout is None else k_layout
    switched = []
    for name, mod in model.named_modules():
        if hasattr(mod, "oracle") and (only is None or name in set(only)):
            extra = (assignment,) if assignment is not None else ()
            if grouping != "grid":
                extra = (assignment, grouping)
            mod.oracle = (q_layout, k_layout, stride) + extra
            switched.append(mod)
    assert switched, "no attention module switched to the oracle"
    try:
        yield model
    finally:
        for mod in switched:
            mod.oracle = None


def pooled_tokens(x, layout, pool: int) -> torch.Tensor:
    """Shared pooled tokens (docs/design.md section 1): the image tokens of ``x`` (..., L, d) averaged
    over windows of ``pool`` rows x ``pool`` columns (every frame of a video on its own). The
    windows' order does not matter to attention; here it is sorted by (frame, row window, column
    window)."""
    p, _, tokens, shape, _ = _coords(layout)
    windows: dict = {}
    for i, (logical, _) in enumerate(tokens):
        key = (*logical[:-2], logical[-2] // pool, logical[-1] // pool)
        windows.setdefault(key, []).append(p + i)
    return torch.stack([x[..., idx, :].mean(-2) for _, idx in sorted(windows.items())], dim=-2)


def oracle_pooled_sdpa(q, k, v, *, q_layout, k_layout, stride, pool: int, grouping="grid"):
    """SDPA over the keys followed by the shared pooled tokens: an image query keeps its group's keys
    (as in :func:`oracle_sdpa`) and every pooled token; a non-image query keeps every original key and
    no pooled token."""
    heads = q.shape[-3] if q.dim() >= 3 else 1
    logm = oracle_mask(None, q_layout, k_layout, stride, q.dtype, q.device, None, grouping, heads)
    kp, vp = pooled_tokens(k, k_layout, pool), pooled_tokens(v, k_layout, pool)
    image_query = torch.tensor([g is not None for g in token_groups(q_layout, stride, "grid")])
    extra = torch.where(image_query, 0.0, -math.inf).to(q.dtype)[:, None].expand(-1, kp.shape[-2])
    extra = extra.expand(*logm.shape[:-1], -1)
    mask = torch.cat([logm, extra], dim=-1)
    return F.scaled_dot_product_attention(q, torch.cat([k, kp], -2), torch.cat([v, vp], -2), attn_mask=mask)

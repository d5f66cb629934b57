"""The grid semantics as plain tensor functions.

Everything here runs eagerly on real tensors *and* is what the rewrite inserts into graphs:
``passes/grid_rewrite.py`` traces :meth:`GridPlan.grouped` / :meth:`GridPlan.masked` with
``torch.fx`` and inlines the result, so the code tested directly is the code that runs compiled.
For that reason every shape decision here depends only on plan constants (layouts, stride, ranks),
never on ``tensor.shape`` read at run time; batch and head sizes flow through ``-1`` and
``size()`` calls, so a batch size that changes (even symbolically) needs no new plan.

Reference semantics (DESIGN.md section 1): a rewritten site computes
``SDPA(q, k, v, attn_mask = B + log M)`` where ``M`` (see :func:`grid_mask`) keeps a query/key pair
iff one of them is not an image token or both fall into the same group ``(r % Gh, c % Gw)``.

Shuffle distributing (training) replaces the fixed offset -> group map by a random permutation per
``Gh x Gw`` block. It is one gather on top of the same regrouping: inside every block, the token
that goes to group ``g`` is the one at offset ``assignment[block, g]`` (see :func:`draw_assignment`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

Stride = tuple[int, int]

__all__ = [
    "TokenLayout",
    "GridPlan",
    "cluster",
    "recover",
    "grid_mask",
    "grouped_attention",
    "masked_attention",
    "normalize_stride",
    "draw_assignment",
    "cluster_axis",
    "recover_axis",
]


@dataclass(frozen=True, init=False)
class TokenLayout:
    """A sequence axis: ``prefix`` non-image tokens, an N-D image, ``suffix`` non-image tokens.

    ``image_shape`` holds the image's logical sizes, slowest axis first: ``(H, W)`` for an image,
    ``(T, H, W)`` for a video. ``order`` says how those axes are laid out in the sequence, outermost
    first: the identity is row-major (time slowest); ``(1, 0)`` is a column-major 2-D image (token
    index ``c * H + r``). A 2-D layout is still built as ``TokenLayout(prefix, height, width, suffix,
    transposed)``; any rank is built with the keywords ``image_shape=`` and ``order=``.
    """

    prefix: int
    image_shape: tuple
    suffix: int
    order: tuple

    def __init__(self, prefix, height=None, width=None, suffix=0, transposed=False, *,
                 image_shape=None, order=None):
        if image_shape is None:
            if height is None or width is None:
                raise TypeError("TokenLayout needs (prefix, height, width) or image_shape=")
            image_shape = (height, width)
            if order is None:
                order = (1, 0) if transposed else (0, 1)
        elif height is not None or width is not None or transposed:
            raise TypeError("TokenLayout takes either (height, width, transposed) or image_shape=/order=, not both")
        image_shape = tuple(image_shape)
        order = tuple(range(len(image_shape))) if order is None else tuple(order)
        if sorted(order) != list(range(len(image_shape))):
            raise ValueError(f"TokenLayout.order must be a permutation of the image axes, got {order!r}")
        object.__setattr__(self, "prefix", prefix)
        object.__setattr__(self, "image_shape", image_shape)
        object.__setattr__(self, "suffix", suffix)
        object.__setattr__(self, "order", order)

    @property
    def rank(self) -> int:
        return len(self.image_shape)

    @property
    def height(self):
        return self.image_shape[-2]

    @property
    def width(self):
        return self.image_shape[-1]

    @property
    def frames(self):
        """Leading (time) size of a video layout; 1 for an image."""
        return self.image_shape[0] if self.rank == 3 else 1

    @property
    def transposed(self) -> bool:
        """Whether the two spatial axes are stored column-major (width outside height)."""
        return self.order.index(self.rank - 1) < self.order.index(self.rank - 2)

    @property
    def image_tokens(self) -> int:
        n = 1
        for size in self.image_shape:
            n = n * size
        return n

    @property
    def length(self) -> int:
        return self.prefix + self.image_tokens + self.suffix

    @property
    def sizes(self) -> tuple:
        """Every size of the layout: prefix, the image sizes, suffix."""
        return (self.prefix, *self.image_shape, self.suffix)

    def map_sizes(self, fn) -> "TokenLayout":
        """The same layout with ``fn`` applied to every size (symbolic sizes -> hints or traced values)."""
        return TokenLayout(fn(self.prefix), image_shape=tuple(fn(s) for s in self.image_shape),
                           suffix=fn(self.suffix), order=self.order)

    def __str__(self) -> str:
        row_major = self.order == tuple(range(self.rank))
        text = "x".join(str(s) for s in self.image_shape)
        if not row_major:
            text += "(col-major)" if self.rank == 2 else f"(order {self.order})"
        if self.prefix:
            text = f"{self.prefix}+{text}"
        if self.suffix:
            text = f"{text}+{self.suffix}"
        return text

    def __repr__(self) -> str:
        return (f"TokenLayout(prefix={self.prefix!r}, image_shape={self.image_shape!r}, "
                f"suffix={self.suffix!r}, order={self.order!r})")


def normalize_stride(stride) -> Stride:
    if isinstance(stride, int) and not isinstance(stride, bool):
        return (stride, stride)
    if (
        isinstance(stride, (tuple, list))
        and len(stride) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) for s in stride)
    ):
        return (int(stride[0]), int(stride[1]))
    raise TypeError(f"stride must be an int or a pair of ints (Gh, Gw), got {stride!r}")


def _storage_grid(layout: TokenLayout, stride: Stride) -> tuple[int, int, int, int]:
    """(rows, cols, row stride, col stride) of the image as it is laid out in memory."""
    gh, gw = stride
    if layout.transposed:
        return layout.width, layout.height, gw, gh
    return layout.height, layout.width, gh, gw


def _ceil_div(n: int, d: int) -> int:
    # Symbolic sizes (passes/grid_rewrite.py): `n % d == 0` is the guard the padding decision takes
    # anyway, and `n // d` / `(n + d - 1) // d` stay expressions the ShapeEnv simplifies.
    return n // d if n % d == 0 else (n + d - 1) // d


def _padded(rows: int, cols: int, sr: int, sc: int) -> bool:
    """Whether the storage grid needs zero-padding to a multiple of the stride."""
    return rows % sr != 0 or cols % sc != 0


def _blocks(rows: int, cols: int, sr: int, sc: int) -> tuple[int, int]:
    """How many stride blocks tile the (padded) storage grid: (block rows, block cols)."""
    return _ceil_div(rows, sr), _ceil_div(cols, sc)


def _split_axis(x, dim: int, sizes: tuple):
    """``x.unflatten(dim, sizes)`` for a negative ``dim``.

    With symbolic sizes (passes/grid_rewrite.py) the split is spelled as a strided view instead: a
    reshape's symbolic shape rule derives every inner size by floor division (``H*H // H``,
    ``H // (H // 2)``), which sympy leaves unsimplified, and those divisions then sit in every index
    of the generated kernels (they made the dynamic-shape rewrite 1.6x slower than the static one).
    Splitting one axis is always a view, so the strides below are exact for any layout of ``x``.
    """
    if all(isinstance(s, int) for s in sizes):
        return x.unflatten(dim, sizes)
    strides, step = [], x.stride(dim)
    for size in reversed(sizes):
        strides.insert(0, step)
        step = step * size
    after = x.shape[dim + 1:] if dim < -1 else ()
    after_strides = x.stride()[dim + 1:] if dim < -1 else ()
    return x.as_strided(x.shape[:dim] + tuple(sizes) + after, x.stride()[:dim] + tuple(strides) + after_strides,
                        x.storage_offset())


def _permute_offsets(x, assignment):
    """(..., a, b, G, d): inside every block (a, b), put the token at offset ``assignment[a, b, g]``
    at position g. One index_select over the flattened blocks, whatever the leading rank."""
    a, b, g = assignment.shape
    flat = (torch.arange(a * b, device=assignment.device).unsqueeze(-1) * g + assignment.flatten(0, 1)).flatten()
    return x.flatten(-4, -2).index_select(-2, flat).unflatten(-2, (a, b, g))


def _cluster_rows_cols(x, rows: int, cols: int, sr: int, sc: int, assignment=None):
    """(..., rows*cols, d) -> (..., sr*sc, n, d), zero-padding rows/cols up to multiples of the stride."""
    a, b = _blocks(rows, cols, sr, sc)
    rows_p, cols_p = a * sr, b * sc
    x = _split_axis(x, -2, (rows, cols))
    if _padded(rows, cols, sr, sc):
        x = F.pad(x, (0, 0, 0, cols_p - cols, 0, rows_p - rows))
    x = _split_axis(_split_axis(x, -3, (a, sr)), -2, (b, sc))
    if assignment is not None:
        # (..., a, sr, b, sc, d) -> (..., a, b, sr*sc, d), shuffle every block's offsets, then the
        # (now permuted) offset axis leads as in the straightforward case.
        x = _permute_offsets(x.movedim(-3, -4).flatten(-3, -2), assignment)
        return x.movedim(-2, -4).flatten(-3, -2)
    # (..., a, sr, b, sc, d) -> (..., sr, sc, a, b, d): the group offsets lead.
    x = x.movedim(-4, -5).movedim(-2, -4)
    return x.flatten(-5, -4).flatten(-3, -2)


def _recover_rows_cols(xg, rows: int, cols: int, sr: int, sc: int, assignment=None):
    a, b = _blocks(rows, cols, sr, sc)
    if assignment is not None:
        # (..., G, a*b, d) -> (..., a, b, G, d), undo the block shuffle, back to (..., a, sr, b, sc, d)
        x = _permute_offsets(xg.unflatten(-2, (a, b)).movedim(-4, -2), assignment.argsort(-1))
        x = x.unflatten(-2, (sr, sc)).movedim(-3, -4)
    else:
        x = _split_axis(_split_axis(xg, -3, (sr, sc)), -2, (a, b))
        x = x.movedim(-4, -2).movedim(-5, -4)
    x = x.flatten(-5, -4).flatten(-3, -2)
    if _padded(rows, cols, sr, sc):
        x = x.narrow(-3, 0, rows).narrow(-2, 0, cols)
    return x.flatten(-3, -2)


def _swap_group_axes(xg, first: int, second: int):
    """Reorder the group axis from (first, second) offsets to (second, first)."""
    return xg.unflatten(-3, (first, second)).transpose(-4, -3).flatten(-4, -3)


def cluster(x, height: int, width: int, stride, transposed: bool = False, assignment=None):
    """Grid Clustering: image tokens ``(..., H*W, d)`` -> groups ``(..., Gh*Gw, n, d)``.

    Group ``g = (r % Gh) * Gw + (c % Gw)``; inside a group tokens keep raster order. Sides that are
    not multiples of the stride are zero-padded (the padded keys must be masked by the caller).
    With an ``assignment`` (shuffle distributing, :func:`draw_assignment`) block ``(a, b)`` sends
    its offset ``assignment[a, b, g]`` to group ``g`` instead.
    """
    layout = TokenLayout(0, height, width, 0, transposed)
    rows, cols, sr, sc = _storage_grid(layout, normalize_stride(stride))
    xg = _cluster_rows_cols(x, rows, cols, sr, sc, assignment)
    # A column-major image clusters with (Gw, Gh) offsets; put the group axis back in (Gh, Gw) order
    # so that groups of two differently stored grids line up.
    return _swap_group_axes(xg, sr, sc) if transposed else xg


def recover(xg, height: int, width: int, stride, transposed: bool = False, assignment=None):
    """Grid Recovering: the exact inverse of :func:`cluster` (padding dropped)."""
    layout = TokenLayout(0, height, width, 0, transposed)
    rows, cols, sr, sc = _storage_grid(layout, normalize_stride(stride))
    if transposed:
        xg = _swap_group_axes(xg, sc, sr)
    return _recover_rows_cols(xg, rows, cols, sr, sc, assignment)


def cluster_axis(x, axis: int, height: int, width: int, stride):
    """Grid Clustering in place along one axis: the ``height*width`` raster tokens of ``axis`` are
    reordered group after group (groups as in :func:`cluster`, raster order inside each), keeping
    the shape. For images whose sides are multiples of the stride; ``axis`` must be non-negative.

    The last op is the flatten that makes the reorder a copy, so the result is laid out in its own
    axis order: a later linear reads it without another copy.
    """
    gh, gw = normalize_stride(stride)
    x = x.unflatten(axis, (height // gh, gh, width // gw, gw))
    x = x.movedim(axis + 1, axis).movedim(axis + 3, axis + 1)  # (a, gh, b, gw) -> (gh, gw, a, b)
    return x.flatten(axis, axis + 3)


def recover_axis(x, axis: int, height: int, width: int, stride):
    """Grid Recovering along one axis: the exact inverse of :func:`cluster_axis`."""
    gh, gw = normalize_stride(stride)
    x = x.unflatten(axis, (gh, gw, height // gh, width // gw))
    x = x.movedim(axis + 2, axis).movedim(axis + 3, axis + 2)  # (gh, gw, a, b) -> (a, gh, b, gw)
    return x.flatten(axis, axis + 3)


def assignment_shape(layout: TokenLayout, stride) -> tuple[int, int, int]:
    """Shape of a shuffle assignment for ``layout``: (block rows, block cols, Gh*Gw), in storage order."""
    rows, cols, sr, sc = _storage_grid(layout, normalize_stride(stride))
    return (*_blocks(rows, cols, sr, sc), sr * sc)


def draw_assignment(layout: TokenLayout, stride, device=None) -> torch.Tensor:
    """Shuffle distributing: an independent uniformly random permutation of offsets per stride block.

    Entry ``[a, b, g]`` is the (storage-order) offset inside block ``(a, b)`` whose token joins group
    ``g``. Drawn from the default generator, so ``torch.manual_seed`` reproduces it.
    """
    return torch.rand(assignment_shape(layout, stride), device=device).argsort(-1)


def _group_ids(layout: TokenLayout, stride: Stride, device, assignment=None) -> torch.Tensor:
    """Group id of every token of the sequence, -1 for prefix/suffix tokens."""
    gh, gw = stride
    idx = torch.arange(layout.image_tokens, device=device)
    if layout.transposed:
        r, c = idx % layout.height, idx // layout.height
    else:
        r, c = idx // layout.width, idx % layout.width
    if assignment is None:
        gid = (r % gh) * gw + (c % gw)
    else:
        # storage coordinates, then the group whose slot holds this token's offset
        _, _, sr, sc = _storage_grid(layout, stride)
        sr_pos, sc_pos = (c, r) if layout.transposed else (r, c)
        offset = (sr_pos % sr) * sc + (sc_pos % sc)
        gid = assignment.to(device).argsort(-1)[sr_pos // sr, sc_pos // sc, offset]
        if layout.transposed:  # cluster() relabels groups to (Gh, Gw) order; name them the same way
            gid = (gid % sc) * sr + gid // sc
    pre = torch.full((layout.prefix,), -1, dtype=gid.dtype, device=device)
    suf = torch.full((layout.suffix,), -1, dtype=gid.dtype, device=device)
    return torch.cat([pre, gid, suf])


def grid_mask(q_layout: TokenLayout, k_layout: TokenLayout, stride, device=None, assignment=None) -> torch.Tensor:
    """The grid mask ``M`` (bool, ``(Lq, Lk)``): True where attention is kept.

    ``assignment``: the (query, key) pair of shuffle assignments (:func:`draw_assignment`), or None
    for straightforward distributing.
    """
    stride = normalize_stride(stride)
    qa, ka = assignment if assignment is not None else (None, None)
    gq = _group_ids(q_layout, stride, device, qa)
    gk = _group_ids(k_layout, stride, device, ka)
    return (gq[:, None] == gk[None, :]) | (gq < 0)[:, None] | (gk < 0)[None, :]


def _additive(mask, is_bool: bool, dtype):
    """A boolean mask (True = keep) as the additive 0 / -inf bias SDPA would apply."""
    if is_bool:
        return torch.where(mask, 0.0, float("-inf")).to(dtype)
    return mask


@dataclass(frozen=True)
class GridPlan:
    """Everything static about one rewritten site: layouts, stride, ranks and SDPA flags.

    ``ndim`` is the rank of q; ``mask_ndim`` the rank of the attn_mask (None: no mask);
    ``mask_rows`` / ``mask_cols`` say whether the mask spans the query / key axis or broadcasts (size 1);
    ``mask_bool`` whether it is a boolean keep-mask rather than an additive bias.
    """

    q_layout: TokenLayout
    k_layout: TokenLayout
    stride: Stride
    ndim: int
    mask_ndim: int | None = None
    mask_rows: bool = True
    mask_cols: bool = True
    mask_bool: bool = False
    dropout_p: float = 0.0
    scale: float | None = None
    enable_gqa: bool = False
    # A decomposed relative-position bias (SAM): the mask argument is the pair (rel_h, rel_w) of
    # shapes (N, qh, qw, kh) and (N, qh, qw, kw), meaning bias[n, (i, j), (k, l)] = rel_h[n, i, j, k]
    # + rel_w[n, i, j, l]; ``relpos_heads`` > 0 splits N into (batch, heads) for a 4-D mask.
    relpos: bool = False
    relpos_heads: int = 0
    # Shuffle distributing: every call draws a fresh assignment (training only; the pass decides).
    shuffle: bool = False
    # q, k, v arrive with their image tokens already in group-major order (:func:`cluster_axis`,
    # moved above the projections by passes/regroup_motion.py) and the output leaves in that order.
    pregrouped: bool = False

    def __post_init__(self):
        why = self.shuffle_unsupported if self.shuffle else None
        if why:
            raise ValueError(why)
        why = self.pregrouped_unsupported if self.pregrouped else None
        if why:
            raise ValueError(why)

    @property
    def groups(self) -> int:
        return self.stride[0] * self.stride[1]

    @property
    def shares_grid(self) -> bool | None:
        """Whether q and k tokens sit on one image grid (then they share one shuffle assignment);
        None when they do but are stored in different orders (shuffle is not supported there)."""
        ql, kl = self.q_layout, self.k_layout
        if (ql.height, ql.width) != (kl.height, kl.width):
            return False
        return True if ql.transposed == kl.transposed else None

    @property
    def shuffle_unsupported(self) -> str | None:
        """Why this site cannot use shuffle distributing, or None if it can."""
        if self.relpos:
            return "shuffle is not implemented for a decomposed rel-pos bias"
        if self.shares_grid is None:
            return "shuffle is not implemented for query and key grids not stored in the same order"
        return None

    @property
    def pregrouped_unsupported(self) -> str | None:
        """Why this site's regrouping cannot be a plain token reorder outside it, or None if it can."""
        has = [what for what, flag in (("a mask", self.mask_ndim is not None), ("a rel-pos bias", self.relpos),
                                        ("dropout", self.dropout_p), ("shuffle distributing", self.shuffle)) if flag]
        if has:
            return f"the site has {' and '.join(has)}"
        if self.ndim != 4:
            return f"q has rank {self.ndim}, not (batch, heads, tokens, features)"
        gh, gw = self.stride
        for layout in (self.q_layout, self.k_layout):
            if layout.prefix or layout.suffix:
                return f"layout {layout} has non-image tokens, which every group shares"
            if layout.transposed:
                return f"layout {layout} is stored column-major"
            if layout.height % gh or layout.width % gw:
                return f"image {layout.height}x{layout.width} is not a multiple of the stride {gh}x{gw}"
        return None

    def draw(self, device=None):
        """A fresh (query, key) pair of shuffle assignments for this site."""
        qa = draw_assignment(self.q_layout, self.stride, device)
        return qa, (qa if self.shares_grid else draw_assignment(self.k_layout, self.stride, device))

    def _assignments(self, assignment, device):
        if not self.shuffle:
            if assignment is not None:
                raise ValueError("an assignment was given to a plan without shuffle distributing")
            return None, None
        return self.draw(device) if assignment is None else assignment

    @staticmethod
    def for_tensors(q, k, attn_mask, q_layout, k_layout, stride, dropout_p=0.0, scale=None, enable_gqa=False):
        """The plan for concrete tensors (eager use)."""
        if q.shape[-2] != q_layout.length or k.shape[-2] != k_layout.length:
            raise ValueError(
                f"layouts {q_layout} / {k_layout} do not match sequence lengths {q.shape[-2]} / {k.shape[-2]}"
            )
        m = attn_mask
        return GridPlan(
            q_layout, k_layout, normalize_stride(stride), q.dim(),
            None if m is None else m.dim(),
            True if m is None else (m.dim() >= 2 and m.shape[-2] != 1),
            True if m is None else m.shape[-1] != 1,
            m is not None and m.dtype == torch.bool,
            float(dropout_p), scale, bool(enable_gqa),
        )

    # -- pieces -------------------------------------------------------------------------------
    def _sdpa(self, q, k, v, mask):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p, scale=self.scale, enable_gqa=self.enable_gqa
        )

    @staticmethod
    def _parts(x, layout: TokenLayout, axis: int = -2):
        """(prefix, image, suffix) slices along ``axis``; None for empty parts."""
        n = layout.image_tokens
        pre = x.narrow(axis, 0, layout.prefix) if layout.prefix else None
        img = x.narrow(axis, layout.prefix, n)
        suf = x.narrow(axis, layout.prefix + n, layout.suffix) if layout.suffix else None
        return pre, img, suf

    def _cluster(self, x, layout: TokenLayout, assignment=None):
        return cluster(x, layout.height, layout.width, self.stride, layout.transposed, assignment)

    def _shared_keys(self, x, pre, suf):
        """Prepend / append the non-image keys to every group: (..., G, n, d) -> (..., G, P+n+S, d)."""
        if pre is None and suf is None:
            return x
        keep = [-1] * (self.ndim - 2)
        pieces = []
        if pre is not None:
            pieces.append(pre.unsqueeze(-3).expand(*keep, self.groups, -1, -1))
        pieces.append(x)
        if suf is not None:
            pieces.append(suf.unsqueeze(-3).expand(*keep, self.groups, -1, -1))
        return torch.cat(pieces, dim=-2)

    def _key_padding_bias(self, dtype, device, assignment=None):
        """Additive (G, 1, Lk_group) bias hiding the zero keys that padding added; None if none."""
        kl = self.k_layout
        if not _padded(*_storage_grid(kl, self.stride)):
            return None
        ones = torch.ones((kl.image_tokens, 1), dtype=dtype, device=device)  # a size tuple traces symbolically
        valid = self._cluster(ones, kl, assignment).transpose(-1, -2)  # (G, 1, n): 1 real, 0 padding
        bias = torch.zeros_like(valid).masked_fill(valid == 0, float("-inf"))
        return self._shared_keys_bias(bias, kl.prefix, kl.suffix, dtype, device)

    def _shared_keys_bias(self, bias, prefix, suffix, dtype, device):
        pieces = []
        if prefix:
            pieces.append(torch.zeros((self.groups, 1, prefix), dtype=dtype, device=device))
        pieces.append(bias)
        if suffix:
            pieces.append(torch.zeros((self.groups, 1, suffix), dtype=dtype, device=device))
        return torch.cat(pieces, dim=-1) if len(pieces) > 1 else bias

    def _grouped_user_mask(self, mask, rows, qa=None, ka=None):
        """User mask rows of the image queries -> (..., G, nq, Lk_group), restricted to each group's keys.

        ``rows`` is the image-query part of the mask, (..., nq_total, Lk) or (..., 1, Lk);
        ``qa`` / ``ka`` the shuffle assignments of the query / key grid, if any.
        """
        rows = self._cluster(rows, self.q_layout, qa) if self.mask_rows else rows.unsqueeze(-3)
        if not self.mask_cols:  # (..., G or 1, nq, 1): broadcasts over keys as it is
            return rows
        pre, img, suf = self._parts(rows, self.k_layout, axis=-1)
        # Cluster the key axis too, then keep only the diagonal: group g's queries see group g's keys.
        img = self._cluster(img.transpose(-1, -2), self.k_layout, ka)  # (..., Gq, G, nk, nq)
        if self.mask_rows:
            img = torch.diagonal(img, dim1=-4, dim2=-3).movedim(-1, -3)  # (..., G, nk, nq)
        else:
            img = img.squeeze(-4)
        img = img.transpose(-1, -2)
        keep = [-1] * (self.mask_ndim - 2)
        pieces = []
        if pre is not None:
            pieces.append(pre.expand(*keep, self.groups, -1, -1))
        pieces.append(img)
        if suf is not None:
            pieces.append(suf.expand(*keep, self.groups, -1, -1))
        return torch.cat(pieces, dim=-1) if len(pieces) > 1 else img

    # -- the two implementations ----------------------------------------------------------------
    def grouped(self, q, k, v, attn_mask=None, assignment=None):
        """Grid attention by regrouping: attention runs inside each of the G groups.

        With shuffle distributing, ``assignment`` is the (query, key) pair of assignments to use;
        None draws a fresh one (what the rewritten graph does on every call).
        """
        if self.pregrouped:
            return self._attend_pregrouped(q, k, v)
        ql, kl = self.q_layout, self.k_layout
        qa, ka = self._assignments(assignment, q.device)
        q_pre, q_img, q_suf = self._parts(q, ql)
        k_pre, k_img, k_suf = self._parts(k, kl)
        v_pre, v_img, v_suf = self._parts(v, kl)
        qg = self._cluster(q_img, ql, qa)
        kg = self._shared_keys(self._cluster(k_img, kl, ka), k_pre, k_suf)
        vg = self._shared_keys(self._cluster(v_img, kl, ka), v_pre, v_suf)

        if self.relpos:
            return self._grouped_relpos_attention(qg, kg, vg, attn_mask)
        mask = None if attn_mask is None else _additive(attn_mask, self.mask_bool, q.dtype)
        if mask is not None and self.mask_ndim < self.ndim:
            mask = mask[(None,) * (self.ndim - self.mask_ndim)]
        mask_ndim = self.ndim if mask is not None else None
        plan = self if mask_ndim == self.mask_ndim else replace(self, mask_ndim=mask_ndim)

        # Ranks are tracked here, not read from tensors: this code is also traced symbolically.
        group_mask, mask_rank = None, 0
        if mask is not None:
            m_pre, m_img, m_suf = plan._parts(mask, ql) if plan.mask_rows else (mask, mask, mask)
            group_mask, mask_rank = plan._grouped_user_mask(mask, m_img, qa, ka), self.ndim + 1
        pad = plan._key_padding_bias(q.dtype, q.device, ka)  # (G, 1, Lk_group)
        if pad is not None:
            group_mask = pad if group_mask is None else group_mask + pad
            mask_rank = max(mask_rank, 3)

        out_img = self._attend_groups(qg, kg, vg, group_mask, mask_rank, qa)

        if not (ql.prefix or ql.suffix):
            return out_img
        # Non-image queries attend to every key, as in the original site.
        q_rest = torch.cat([p for p in (q_pre, q_suf) if p is not None], dim=-2)
        rest_mask = None
        if mask is not None:
            if plan.mask_rows:
                rest_mask = torch.cat([p for p in (m_pre, m_suf) if p is not None], dim=-2)
            else:
                rest_mask = mask
        out_rest = self._sdpa(q_rest, k, v, rest_mask)
        pieces = []
        if ql.prefix:
            pieces.append(out_rest.narrow(-2, 0, ql.prefix))
        pieces.append(out_img)
        if ql.suffix:
            pieces.append(out_rest.narrow(-2, ql.prefix, ql.suffix))
        return torch.cat(pieces, dim=-2)

    def _attend_groups(self, qg, kg, vg, group_mask, mask_rank: int, qa=None):
        """SDPA inside every group, then Grid Recovering of the image queries' outputs.

        ``qg`` / ``kg`` / ``vg`` are (..., heads, G, n, d); their batch and head axes may differ as
        SDPA allows: broadcast (MQA written as k/v with one head) or, with ``enable_gqa``, fewer
        key/value heads than query heads. Either way every query head meets the key/value head the
        original site paired it with.
        """
        if self.enable_gqa and self.ndim >= 3:
            out = self._attend_groups_gqa(qg, kg, vg, group_mask, mask_rank)
        elif self.ndim >= 4:
            # Fold the group axis into the head axis so SDPA sees 4-D inputs (its fast CPU/GPU kernels).
            # Folding merges heads with groups, so broadcast batch/head axes are expanded first (a view
            # with nothing to expand where q, k and v agree already, the usual case).
            qg, kg, vg = self._broadcast_lead(qg, kg, vg)
            if group_mask is not None:
                if mask_rank < self.ndim + 1:
                    group_mask = group_mask[(None,) * (self.ndim + 1 - mask_rank)]
                heads = qg.size(-4)
                group_mask = group_mask.expand(
                    *([-1] * (self.ndim - 3)), heads, self.groups, -1, -1
                ).flatten(-4, -3)
            out = self._sdpa(qg.flatten(-4, -3), kg.flatten(-4, -3), vg.flatten(-4, -3), group_mask)
            out = out.unflatten(-3, (-1, self.groups))
        else:
            out = self._sdpa(qg, kg, vg, group_mask)
        ql = self.q_layout
        return recover(out, ql.height, ql.width, self.stride, ql.transposed, qa)

    def _broadcast_lead(self, qg, kg, vg):
        """q, k, v (..., G, n, d) with their leading (batch, head) axes expanded to the common
        broadcast sizes, exactly as SDPA broadcasts them (sizes read at run time, as batch sizes are)."""
        corner = [x.narrow(-1, 0, 1).narrow(-2, 0, 1) for x in (qg, kg, vg)]
        lead = torch.broadcast_tensors(*corner)[0]
        sizes = [lead.size(i) for i in range(self.ndim - 2)]
        return [x.expand(*sizes, -1, -1, -1) for x in (qg, kg, vg)]

    def _attend_groups_gqa(self, qg, kg, vg, group_mask, mask_rank: int):
        """SDPA with ``enable_gqa`` inside every group: (..., H, G, n, d) in, (..., Hq, G, n, dv) out.

        SDPA pairs query head ``h`` with key/value head ``h // (Hq / Hkv)`` along axis -3. Folding
        the groups *behind* the heads (index ``h * G + g``) would break that pairing; folded *in
        front* (index ``g * H + h``) it holds: ``(g * Hq + h) // (Hq / Hkv) == g * Hkv + h // (Hq / Hkv)``.
        A 3-D site (heads, tokens, d) keeps the group axis as a batch axis in front of the heads.
        """
        fold_heads = self.ndim >= 4

        def fold(x):  # (..., H, G, n, d) -> (..., G*H, n, d), or (G, H, n, d) for a 3-D site
            x = x.movedim(-3, -4)
            return x.flatten(-4, -3) if fold_heads else x

        if group_mask is not None:
            if mask_rank < self.ndim + 1:
                group_mask = group_mask[(None,) * (self.ndim + 1 - mask_rank)]
            if fold_heads:  # the mask's head axis is the query heads' (SDPA broadcasts it to Hq)
                group_mask = group_mask.expand(*([-1] * (self.ndim - 3)), qg.size(-4), self.groups, -1, -1)
            group_mask = fold(group_mask)
        out = self._sdpa(fold(qg), fold(kg), fold(vg), group_mask)
        if fold_heads:
            out = out.unflatten(-3, (self.groups, -1))
        return out.movedim(-4, -3)

    def _attend_pregrouped(self, q, k, v):
        """SDPA inside every group of group-major (B, h, G*n, d) inputs; the output stays group-major.

        The group axis folds into the batch: when q/k/v are the usual transposed views of
        (B, L, h, d) projection outputs, every step here is a view, and so is the way back."""
        g = self.groups

        def fold(x):  # (B, h, G*n, d) -> (B*G, h, n, d)
            return x.unflatten(-2, (g, -1)).movedim(-3, -4).flatten(0, 1)

        out = self._sdpa(fold(q), fold(k), fold(v), None)
        return out.unflatten(0, (-1, g)).movedim(1, 2).flatten(2, 3)

    # -- decomposed relative-position bias ------------------------------------------------------
    def _own_offsets(self, x, size: int, first: bool):
        """Keep, for every group, only the key rows (``first``) or columns its own offset owns.

        ``x`` is (..., G, nq, size) indexed by a key row/column; returns (..., G, nq, ceil(size/g)).
        """
        gh, gw = self.stride
        step = gh if first else gw
        padded = -(-size // step) * step
        if padded != size:
            x = F.pad(x, (0, padded - size))
        x = x.unflatten(-1, (padded // step, step)).unflatten(-4, (gh, gw))  # (..., gh, gw, nq, n, step)
        x = torch.diagonal(x, dim1=-5 if first else -4, dim2=-1)
        # the matched offset axis went last; put it back in front of the group's other offset
        x = x.movedim(-1, -4) if first else x.movedim(-1, -3)  # (..., gh, gw, nq, n)
        return x.flatten(-4, -3)

    def _relpos_lead(self, bias):
        return bias.unflatten(0, (-1, self.relpos_heads)) if self.relpos_heads else bias

    def grouped_relpos_bias(self, rel_h, rel_w):
        """The decomposed bias restricted to each group: (N, G, nq, nk) without ever forming L x L."""
        ql, kl = self.q_layout, self.k_layout
        rh = self._cluster(rel_h.flatten(-3, -2), ql)  # (N, G, nq, kh)
        rw = self._cluster(rel_w.flatten(-3, -2), ql)  # (N, G, nq, kw)
        rh = self._own_offsets(rh, kl.height, first=True)
        rw = self._own_offsets(rw, kl.width, first=False)
        return self._relpos_lead((rh.unsqueeze(-1) + rw.unsqueeze(-2)).flatten(-2, -1))

    def dense_relpos_bias(self, rel_h, rel_w):
        bias = (rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).flatten(-4, -3).flatten(-2, -1)
        return self._relpos_lead(bias)

    def _grouped_relpos_attention(self, qg, kg, vg, rel):
        group_mask = self.grouped_relpos_bias(*rel)
        pad = self._key_padding_bias(qg.dtype, qg.device)
        if pad is not None:
            group_mask = group_mask + pad
        return self._attend_groups(qg, kg, vg, group_mask, self.mask_ndim + 1)

    def masked(self, q, k, v, attn_mask=None, assignment=None):
        """The oracle form: dense SDPA with ``attn_mask = B + log M`` (M for ``assignment`` when shuffling)."""
        if self.pregrouped:
            raise ValueError("a pregrouped plan has only the grouped implementation")
        assignment = self._assignments(assignment, q.device)
        keep = grid_mask(self.q_layout, self.k_layout, self.stride, q.device,
                         None if assignment[0] is None else assignment)
        log_m = torch.where(keep, 0.0, float("-inf")).to(q.dtype)
        if self.relpos:
            attn_mask = self.dense_relpos_bias(*attn_mask)
        mask = log_m if attn_mask is None else _additive(attn_mask, self.mask_bool, q.dtype) + log_m
        return self._sdpa(q, k, v, mask)

    # -- cost -----------------------------------------------------------------------------------
    def grouped_pairs(self) -> int:
        """Query/key pairs the grouped form scores per (batch, head)."""
        ql, kl = self.q_layout, self.k_layout
        rq, cq, sr, sc = _storage_grid(ql, self.stride)
        rk, ck, _, _ = _storage_grid(kl, self.stride)
        nq = -(-rq // sr) * -(-cq // sc)
        nk = -(-rk // sr) * -(-ck // sc)
        return self.groups * nq * (kl.prefix + nk + kl.suffix) + (ql.prefix + ql.suffix) * kl.length


def grouped_attention(q, k, v, attn_mask=None, dropout_p=0.0, scale=None, q_layout=None, k_layout=None,
                      stride=2, enable_gqa=False, assignment=None):
    """Eager grid attention, regrouped form (exactly :func:`masked_attention`, G times cheaper).

    ``assignment``: a (query, key) pair of shuffle assignments (:meth:`GridPlan.draw`); None for
    straightforward distributing.
    """
    plan = GridPlan.for_tensors(q, k, attn_mask, q_layout, k_layout, stride, dropout_p, scale, enable_gqa)
    if assignment is not None:
        plan = replace(plan, shuffle=True)
    return plan.grouped(q, k, v, attn_mask, assignment)


def masked_attention(q, k, v, attn_mask=None, dropout_p=0.0, scale=None, q_layout=None, k_layout=None,
                     stride=2, enable_gqa=False, assignment=None):
    """Eager grid attention, dense masked form: ``SDPA(q, k, v, attn_mask = B + log M)``."""
    plan = GridPlan.for_tensors(q, k, attn_mask, q_layout, k_layout, stride, dropout_p, scale, enable_gqa)
    if assignment is not None:
        plan = replace(plan, shuffle=True)
    return plan.masked(q, k, v, attn_mask, assignment)


def attention_flops(batch_heads: int, lq: int, lk: int, d: int, dv: int) -> int:
    """FLOPs of ``softmax(QK^T)V`` (2 per multiply-add, both products)."""
    return 2 * batch_heads * lq * lk * (d + dv)


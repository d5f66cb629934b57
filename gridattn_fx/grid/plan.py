"""The plan of one rewritten site and the two implementations it runs (grouped / masked)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .attention import attend_groups, attend_pregrouped, sdpa
from .groupings import GRID, Grouping, cluster_layout, draw_assignment, group_ids, grouping_named, layout_padded
from .layout import Stride, TokenLayout, format_stride, has_data_dependent_parts, normalize_stride, present
from .reference import _additive, grid_mask
from .relpos import dense_relpos_bias, grouped_relpos_attention


@dataclass(frozen=True)
class MaskSpec:
    """The site's attn_mask (or, with a rel-pos bias, the bias pair it is passed as): its rank,
    whether it spans the query / key axis or broadcasts there (size 1), and whether it is a
    boolean keep-mask rather than an additive bias."""

    ndim: int
    rows: bool = True
    cols: bool = True
    boolean: bool = False


@dataclass(frozen=True)
class RelPosSpec:
    """A decomposed relative-position bias (SAM): the mask argument is the pair (rel_h, rel_w) of
    shapes (N, qh, qw, kh) and (N, qh, qw, kw), meaning bias[n, (i, j), (k, l)] = rel_h[n, i, j, k]
    + rel_w[n, i, j, l]; ``heads`` > 0 splits N into (batch, heads) for a 4-D mask
    (gridattn_fx/grid/relpos.py)."""

    heads: int = 0


@dataclass(frozen=True, kw_only=True)
class GridPlan:
    """Everything static about one rewritten site: layouts, stride, grouping, ranks and SDPA flags.

    ``stride`` is normalised to the layouts' rank (:func:`normalize_stride`): ``(Gh, Gw)`` for an
    image, ``(Gt, Gh, Gw)`` for a video; ``grouping`` says which tokens share a group (grid by
    default; gridattn_fx/grid/groupings.py).

    ``ndim`` is the rank of q; ``mask`` describes the attn_mask (None: no mask), ``relpos`` a
    decomposed relative-position bias. Built keyword-only from these small specs; how it runs is
    in gridattn_fx/grid/attention.py and gridattn_fx/grid/relpos.py.
    """

    q_layout: TokenLayout
    k_layout: TokenLayout
    stride: Stride
    ndim: int
    mask: MaskSpec | None = None
    relpos: RelPosSpec | None = None
    dropout_p: float = 0.0
    scale: float | None = None
    enable_gqa: bool = False
    # Shuffle distributing: every call draws a fresh assignment (training only; the pass decides).
    shuffle: bool = False
    # q, k, v arrive with their image tokens already in group-major order (:func:`cluster_axis`,
    # moved above the projections by passes/motion.py) and the output leaves in that order.
    pregrouped: bool = False
    grouping: Grouping = GRID
    # Per-head groupings: the heads (axis -3 of a rank-4 site) split into len(...) equal contiguous
    # sets, set i grouped by head_groupings[i] (docs/design.md section 1). Empty: every head uses
    # ``grouping``. ``kv_heads_shared``: k/v have one head that every query head reads (broadcast),
    # so they are regrouped whole for every set instead of being split with the query heads.
    head_groupings: tuple = ()
    kv_heads_shared: bool = False
    # Shared pooled tokens: every image query also attends to the key image's k and v averaged over
    # windows of this many tokens along each spatial axis (rows and columns; frames are not pooled),
    # in the same softmax as its own group's keys (docs/design.md section 1). 0: none.
    shared_pool: int = 0

    def __post_init__(self):
        if self.q_layout.rank != self.k_layout.rank:
            raise ValueError(f"query and key images differ in rank: {self.q_layout} / {self.k_layout}")
        object.__setattr__(self, "stride", normalize_stride(self.stride, self.q_layout.rank))
        object.__setattr__(self, "head_groupings", tuple(grouping_named(g) for g in self.head_groupings))
        if len(set(self.head_groupings)) == 1:  # one grouping for every head set is that grouping
            object.__setattr__(self, "grouping", self.head_groupings[0])
            object.__setattr__(self, "head_groupings", ())
        object.__setattr__(self, "grouping", grouping_named(self.grouping))
        if self.head_groupings and (self.ndim != 4 or self.relpos):
            raise ValueError("per-head groupings need a (batch, heads, tokens, features) site without a rel-pos bias")
        why = self.shared_pool_unsupported if self.shared_pool else None
        if why:
            raise ValueError(why)
        why = self.shuffle_unsupported if self.shuffle else None
        if why:
            raise ValueError(why)
        why = self.pregrouped_unsupported if self.pregrouped else None
        if why:
            raise ValueError(why)

    @property
    def groups(self) -> int:
        return math.prod(self.stride)

    @property
    def groupings(self) -> tuple:
        """The groupings of the head sets, in head order (one entry when every head shares one)."""
        return self.head_groupings or (self.grouping,)

    @property
    def grouping_name(self) -> str:
        """``grid``, ``window``, or per-head sets joined by ``|`` (``grid|window``: the first half of
        the heads on the grid, the second half in windows)."""
        return "|".join(g.name for g in self.groupings)

    @property
    def shares_grid(self) -> bool | None:
        """Whether q and k tokens sit on one image grid (then they share one shuffle assignment);
        None when they do but are stored in different orders (shuffle is not supported there)."""
        ql, kl = self.q_layout, self.k_layout
        if ql.image_shape != kl.image_shape:
            return False
        return True if ql.order == kl.order else None

    @property
    def shuffle_unsupported(self) -> str | None:
        """Why this site cannot use shuffle distributing, or None if it can."""
        for grouping in self.groupings:
            if grouping.shuffle_unsupported:
                return grouping.shuffle_unsupported
        if self.relpos:
            return "shuffle is not implemented for a decomposed rel-pos bias"
        if self.shares_grid is None:
            return "shuffle is not implemented for query and key grids not stored in the same order"
        return None

    @property
    def shared_pool_unsupported(self) -> str | None:
        """Why this site cannot take its shared pooled tokens, or None if it can."""
        return unsupported_shared_pool(self, self.shared_pool)

    def shared_tokens(self) -> int:
        """How many pooled tokens every group shares (0 without)."""
        if not self.shared_pool:
            return 0
        return math.prod(self.k_layout.image_shape) // self.shared_pool ** 2

    def _pooled(self, x_img):
        """(..., N, d) key-image tokens -> (..., N / p^2, d): averaged over p x p windows of rows
        and columns (each frame of a video on its own), in storage order."""
        layout, p = self.k_layout, self.shared_pool
        order = layout.order
        sizes = [layout.image_shape[o] for o in order]
        x = x_img.unflatten(-2, tuple(sizes))
        k = len(sizes)
        for logical in (layout.rank - 2, layout.rank - 1):   # rows and columns
            axis = -(k + 1) + order.index(logical)
            x = x.unflatten(axis, (sizes[order.index(logical)] // p, p)).mean(axis)
        return x.flatten(-(k + 1), -2)

    @property
    def pregrouped_unsupported(self) -> str | None:
        """Why this site's regrouping cannot be a plain token reorder outside it, or None if it can."""
        has = [what for what, flag in (("a mask", self.mask is not None), ("a rel-pos bias", self.relpos),
                                        ("per-head groupings", self.head_groupings),
                                        ("shared pooled tokens", self.shared_pool),
                                        ("dropout", self.dropout_p), ("shuffle distributing", self.shuffle)) if flag]
        if has:
            return f"the site has {' and '.join(has)}"
        if self.ndim != 4:
            return f"q has rank {self.ndim}, not (batch, heads, tokens, features)"
        for layout in (self.q_layout, self.k_layout):
            if present(layout.prefix) or present(layout.suffix):
                return f"layout {layout} has non-image tokens, which every group shares"
            if layout.order != tuple(range(layout.rank)):
                return f"layout {layout} is stored " + ("column-major" if layout.rank == 2 else "out of order")
            if layout_padded(layout, self.stride):
                return (f"image {format_stride(layout.image_shape)} is not a multiple of the stride "
                        f"{format_stride(self.stride)}")
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
    def for_tensors(q, k, attn_mask, q_layout, k_layout, stride, dropout_p=0.0, scale=None, enable_gqa=False,
                    grouping="grid", shared_pool=0):
        """The plan for concrete tensors (eager use)."""
        if q.shape[-2] != q_layout.length or k.shape[-2] != k_layout.length:
            raise ValueError(
                f"layouts {q_layout} / {k_layout} do not match sequence lengths {q.shape[-2]} / {k.shape[-2]}"
            )
        m = attn_mask
        mask = None if m is None else MaskSpec(ndim=m.dim(), rows=m.dim() >= 2 and m.shape[-2] != 1,
                                               cols=m.shape[-1] != 1, boolean=m.dtype == torch.bool)
        per_head = isinstance(grouping, (tuple, list))
        return GridPlan(q_layout=q_layout, k_layout=k_layout, stride=normalize_stride(stride), ndim=q.dim(),
                        mask=mask, dropout_p=float(dropout_p), scale=scale, enable_gqa=bool(enable_gqa),
                        grouping=GRID if per_head else grouping_named(grouping),
                        head_groupings=tuple(grouping) if per_head else (),
                        kv_heads_shared=per_head and kv_heads_shared(q.shape, k.shape, bool(enable_gqa)),
                        shared_pool=shared_pool)

    # -- pieces -------------------------------------------------------------------------------
    def _sdpa(self, q, k, v, mask):
        return sdpa(self, q, k, v, mask)

    @staticmethod
    def _parts(x, layout: TokenLayout, axis: int = -2):
        """(prefix, image, suffix) slices along ``axis``; None for empty parts."""
        n = layout.image_tokens
        pre = x.narrow(axis, 0, layout.prefix) if present(layout.prefix) else None
        img = x.narrow(axis, layout.prefix, n)
        if has_data_dependent_parts(layout):
            # Its strides then hold the data-dependent length, and whether the regrouping's
            # reshapes can be views depends on it (a guard that cannot be installed): a copy in
            # the standard layout answers that statically.
            img = img.clone(memory_format=torch.contiguous_format)
        suf = x.narrow(axis, layout.prefix + n, layout.suffix) if present(layout.suffix) else None
        return pre, img, suf

    def _cluster(self, x, layout: TokenLayout, assignment=None):
        return cluster_layout(x, layout, self.stride, self.grouping, assignment)

    def _per_group(self, x, rank: int):
        """(..., 1, m, n) of rank ``rank + 1`` -> (..., G, m, n): the same tokens for every group (a view)."""
        return None if x is None else x.expand(*([-1] * (rank - 2)), self.groups, -1, -1)

    def _shared_keys(self, x, pre, suf):
        """Prepend / append the non-image keys to every group: (..., G, n, d) -> (..., G, P+n+S, d)."""
        shared = [None if p is None else self._per_group(p.unsqueeze(-3), self.ndim) for p in (pre, suf)]
        return _join(shared[0], x, shared[1], -2)

    def _key_padding_bias(self, dtype, device, assignment=None):
        """Additive (G, 1, Lk_group) bias hiding the zero keys that padding added; None if none."""
        kl = self.k_layout
        if not layout_padded(kl, self.stride):
            return None
        ones = torch.ones((kl.image_tokens, 1), dtype=dtype, device=device)  # a size tuple traces symbolically
        valid = self._cluster(ones, kl, assignment).transpose(-1, -2)  # (G, 1, n): 1 real, 0 padding
        bias = torch.zeros_like(valid).masked_fill(valid == 0, float("-inf"))
        return self._shared_keys_bias(bias, kl.prefix, kl.suffix, dtype, device)

    def _shared_keys_bias(self, bias, prefix, suffix, dtype, device):
        zeros = [torch.zeros((self.groups, 1, n), dtype=dtype, device=device) if present(n) else None
                 for n in (prefix, suffix)]
        return _join(zeros[0], bias, zeros[1], -1)

    def _grouped_user_mask(self, mask, rows, qa=None, ka=None):
        """User mask rows of the image queries -> (..., G, nq, Lk_group), restricted to each group's keys.

        ``rows`` is the image-query part of the mask, (..., nq_total, Lk) or (..., 1, Lk);
        ``qa`` / ``ka`` the shuffle assignments of the query / key grid, if any.
        """
        rows = self._cluster(rows, self.q_layout, qa) if self.mask.rows else rows.unsqueeze(-3)
        if not self.mask.cols:  # (..., G or 1, nq, 1): broadcasts over keys as it is
            return rows
        pre, img, suf = self._parts(rows, self.k_layout, axis=-1)
        # Cluster the key axis too, then keep only the diagonal: group g's queries see group g's keys.
        img = self._cluster(img.transpose(-1, -2), self.k_layout, ka)  # (..., Gq, G, nk, nq)
        if self.mask.rows:
            img = torch.diagonal(img, dim1=-4, dim2=-3).movedim(-1, -3)  # (..., G, nk, nq)
        else:
            img = img.squeeze(-4)
        rank = self.mask.ndim
        return _join(self._per_group(pre, rank), img.transpose(-1, -2), self._per_group(suf, rank), -1)

    # -- the two implementations ----------------------------------------------------------------
    def grouped(self, q, k, v, attn_mask=None, assignment=None):
        """Grid attention by regrouping: attention runs inside each of the G groups.

        With shuffle distributing, ``assignment`` is the (query, key) pair of assignments to use;
        None draws a fresh one (what the rewritten graph does on every call).
        """
        if self.pregrouped:
            return attend_pregrouped(self, q, k, v)
        if self.head_groupings:
            return self._per_head_sets(q, k, v, attn_mask, assignment)
        ql, kl = self.q_layout, self.k_layout
        qa, ka = self._assignments(assignment, q.device)
        q_pre, q_img, q_suf = self._parts(q, ql)
        k_pre, k_img, k_suf = self._parts(k, kl)
        v_pre, v_img, v_suf = self._parts(v, kl)
        qg = self._cluster(q_img, ql, qa)
        kg = self._shared_keys(self._cluster(k_img, kl, ka), k_pre, k_suf)
        vg = self._shared_keys(self._cluster(v_img, kl, ka), v_pre, v_suf)
        if self.shared_pool:  # the pooled tokens join every group's keys (the policy admits no mask)
            kg = _join(None, kg, self._per_group(self._pooled(k_img).unsqueeze(-3), self.ndim), -2)
            vg = _join(None, vg, self._per_group(self._pooled(v_img).unsqueeze(-3), self.ndim), -2)

        if self.relpos:
            return grouped_relpos_attention(self, qg, kg, vg, attn_mask)
        mask = None if attn_mask is None else _additive(attn_mask, self.mask.boolean, q.dtype)
        plan = self
        if mask is not None and self.mask.ndim < self.ndim:  # the mask at q's rank from here on
            mask = mask[(None,) * (self.ndim - self.mask.ndim)]
            plan = replace(self, mask=replace(self.mask, ndim=self.ndim))

        # Ranks are tracked here, not read from tensors: this code is also traced symbolically.
        group_mask, mask_rank = None, 0
        if mask is not None:
            m_pre, m_img, m_suf = plan._parts(mask, ql) if plan.mask.rows else (mask, mask, mask)
            group_mask, mask_rank = plan._grouped_user_mask(mask, m_img, qa, ka), self.ndim + 1
        pad = plan._key_padding_bias(q.dtype, q.device, ka)  # (G, 1, Lk_group)
        if pad is not None and self.shared_pool:  # the pooled keys are real keys of every group
            pad = torch.cat([pad, torch.zeros((self.groups, 1, self.shared_tokens()), dtype=q.dtype,
                                              device=q.device)], dim=-1)
        if pad is not None:
            group_mask = pad if group_mask is None else group_mask + pad
            mask_rank = max(mask_rank, 3)

        out_img = attend_groups(self, qg, kg, vg, group_mask, mask_rank, qa)

        if not (present(ql.prefix) or present(ql.suffix)):
            return out_img
        # Non-image queries attend to every key, as in the original site.
        q_rest = torch.cat([p for p in (q_pre, q_suf) if p is not None], dim=-2)
        rest_mask = None
        if mask is not None:
            if plan.mask.rows:
                rest_mask = torch.cat([p for p in (m_pre, m_suf) if p is not None], dim=-2)
            else:
                rest_mask = mask
        spare = has_data_dependent_parts(ql)
        if spare:
            # A data-dependent number of non-image queries may be zero, and SDPA's lowering asks
            # whether it is (a guard that cannot be installed): one spare query row (an image
            # query's, dropped below) makes the count provably positive. The mask has no query
            # rows here (policy.mask_spec leaves such a site dense).
            q_rest = torch.cat([q_rest, q_img.narrow(-2, 0, 1)], dim=-2)
        out_rest = self._sdpa(q_rest, k, v, rest_mask)
        if spare:
            out_rest = out_rest.narrow(-2, 0, out_rest.size(-2) - 1)
        return _join(out_rest.narrow(-2, 0, ql.prefix) if present(ql.prefix) else None, out_img,
                     out_rest.narrow(-2, ql.prefix, ql.suffix) if present(ql.suffix) else None, -2)

    def _head_set(self, x, i: int, split: bool = True):
        """Head set ``i`` of ``x`` (..., heads, L, d): a view of its contiguous heads; ``x`` itself
        when not ``split`` (k / v with one head every query head reads)."""
        return x.unflatten(-3, (len(self.head_groupings), -1)).select(-4, i) if split else x

    def _per_head_sets(self, q, k, v, attn_mask, assignment):
        """Every head set regrouped by its own grouping (heads of one set in one grouped SDPA), the
        outputs joined along the head axis in head order. A mask has no head axis here (the policy
        admits only those), so every set reads it whole; one shuffle draw serves every set."""
        assignment = self._assignments(assignment, q.device)
        assignment = None if assignment[0] is None else assignment
        outs, kv_split = [], not self.kv_heads_shared
        for i, grouping in enumerate(self.head_groupings):
            sub = replace(self, grouping=grouping, head_groupings=())
            outs.append(sub.grouped(self._head_set(q, i), self._head_set(k, i, kv_split),
                                    self._head_set(v, i, kv_split), attn_mask, assignment))
        return torch.cat(outs, dim=-3)

    def keep_mask(self, device=None, assignment=None):
        """``M`` as a boolean (Lq, Lk) mask, or (heads, Lq, Lk) with per-head groupings (each set's
        mask repeated over its heads; ``heads`` read from q at run time by :meth:`masked`)."""
        masks = [grid_mask(self.q_layout, self.k_layout, self.stride, device, assignment, g) for g in self.groupings]
        return masks[0] if len(masks) == 1 else torch.stack(masks)

    def masked(self, q, k, v, attn_mask=None, assignment=None):
        """The oracle form: dense SDPA with ``attn_mask = B + log M`` (M for ``assignment`` when shuffling)."""
        if self.pregrouped:
            raise ValueError("a pregrouped plan has only the grouped implementation")
        assignment = self._assignments(assignment, q.device)
        keep = self.keep_mask(q.device, None if assignment[0] is None else assignment)
        if self.head_groupings:  # (sets, Lq, Lk) -> (heads, Lq, Lk): set i's mask over its heads
            sets = len(self.head_groupings)
            keep = keep.unsqueeze(1).expand(-1, q.size(-3) // sets, -1, -1).flatten(0, 1)
        log_m = torch.where(keep, 0.0, float("-inf")).to(q.dtype)
        if self.shared_pool:
            return self._masked_with_pooled(q, k, v, log_m)
        boolean = self.mask is not None and self.mask.boolean
        if self.relpos:
            attn_mask, boolean = dense_relpos_bias(self, *attn_mask), False
        mask = log_m if attn_mask is None else _additive(attn_mask, boolean, q.dtype) + log_m
        return self._sdpa(q, k, v, mask)

    def _masked_with_pooled(self, q, k, v, log_m):
        """Dense SDPA over the keys followed by the pooled tokens: image queries see their group
        and every pooled token, non-image queries every original key and no pooled token."""
        _, k_img, _ = self._parts(k, self.k_layout)
        _, v_img, _ = self._parts(v, self.k_layout)
        keys = torch.cat([k, self._pooled(k_img)], dim=-2)
        values = torch.cat([v, self._pooled(v_img)], dim=-2)
        image_query = group_ids(self.q_layout, self.stride, q.device) >= 0
        pooled = torch.where(image_query, 0.0, float("-inf")).to(q.dtype)[:, None]
        pooled = pooled.expand(-1, self.shared_tokens())
        if self.head_groupings:  # log_m has a head axis
            pooled = pooled.expand(log_m.size(0), -1, -1)
        return self._sdpa(q, keys, values, torch.cat([log_m, pooled], dim=-1))

    # -- cost -----------------------------------------------------------------------------------
    def grouped_pairs(self) -> int:
        """Query/key pairs the grouped form scores per (batch, head)."""
        ql, kl = self.q_layout, self.k_layout
        nq = math.prod(-(-n // g) for n, g in zip(ql.image_shape, self.stride))
        nk = math.prod(-(-n // g) for n, g in zip(kl.image_shape, self.stride))
        return (self.groups * nq * (kl.prefix + nk + kl.suffix + self.shared_tokens())
                + (ql.prefix + ql.suffix) * kl.length)


def unsupported_shared_pool(plan: GridPlan, p: int) -> str | None:
    """Why ``plan``'s site cannot take shared tokens pooled over p x p windows (None if it can): a
    pooled key has no value of a mask or bias, and the windows must tile the key image."""
    if plan.mask is not None or plan.relpos:
        return "shared pooled tokens: the site has a mask or bias, which a pooled key has no value of"
    if plan.dropout_p:
        return "shared pooled tokens: the site has dropout"
    shape = plan.k_layout.image_shape[-2:]
    if not all(isinstance(n, int) for n in shape):
        return f"shared pooled tokens: the key image {format_stride(shape)} has symbolic sizes (pooling needs static ones)"
    if any(n % p for n in shape):
        return f"shared pooled tokens: the key image {format_stride(shape)} is not a multiple of {p}x{p} windows"
    return None


def kv_heads_shared(q_shape, k_shape, enable_gqa: bool) -> bool:
    """Whether k / v have a single head that every query head reads by broadcasting (MQA written
    without ``enable_gqa``): per-head groupings then regroup them whole for every head set."""
    return len(k_shape) >= 3 and k_shape[-3] == 1 and q_shape[-3] != 1 and not enable_gqa


def _join(pre, mid, suf, dim: int):
    """``mid`` with the prefix / suffix pieces (None: absent) concatenated around it along ``dim``."""
    pieces = [p for p in (pre, mid, suf) if p is not None]
    return torch.cat(pieces, dim=dim) if len(pieces) > 1 else mid


def grouped_attention(q, k, v, attn_mask=None, dropout_p=0.0, scale=None, q_layout=None, k_layout=None,
                      stride=2, enable_gqa=False, assignment=None, grouping="grid", shared_pool=0):
    """Eager grid attention, regrouped form (exactly :func:`masked_attention`, G times cheaper).

    ``assignment``: a (query, key) pair of shuffle assignments (:meth:`GridPlan.draw`); None for
    straightforward distributing. ``grouping``: "grid" (the paper's) or "window" (contiguous tiles),
    or a tuple of those, one per equal contiguous set of heads (per-head groupings). ``shared_pool``:
    p > 0 adds the key image averaged over p x p windows to every group's keys.
    """
    plan = GridPlan.for_tensors(q, k, attn_mask, q_layout, k_layout, stride, dropout_p, scale, enable_gqa,
                                grouping, shared_pool)
    if assignment is not None:
        plan = replace(plan, shuffle=True)
    return plan.grouped(q, k, v, attn_mask, assignment)


def masked_attention(q, k, v, attn_mask=None, dropout_p=0.0, scale=None, q_layout=None, k_layout=None,
                     stride=2, enable_gqa=False, assignment=None, grouping="grid", shared_pool=0):
    """Eager grid attention, dense masked form: ``SDPA(q, k, v, attn_mask = B + log M)`` (the masked
    reference, gridattn_fx/grid/reference.py, for the plan's grouping)."""
    plan = GridPlan.for_tensors(q, k, attn_mask, q_layout, k_layout, stride, dropout_p, scale, enable_gqa,
                                grouping, shared_pool)
    if assignment is not None:
        plan = replace(plan, shuffle=True)
    return plan.masked(q, k, v, attn_mask, assignment)


def attention_flops(batch_heads: int, lq: int, lk: int, d: int, dv: int) -> int:
    """FLOPs of ``softmax(QK^T)V`` (2 per multiply-add, both products)."""
    return 2 * batch_heads * lq * lk * (d + dv)

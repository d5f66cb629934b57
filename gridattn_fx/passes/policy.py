"""Which sites to rewrite: the rules of docs/design.md section 2 plus the user's config.

The policy is a list of small rules, asked in order about one site (:class:`SiteFacts`, everything
they read, computed once); the first that returns a :class:`Skip` leaves the site dense with that
reason. Grouping-specific conditions are the grouping's own (``Grouping.check``,
``Grouping.supports_shuffle``, gridattn_fx/grid/groupings.py). A new rule is one function and one
entry in :data:`ELIGIBILITY` or :data:`AT_STRIDE`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Callable

import torch

from ..config import GridAttnConfig
from ..crossgraph.suggest import declaration_for
from ..grid import (
    GridPlan,
    MaskSpec,
    RelPosSpec,
    TokenLayout,
    attention_flops,
    data_dependent,
    format_stride,
    grouping_named,
    normalize_stride,
)
from ..grid.plan import kv_heads_shared, unsupported_shared_pool
from ..layout.analysis import LayoutAnalysis
from ..layout.facts import _hint, _same_size
from ..patterns import AttentionSite
from ..reasons import Skip, SkipKind


@dataclass
class Decision:
    rewrite: bool
    reason: str
    q_layout: TokenLayout | None
    k_layout: TokenLayout | None
    evidence: str
    plan: GridPlan | None = None
    flops_before: int | None = None
    flops_after: int | None = None
    # A configured stride this site cannot take as written (a triple on a 2-D image, a stride
    # larger than an image axis): the pipeline warns once per graph with these texts.
    stride_warning: str | None = None
    skip: Skip | None = None   # why the site stays dense (None: rewritten)


def _concrete(shape) -> tuple | None:
    """A shape with symbolic sizes read from the values they were traced with, None for a size
    without one (data-dependent): for the cost and for comparing ranks and broadcasting only.
    Whatever the regrouping depends on (the sequence lengths against the layouts) is checked on the
    symbolic sizes themselves."""
    return None if shape is None else tuple(_hint(s) for s in shape)


def is_symbolic(layout: TokenLayout | None) -> bool:
    return layout is not None and any(
        isinstance(s, torch.SymInt) for s in layout.sizes)


def at_hints(layout: TokenLayout | None) -> TokenLayout | None:
    """A symbolic layout at the sizes it was traced with (for the report and the FLOPs)."""
    if not is_symbolic(layout):
        return layout
    return layout.map_sizes(_hint)


def _cost(q_shape, k_shape, v_shape) -> tuple | None:
    """(batch*heads, Lq, Lk, d, dv) of a site; Lq / Lk None when data-dependent; None when any other
    size has no value.

    The work is per query head: key/value batch and head axes broadcast against q's (MQA written
    as one k/v head), or with GQA (``enable_gqa``) hold fewer heads that groups of query heads share.
    """
    if q_shape is None or k_shape is None or v_shape is None:
        return None
    leads = (q_shape[:-2], k_shape[:-2], v_shape[:-2])
    if None in (*leads[0], *leads[1], *leads[2], q_shape[-1], v_shape[-1]):
        return None
    try:
        lead = torch.broadcast_shapes(*leads)
    except RuntimeError:  # GQA: the head axes differ; the batch axes still broadcast
        lead = (*torch.broadcast_shapes(*(x[:-1] for x in leads)), q_shape[-3]) if len(q_shape) > 2 else ()
    return math.prod(lead), q_shape[-2], k_shape[-2], q_shape[-1], v_shape[-1]


@dataclass
class SiteFacts:
    """What the rules read about one site: its layouts, shapes and cost, and the options that
    apply at its module path. Computed once per (site, path)."""

    site: AttentionSite
    layouts: LayoutAnalysis
    config: GridAttnConfig
    path: str
    training: bool
    q_layout: TokenLayout | None = field(init=False)
    k_layout: TokenLayout | None = field(init=False)

    def __post_init__(self):
        site = self.site
        self.q_layout, self.q_why = self.layouts.layout(site.query, site.query_dim)
        self.k_layout, self.k_why = self.layouts.layout(site.key, site.key_dim)
        self.evidence = f"q: {self.q_why}" + ("" if site.key is site.query else f"; k: {self.k_why}")
        self.shapes = [_concrete(s) for s in (site.q_shape, site.k_shape, site.v_shape)]
        self.cost = _cost(*self.shapes)
        self.flops = attention_flops(*self.cost) if self.cost and None not in self.cost else None
        self.symbolic = is_symbolic(self.q_layout) or is_symbolic(self.k_layout)
        # The report shows the sizes this graph was traced with; the reason names the symbols.
        self.shown_q, self.shown_k = at_hints(self.q_layout), at_hints(self.k_layout)
        self.symbols = ""
        if self.symbolic:
            unknown = sorted({str(s) for layout in (self.q_layout, self.k_layout) if layout is not None
                              for s in layout.sizes if data_dependent(s)})
            self.symbols = f"{self.q_layout}" + (
                "" if str(self.k_layout) == str(self.q_layout) else f" / {self.k_layout}") + (
                f" ({', '.join(unknown)}: data-dependent, known only at run time)" if unknown
                else f" (traced at {self.shown_q})")
        self.configured, self.stride_from = self.config.stride_for(self.path)
        grouping_name, self.grouping_from = self.config.grouping_for(self.path)
        names = grouping_name if isinstance(grouping_name, tuple) else (grouping_name,)
        self.groupings = tuple(grouping_named(n) for n in names)   # one per head set
        self.grouping = self.groupings[0]
        self.grouping_label = "|".join(names)
        self.shared_pool, self.shared_from = self.config.site_value("shared_pool", self.path)
        self.shuffling = self.config.distributing == "shuffle" and self.training

    @cached_property
    def stride(self) -> tuple:
        """The configured stride at the site's rank (asked only once the layouts are proven)."""
        return normalize_stride(self.configured, self.q_layout.rank)

    @cached_property
    def stride_warning(self) -> str | None:
        """A triple meeting a 2-D image: its temporal step does not apply, (Gh, Gw) is used."""
        if len(self.configured) <= self.q_layout.rank:
            return None
        option = self.config.site_option("stride", self.path)
        return (f"option '{option}' {tuple(self.configured)} is a video stride (Gt, Gh, Gw) but these sites are "
                f"2-D images: applying (Gh, Gw) = {self.stride}")

    @cached_property
    def mask(self) -> MaskSpec | Skip | None:
        """The site's attn_mask as the plan describes it, or why it cannot be regrouped (asked by a
        rule, then by the plan)."""
        return mask_spec(self)

    @cached_property
    def base_plan(self) -> GridPlan:
        """The site's plan without shared pooled tokens (asked by a rule, then by the plan; only
        once the layouts and the stride's rules have admitted the site)."""
        site = self.site
        relpos = None
        if site.relpos is not None:
            relpos = RelPosSpec(heads=site.mask_shape[-3] if len(site.mask_shape) == 4 else 0)
        per_head = len(self.groupings) > 1
        return GridPlan(q_layout=self.q_layout, k_layout=self.k_layout, stride=self.stride, ndim=len(self.shapes[0]),
                        mask=self.mask, relpos=relpos, dropout_p=site.dropout_p, scale=site.scale,
                        enable_gqa=site.enable_gqa, grouping=self.grouping,
                        head_groupings=self.groupings if per_head else (),
                        kv_heads_shared=per_head and kv_heads_shared(*self.shapes[:2], site.enable_gqa))

    @property
    def shown_stride(self) -> str:
        return format_stride(self.stride)


Rule = Callable[[SiteFacts], "Skip | None"]


# --- eligibility: the site itself, before any stride applies ---------------------------------------

def scores_not_written(f: SiteFacts) -> Skip | None:
    """An in-place op writing into the scores or probabilities (MViTv2 writes its relative-position
    bias into a slice of the scores) makes the site inexact."""
    site = f.site
    if site.build is None:  # an unreadable manual site is reported against its softmax
        nodes = list(site.output.all_input_nodes)
    else:  # not the inputs (a write there is the layout's business), nor the output (written after)
        nodes = [n for n in site.nodes if n is not site.output and n not in site.inputs]
    written = next((w for w in map(f.layouts.writer_of, nodes) if w is not None), None)
    if written is None:
        return None
    return Skip(SkipKind.SCORES_WRITTEN,
                f"the attention scores are written in place by `{written.name}` (e.g. a relative-position "
                f"bias written into a slice of them): not an exact site"
                + (f"; {site.unsupported}" if site.unsupported else ""))


def readable(f: SiteFacts) -> Skip | None:
    if f.site.build is None:  # recognised as attention, but not readable exactly
        return Skip(SkipKind.UNREADABLE, f"unsupported site: {f.site.unsupported}")
    return None


def stride_not_one(f: SiteFacts) -> Skip | None:
    if all(g == 1 for g in f.configured):
        return Skip(SkipKind.STRIDE_ONE, "stride 1: grid attention is the identity" + f.stride_from)
    return None


def not_causal(f: SiteFacts) -> Skip | None:
    if f.site.is_causal:
        return Skip(SkipKind.CAUSAL, "causal attention: the grid semantics do not apply")
    return None


def query_is_image(f: SiteFacts) -> Skip | None:
    if f.q_layout is None and f.layouts.rank_chunk(f.site.query) and f.site.key not in f.layouts.facts:
        return key_is_image(f)  # a rank's chunk of queries against text: the keys say what it is
    if f.q_layout is None:
        lost_at, why = f.layouts.lost_at(f.site.query), f"query: {f.q_why}"
        if lost_at is None and f.site.query not in f.layouts.facts:
            # no image ever reached it: tokens packed before the model (Flux) need a declaration
            line = declaration_for(f.layouts.gm, f.site.query, f.site.query_dim)
            why += f"; {line}" if line else ""
        return Skip(SkipKind.NO_QUERY_LAYOUT, why, lost_at=lost_at)
    return None


def key_is_image(f: SiteFacts) -> Skip | None:
    if f.k_layout is None:
        lost_at = f.layouts.lost_at(f.site.key)
        # keys no image ever reached may be text; keys whose image was lost on the way are not
        hint = " (cross-attention to non-image tokens?)" if lost_at is None else ""
        return Skip(SkipKind.NO_KEY_LAYOUT, f"key: {f.k_why}{hint}", lost_at=lost_at)
    return None


def same_image(f: SiteFacts) -> Skip | None:
    other = f.layouts.same_image(f.site.query, f.site.key)
    return Skip(SkipKind.CROSS_IMAGE, other) if other else None


def supported_form(f: SiteFacts) -> Skip | None:
    if f.site.unsupported:
        return Skip(SkipKind.UNREADABLE, f"unsupported site: {f.site.unsupported}")
    return None


def selected(f: SiteFacts) -> Skip | None:
    """The policy speaks only about eligible sites: an ineligible one says why it is ineligible."""
    why = f.config.left_out(f.path)
    return Skip(SkipKind.NOT_SELECTED, why) if why else None


def known_sizes(f: SiteFacts) -> Skip | None:
    """Batch, head and feature sizes, and the images' sizes, need values; the number of non-image
    tokens may be data-dependent (Mochi's valid text tokens, kept by a ``nonzero``): the regrouping
    only slices them off and shares them with every group (grid/layout.py ``present``)."""
    unknown = [s for layout in (f.q_layout, f.k_layout) for s in layout.image_shape if _hint(s) is None]
    if f.cost is None or unknown:
        unbacked = sorted({str(s) for shape in (f.site.q_shape, f.site.k_shape) for s in (shape or ())
                           if data_dependent(s)})
        why = (f" (data-dependent: {', '.join(unbacked)}, e.g. the tokens a nonzero or a mask keeps)"
               if unbacked else "")
        return Skip(SkipKind.UNKNOWN_SIZES, f"sequence or feature sizes without a known value{why}: cannot size "
                                            "the regrouping")
    return None


def lengths_match(f: SiteFacts) -> Skip | None:
    site = f.site
    if _same_size(site.q_shape[-2], f.q_layout.length) and _same_size(site.k_shape[-2], f.k_layout.length):
        return None
    return Skip(SkipKind.LENGTH_MISMATCH, f"sequence lengths {site.q_shape[-2]}/{site.k_shape[-2]} are not "
                                          f"provably those of the proven layouts {f.q_layout}/{f.k_layout}")


def static_where_needed(f: SiteFacts) -> Skip | None:
    """The decomposed rel-pos bias and shuffle distributing are rewritten for static sizes only."""
    if not f.symbolic:
        return None
    if f.site.relpos is not None:
        return Skip(SkipKind.SYMBOLIC, f"symbolic image size {f.symbols}: a decomposed rel-pos bias is rewritten "
                                       "only for static sizes")
    if f.config.distributing == "shuffle" and f.training:
        return Skip(SkipKind.SYMBOLIC, f"symbolic image size {f.symbols}: shuffle distributing is rewritten only "
                                       "for static sizes")
    return None


def same_rank(f: SiteFacts) -> Skip | None:
    if f.q_layout.rank != f.k_layout.rank:
        return Skip(SkipKind.RANK_MISMATCH, f"query image {f.q_layout} and key image {f.k_layout} differ in rank")
    return None


# --- at the site's stride --------------------------------------------------------------------------

def stride_not_one_at_rank(f: SiteFacts) -> Skip | None:
    if all(g == 1 for g in f.stride):
        return Skip(SkipKind.STRIDE_ONE, f"stride {f.shown_stride} on a {f.q_layout.rank}-D image: grid attention "
                                         "is the identity" + f.stride_from)
    return None


def enough_tokens(f: SiteFacts) -> Skip | None:
    n, least = f.q_layout.image_tokens, f.config.min_image_tokens
    if n < least:
        return Skip(SkipKind.TOO_FEW_TOKENS, f"{n} image tokens < min_image_tokens={least}"
                    + f.config.credit("min_image_tokens"))
    return None


def stride_fits(f: SiteFacts) -> Skip | None:
    for side, layout in (("query", f.q_layout), ("key", f.k_layout)):
        if any(n < g for n, g in zip(layout.image_shape, f.stride)):
            # Worth a warning, not only a report line: an option that can never apply to a site
            # would otherwise be a silent no-op.
            return Skip(SkipKind.STRIDE_TOO_LARGE,
                        f"{side} image {format_stride(layout.image_shape)} is smaller than the stride {f.shown_stride}",
                        warning=f"stride {f.shown_stride}{f.stride_from} is larger than an image axis, so these "
                                f"sites stay dense")
        # The same rule at equality, for keys: a stride that spans the whole key image leaves one
        # image key per group, so every image query would see a single image key (attention
        # degenerates). One query per group is fine (LeViT's downsampling attention: a 2x2 query
        # grid over 4x4 keys); one side equal to its stride still leaves groups of several tokens.
        if side == "key" and tuple(layout.image_shape) == tuple(f.stride):
            return Skip(SkipKind.DEGENERATE, f"key image {format_stride(layout.image_shape)} at stride "
                                             f"{f.shown_stride}: each group would hold a single image key "
                                             "(attention degenerates)")
    return None


def grouping_applies(f: SiteFacts) -> Skip | None:
    for grouping in f.groupings:
        why = grouping.check(f.q_layout, f.k_layout, f.stride)
        if why:
            return Skip(SkipKind.GROUPING, why)
        if f.shuffling and not grouping.supports_shuffle:
            return Skip(SkipKind.GROUPING, f"{f.grouping_label} grouping, stride {f.shown_stride}{f.grouping_from}: "
                                           f"{grouping.shuffle_unsupported} (distributing='shuffle', training): "
                                           "left dense")
    return None


def heads_split(f: SiteFacts) -> Skip | None:
    """Per-head groupings split the head axis of a (batch, heads, tokens, features) site into equal
    sets; anything that mixes heads elsewhere (heads folded into the batch, a mask or bias that
    differs per head) leaves the site dense, with a warning: the option cannot apply there."""
    sets = len(f.groupings)
    if sets == 1:
        return None
    q, k, _ = f.shapes
    why = None
    if len(q) != 4 or len(k) != 4:
        why = f"q has rank {len(q)}, not (batch, heads, tokens, features): no head axis to split"
    elif f.site.relpos is not None:
        why = "the site has a decomposed rel-pos bias"
    elif f.layouts.rank_partial(f.site.query):
        why = ("this rank holds only its share of the heads (context parallelism's all-to-all), not the "
               "model's head sets")
    elif q[-3] is None or q[-3] % sets:
        why = f"{q[-3]} query heads do not split into {sets} equal sets"
    elif k[-3] is None or (k[-3] % sets and not kv_heads_shared(q, k, f.site.enable_gqa)):
        why = f"{k[-3]} key/value heads do not split into {sets} equal sets"
    elif f.site.mask_shape is not None and len(f.site.mask_shape) >= 3 and _concrete(f.site.mask_shape)[-3] != 1:
        why = "the attn_mask differs per head"
    if why is None:
        return None
    detail = f"per-head groupings {f.grouping_label}{f.grouping_from}: {why}; left dense"
    return Skip(SkipKind.GROUPING, detail, warning=detail)


def shared_pool_applies(f: SiteFacts) -> Skip | None:
    """Shared pooled tokens need keys every group may see whole: a site whose plan cannot take
    them stays dense, with a warning (the option asked for something it cannot do here)."""
    if not f.shared_pool:
        return None
    why = unsupported_shared_pool(f.base_plan, f.shared_pool)
    if why is None:
        return None
    detail = f"{why} (shared_pool={f.shared_pool}{f.shared_from}); left dense"
    return Skip(SkipKind.GROUPING, detail, warning=detail)


def supported_ranks(f: SiteFacts) -> Skip | None:
    q, k, v = (len(s) for s in f.shapes)
    if q < 2 or k != q or v != q:
        return Skip(SkipKind.SHAPES, f"unsupported ranks q{q}/k{k}/v{v}")
    return None


def relpos_on_layout(f: SiteFacts) -> Skip | None:
    if f.site.relpos is None:
        return None
    qh, qw, kh, kw = f.site.relpos
    for side, layout, (h, w) in (("query", f.q_layout, (qh, qw)), ("key", f.k_layout, (kh, kw))):
        if layout.prefix or layout.suffix or layout.transposed or (layout.height, layout.width) != (h, w):
            return Skip(SkipKind.RELPOS_MISMATCH, f"relative-position bias indexes a {h}x{w} {side} grid but the "
                                                  f"proven {side} layout is {layout}")
    return None


def mask_spec(f: SiteFacts) -> MaskSpec | Skip | None:
    """The site's attn_mask as the plan describes it, or why it cannot be regrouped."""
    site = f.site
    if site.mask_shape is None:
        return None
    m_shape = _concrete(site.mask_shape)
    if None in m_shape:
        return Skip(SkipKind.SHAPES, "attn_mask has data-dependent sizes")
    q_shape, k_shape = f.shapes[0], f.shapes[1]
    if len(m_shape) > len(q_shape) or len(m_shape) < 1:
        return Skip(SkipKind.SHAPES, f"attn_mask of rank {len(m_shape)} does not broadcast like q")
    rows = m_shape[-2] if len(m_shape) >= 2 else 1
    if rows not in (1, q_shape[-2]) or m_shape[-1] not in (1, k_shape[-2]):
        return Skip(SkipKind.SHAPES, f"attn_mask shape {m_shape} does not broadcast to ({q_shape[-2]}, {k_shape[-2]})")
    return MaskSpec(ndim=len(m_shape), rows=rows != 1, cols=m_shape[-1] != 1, boolean=site.mask_bool)


def mask_broadcasts(f: SiteFacts) -> Skip | None:
    return f.mask if isinstance(f.mask, Skip) else None


ELIGIBILITY: tuple[Rule, ...] = (
    scores_not_written, readable, stride_not_one, not_causal, query_is_image, key_is_image, same_image,
    supported_form, selected, known_sizes, lengths_match, static_where_needed, same_rank,
)
AT_STRIDE: tuple[Rule, ...] = (
    stride_not_one_at_rank, enough_tokens, stride_fits, grouping_applies, supported_ranks, heads_split,
    relpos_on_layout, mask_broadcasts, shared_pool_applies,
)


def _first_skip(rules, f: SiteFacts) -> Skip | None:
    for rule in rules:
        skip = rule(f)
        if skip is not None:
            return skip
    return None


def _plan(f: SiteFacts) -> tuple[GridPlan, str]:
    """The plan of a site every rule admits, and how its tokens are distributed (for the reason)."""
    plan = replace(f.base_plan, shared_pool=f.shared_pool)
    if f.config.distributing != "shuffle":
        return plan, ""
    if not f.training:
        return plan, ", straightforward distributing (inference)"
    if plan.shuffle_unsupported:
        return plan, f", straightforward distributing ({plan.shuffle_unsupported})"
    return replace(plan, shuffle=True), ", shuffle distributing (training)"


def decide(site: AttentionSite, layouts: LayoutAnalysis, config: GridAttnConfig, module_path: str,
           training: bool = False) -> Decision:
    """The decision for one site; ``training`` says the compiled module is in training mode."""
    f = SiteFacts(site, layouts, config, module_path, training)

    def dense(skip: Skip, warning: str | None = None) -> Decision:
        return Decision(False, skip.detail, f.shown_q, f.shown_k, f.evidence, None, f.flops, f.flops,
                        skip.warning or warning, skip)

    skip = _first_skip(ELIGIBILITY, f)
    if skip is not None:
        return dense(skip)
    skip = _first_skip(AT_STRIDE, f)
    if skip is not None:
        return dense(skip, f.stride_warning)

    plan, distributing = _plan(f)
    if config.implementation == "masked" or f.flops is None:
        after = f.flops
    else:
        bh, _, _, d, dv = f.cost
        after = 2 * bh * replace(plan, q_layout=f.shown_q, k_layout=f.shown_k).grouped_pairs() * (d + dv)
    kind = "image self-attention" if f.shown_q == f.shown_k else "image attention across two grids"
    if f.symbolic:  # every size-dependent choice above and in the rewrite is guarded
        distributing += f", symbolic sizes {f.symbols}"
    how = f"stride {f.shown_stride}" + f.stride_from
    if len(f.groupings) > 1:
        per_set = f.shapes[0][-3] // len(f.groupings)   # heads_split admitted only heads that split
        sets = ", ".join(f"heads {i * per_set}-{(i + 1) * per_set - 1} {g.name}" if per_set > 1 else f"head {i} {g.name}"
                         for i, g in enumerate(f.groupings))
        how = f"per-head groupings {f.grouping_label} ({sets}){f.grouping_from}, " + how
    elif f.grouping.name != "grid":
        how = f"{f.grouping.name} grouping{f.grouping_from}, " + how
    if f.shared_pool:
        how += (f", + {plan.shared_tokens()} shared tokens pooled over {f.shared_pool}x{f.shared_pool} windows"
                f"{f.shared_from}")
    if f.stride_warning:
        how += f" (the temporal step of {tuple(f.configured)} does not apply to a 2-D image)"
    return Decision(True, f"{kind}, {how}" + distributing, f.shown_q, f.shown_k, f.evidence, plan, f.flops, after,
                    f.stride_warning)

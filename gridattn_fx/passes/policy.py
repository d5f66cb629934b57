"""Which sites to rewrite: the rules of docs/design.md section 2 plus the user's config."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..config.options import GridAttnConfig
from ..grid import GridPlan, TokenLayout, attention_flops, format_stride, grouping_named, normalize_stride
from ..patterns import AttentionSite
from ..layout.analysis import LayoutAnalysis, _hint, _same_size

# Reasons of sites left dense only because their image sizes are symbolic start with this; the
# backend warns about them (frontends/backend.py) and the README says what to do.
SYMBOLIC_UNSUPPORTED = "symbolic image size"


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
    # A configured stride this site cannot take as written (a triple on a 2-D image): the pipeline
    # warns once per graph with these texts.
    stride_warning: str | None = None


def _concrete(shape) -> tuple[int, ...] | None:
    """A shape as ints, symbolic sizes read from the values they were traced with: for the cost
    and for comparing ranks and broadcasting only. Whatever the regrouping depends on (the
    sequence lengths against the layouts) is checked on the symbolic sizes themselves."""
    if shape is None:
        return None
    sizes = [_hint(s) for s in shape]
    return None if None in sizes else tuple(sizes)


def is_symbolic(layout: TokenLayout | None) -> bool:
    return layout is not None and any(
        isinstance(s, torch.SymInt) for s in layout.sizes)


def at_hints(layout: TokenLayout | None) -> TokenLayout | None:
    """A symbolic layout at the sizes it was traced with (for the report and the FLOPs)."""
    if not is_symbolic(layout):
        return layout
    return layout.map_sizes(_hint)


def _cost(q_shape, k_shape, v_shape) -> tuple[int, int, int, int, int] | None:
    """(batch*heads, Lq, Lk, d, dv) of a site, or None when sizes are symbolic.

    The work is per query head: key/value batch and head axes broadcast against q's (MQA written
    as one k/v head), or with GQA (``enable_gqa``) hold fewer heads that groups of query heads share.
    """
    if q_shape is None or k_shape is None or v_shape is None:
        return None
    leads = (q_shape[:-2], k_shape[:-2], v_shape[:-2])
    try:
        lead = torch.broadcast_shapes(*leads)
    except RuntimeError:  # GQA: the head axes differ; the batch axes still broadcast
        lead = (*torch.broadcast_shapes(*(x[:-1] for x in leads)), q_shape[-3]) if len(q_shape) > 2 else ()
    return math.prod(lead), q_shape[-2], k_shape[-2], q_shape[-1], v_shape[-1]


def _relpos_mismatch(site: AttentionSite, q_layout: TokenLayout, k_layout: TokenLayout) -> str | None:
    qh, qw, kh, kw = site.relpos
    for side, layout, (h, w) in (("query", q_layout, (qh, qw)), ("key", k_layout, (kh, kw))):
        if layout.prefix or layout.suffix or layout.transposed or (layout.height, layout.width) != (h, w):
            return (f"relative-position bias indexes a {h}x{w} {side} grid but the proven {side} layout "
                    f"is {layout}")
    return None


def _scores_written(site: AttentionSite, layouts: LayoutAnalysis):
    """The in-place op writing into the scores or probabilities of a site, if any (MViTv2 writes
    its relative-position bias into a slice of the scores)."""
    if site.build is None:  # an unreadable manual site is reported against its softmax
        nodes = list(site.output.all_input_nodes)
    else:  # not the inputs (a write there is the layout's business), nor the output (written after)
        nodes = [n for n in site.nodes if n is not site.output and n not in site.inputs]
    return next((w for w in map(layouts.writer_of, nodes) if w is not None), None)


def _site_stride(stride, stride_from: str, q_layout: TokenLayout) -> tuple[tuple, str | None]:
    """The configured stride normalised to the site's rank, and a warning when a triple meets a
    2-D image (its temporal step does not apply: (Gh, Gw) is used)."""
    full = normalize_stride(stride, q_layout.rank)
    if len(stride) > q_layout.rank:
        field = "site_strides" if "site_strides" in stride_from else "stride"
        return full, (f"option '{field}' {tuple(stride)} is a video stride (Gt, Gh, Gw) but these sites are "
                      f"2-D images: applying (Gh, Gw) = {full}")
    return full, None


def _window_tiles_unmatched(q_layout: TokenLayout, k_layout: TokenLayout, stride) -> str | None:
    """Window grouping on two grids (reduced keys): a query tile whose key tile holds no key would
    leave its queries with nothing to attend to."""
    for axis, (nq, nk, g) in enumerate(zip(q_layout.image_shape, k_layout.image_shape, stride)):
        tiles_q, tiles_k = -(-nq // -(-nq // g)), -(-nk // -(-nk // g))
        if tiles_q > tiles_k:
            return (f"window grouping, stride {format_stride(stride)}: query image {q_layout} has {tiles_q} tiles "
                    f"along axis {axis} but key image {k_layout} only {tiles_k} (queries without keys)")
    return None


def _shuffle(plan: GridPlan, config: GridAttnConfig, training: bool) -> tuple[GridPlan, str]:
    """The plan with shuffle distributing when the config asks for it and the module is training."""
    if config.distributing != "shuffle":
        return plan, ""
    if not training:
        return plan, ", straightforward distributing (inference)"
    if plan.shuffle_unsupported:
        return plan, f", straightforward distributing ({plan.shuffle_unsupported})"
    return replace(plan, shuffle=True), ", shuffle distributing (training)"


def decide(site: AttentionSite, layouts: LayoutAnalysis, config: GridAttnConfig, module_path: str,
           training: bool = False) -> Decision:
    """The decision for one site; ``training`` says the compiled module is in training mode."""
    q_layout, q_why = layouts.layout(site.query, site.query_dim)
    k_layout, k_why = layouts.layout(site.key, site.key_dim)
    evidence = f"q: {q_why}" + ("" if site.key is site.query else f"; k: {k_why}")
    shapes = [_concrete(s) for s in (site.q_shape, site.k_shape, site.v_shape)]
    cost = _cost(*shapes)
    flops = attention_flops(*cost) if cost else None
    symbolic = is_symbolic(q_layout) or is_symbolic(k_layout)
    # The report shows the sizes this graph was traced with; the reason names the symbols.
    shown_q, shown_k = at_hints(q_layout), at_hints(k_layout)
    symbols = ""
    if symbolic:
        symbols = f"{q_layout}" + ("" if str(k_layout) == str(q_layout) else f" / {k_layout}") + \
            f" (traced at {shown_q})"

    warning = None

    def skip(reason):
        return Decision(False, reason, shown_q, shown_k, evidence, None, flops, flops, warning)

    stride, stride_from = config.stride_for(module_path)
    grouping_name, grouping_from = config.grouping_for(module_path)
    grouping = grouping_named(grouping_name)
    written = _scores_written(site, layouts)
    if written is not None:
        return skip(f"the attention scores are written in place by `{written.name}` (e.g. a relative-position "
                    f"bias written into a slice of them): not an exact site" +
                    (f"; {site.unsupported}" if site.unsupported else ""))
    if site.build is None:  # recognised as attention, but not readable exactly
        return skip(f"unsupported site: {site.unsupported}")
    if all(g == 1 for g in stride):
        return skip("stride 1: grid attention is the identity" + stride_from)
    if site.is_causal:
        return skip("causal attention: the grid semantics do not apply")
    if q_layout is None:
        return skip(f"query: {q_why}")
    if k_layout is None:
        return skip(f"key: {k_why} (cross-attention to non-image tokens?)")
    other_image = layouts.same_image(site.query, site.key)
    if other_image:
        return skip(other_image)
    if site.unsupported:
        return skip(f"unsupported site: {site.unsupported}")
    # The policy speaks only about eligible sites: an ineligible one says why it is ineligible.
    selected, why = config.selects(module_path)
    if not selected:
        return skip(why + config.credit("include" if why.startswith("not matched") else "exclude"))
    if cost is None:
        return skip("sequence or feature sizes without a known value: cannot size the regrouping")
    q_shape, k_shape, v_shape = shapes
    if not (_same_size(site.q_shape[-2], q_layout.length) and _same_size(site.k_shape[-2], k_layout.length)):
        return skip(f"sequence lengths {site.q_shape[-2]}/{site.k_shape[-2]} are not provably those of the "
                    f"proven layouts {q_layout}/{k_layout}")
    if symbolic and site.relpos is not None:
        return skip(f"{SYMBOLIC_UNSUPPORTED} {symbols}: a decomposed rel-pos bias is rewritten only for "
                    "static sizes")
    if symbolic and config.distributing == "shuffle" and training:
        return skip(f"{SYMBOLIC_UNSUPPORTED} {symbols}: shuffle distributing is rewritten only for "
                    "static sizes")
    if q_layout.rank != k_layout.rank:
        return skip(f"query image {q_layout} and key image {k_layout} differ in rank")
    configured = stride
    stride, warning = _site_stride(stride, stride_from, q_layout)
    shown_stride = format_stride(stride)
    if all(g == 1 for g in stride):
        return skip(f"stride {shown_stride} on a {q_layout.rank}-D image: grid attention is the identity"
                    + stride_from)
    if q_layout.image_tokens < config.min_image_tokens:
        return skip(f"{q_layout.image_tokens} image tokens < min_image_tokens={config.min_image_tokens}"
                    + config.credit("min_image_tokens"))
    for side, layout in (("query", q_layout), ("key", k_layout)):
        if any(n < g for n, g in zip(layout.image_shape, stride)):
            # Worth a warning, not only a report line: an option that can never apply to a site
            # would otherwise be a silent no-op (issue 13).
            return replace(skip(f"{side} image {format_stride(layout.image_shape)} is smaller than the stride "
                                f"{shown_stride}"),
                           stride_warning=f"stride {shown_stride}{stride_from} is larger than an image axis, "
                                          f"so these sites stay dense")
        # The same rule at equality, for keys: a stride that spans the whole key image leaves one
        # image key per group, so every image query would see a single image key (attention
        # degenerates). One query per group is fine (LeViT's downsampling attention: a 2x2 query
        # grid over 4x4 keys); one side equal to its stride still leaves groups of several tokens.
        if side == "key" and tuple(layout.image_shape) == tuple(stride):
            return skip(f"key image {format_stride(layout.image_shape)} at stride {shown_stride}: each group "
                        "would hold a single image key (attention degenerates)")
    if grouping.name == "window":
        unmatched = _window_tiles_unmatched(q_layout, k_layout, stride)
        if unmatched:
            return skip(unmatched)
        if config.distributing == "shuffle" and training:
            return skip(f"window grouping, stride {shown_stride}{grouping_from}: {grouping.shuffle_unsupported} "
                        "(distributing='shuffle', training): left dense")
    if len(q_shape) < 2 or len(k_shape) != len(q_shape) or len(v_shape) != len(q_shape):
        return skip(f"unsupported ranks q{len(q_shape)}/k{len(k_shape)}/v{len(v_shape)}")
    if site.relpos is not None:
        mismatch = _relpos_mismatch(site, q_layout, k_layout)
        if mismatch:
            return skip(mismatch)

    mask_ndim, mask_rows, mask_cols = None, True, True
    if site.mask_shape is not None:
        m_shape = _concrete(site.mask_shape)
        if m_shape is None:
            return skip("attn_mask has symbolic sizes")
        if len(m_shape) > len(q_shape) or len(m_shape) < 1:
            return skip(f"attn_mask of rank {len(m_shape)} does not broadcast like q")
        rows = m_shape[-2] if len(m_shape) >= 2 else 1
        if rows not in (1, q_shape[-2]) or m_shape[-1] not in (1, k_shape[-2]):
            return skip(f"attn_mask shape {m_shape} does not broadcast to ({q_shape[-2]}, {k_shape[-2]})")
        mask_ndim, mask_rows, mask_cols = len(m_shape), rows != 1, m_shape[-1] != 1

    plan = GridPlan(q_layout, k_layout, stride, len(q_shape), mask_ndim, mask_rows, mask_cols, site.mask_bool,
                    site.dropout_p, site.scale, site.enable_gqa, relpos=site.relpos is not None,
                    relpos_heads=site.mask_shape[-3] if site.relpos is not None and len(site.mask_shape) == 4 else 0,
                    grouping=grouping)
    plan, distributing = _shuffle(plan, config, training)
    if config.implementation == "masked":
        after = flops
    else:
        bh, _, _, d, dv = cost
        after = 2 * bh * replace(plan, q_layout=shown_q, k_layout=shown_k).grouped_pairs() * (d + dv)
    kind = "image self-attention" if shown_q == shown_k else "image attention across two grids"
    if symbolic:  # every size-dependent choice above and in the rewrite is guarded
        distributing += f", symbolic sizes {symbols}"
    how = f"stride {shown_stride}" + stride_from
    if grouping.name != "grid":
        how = f"{grouping.name} grouping{grouping_from}, " + how
    if warning:
        how += f" (the temporal step of {tuple(configured)} does not apply to a 2-D image)"
    reason = f"{kind}, {how}" + distributing
    return Decision(True, reason, shown_q, shown_k, evidence, plan, flops, after, warning)

"""What reshapes, permutes, indexing and broadcasting do to a fact (the axis algebra of the proof).

Each function takes a fact and the shapes around one op and returns the fact of the op's output,
or None when the op moves image tokens in a way no layout describes (the proof is then lost there).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..ir.op_catalogue import arg, resolve
from ..ir.values import known_true
from .facts import Spatial, Tokens, _frame_count, _frames_merged, _hint, _remap, _same_size, _shift, _static, _step


def _normalized_shape(node, gm):
    if node.op == "call_module":
        return tuple(gm.get_submodule(node.target).normalized_shape)
    shape = resolve(arg(node, 1, "normalized_shape"))
    return (shape,) if isinstance(shape, int) else tuple(shape)


def _permute(fact, perm, name):
    inverse = {src: dst for dst, src in enumerate(perm)}
    moved = _remap(fact, inverse)
    order = sorted(fact.batch, key=lambda b: inverse[b])
    if moved is not None and order != sorted(fact.batch):  # image axes swapped among themselves
        ranks = tuple(sorted(fact.batch).index(b) for b in order)
        image = moved.image
        if image and image[-1][0] == "perm" and len(image[-1][1]) == len(ranks):
            # two permutes in a row are one: their composition (none when the second undoes the
            # first, as the transposes around a sequence-first nn.MultiheadAttention do), so a
            # tensor and its permuted-back copy keep one identity
            ranks = tuple(image[-1][1][r] for r in ranks)
            image = image[:-1]
        if ranks != tuple(range(len(ranks))):
            image = image + (("perm", ranks),)
        moved = replace(moved, image=image)
    return _step(moved, name)


def _reshape_groups(in_shape, out_shape):
    """Minimal groups of (input axes, output axes) that a row-major reshape maps onto each other.

    Boundaries sit where the running products of both shapes coincide; size-1 axes are ignored.
    A data-dependent size (no traced value) must meet the same size on the other side, as a group
    of its own. Returns None when the sizes cannot be matched so.
    """
    ins = [(d, _hint(s)) for d, s in enumerate(in_shape)]
    outs = [(d, _hint(s)) for d, s in enumerate(out_shape)]
    ins = [(d, s) for d, s in ins if s != 1]
    outs = [(d, s) for d, s in outs if s != 1]
    groups, i, j = [], 0, 0
    while i < len(ins) and j < len(outs):
        gi, gj = [ins[i][0]], [outs[j][0]]
        pi, pj = ins[i][1], outs[j][1]
        i, j = i + 1, j + 1
        if pi is None or pj is None:
            if not _same_size(in_shape[gi[0]], out_shape[gj[0]]):
                return None
            groups.append((gi, gj))
            continue
        while pi != pj:
            if pi < pj and i < len(ins) and ins[i][1] is not None:
                gi.append(ins[i][0]); pi *= ins[i][1]; i += 1
            elif pj < pi and j < len(outs) and outs[j][1] is not None:
                gj.append(outs[j][0]); pj *= outs[j][1]; j += 1
            else:
                return None
        groups.append((gi, gj))
    if i != len(ins) or j != len(outs):
        return None
    # The boundaries were found on traced values; with symbolic sizes each group must also be
    # provably the same size on both sides, or the reshape may regroup differently at other sizes.
    for gi, gj in groups:
        if not _same_size(math.prod(in_shape[d] for d in gi), math.prod(out_shape[d] for d in gj)):
            return None
    return groups


def _reshape(fact, in_shape, out_shape, name):
    out = _reshape_fact(fact, in_shape, out_shape, name)
    if out is None and isinstance(fact, Tokens) and fact.lead:
        video = _frames_merged(fact)  # frames merged in front of the tokens, then reshaped as a video
        if not video.lead:
            out = _reshape_fact(video, in_shape, out_shape, name)
    if out is None:
        # A reshape that splits and merges within one group (``(B * T, N, C) -> (B, T * N, C)``) is
        # the row-major split to the common refinement of both shapes, then the merge: carried as that.
        refined = _refined_shape(in_shape, out_shape)
        if refined is not None and refined not in (_non_unit(in_shape), _non_unit(out_shape)):
            middle = _reshape(fact, in_shape, refined, name)  # only splits: no refinement again
            out = _reshape(middle, refined, out_shape, name) if middle is not None else None
    return out


def _non_unit(shape) -> tuple:
    return tuple(_static(n) for n in shape if _static(n) != 1)


def _refined_shape(in_shape, out_shape) -> tuple | None:
    """The coarsest shape that both ``in_shape`` and ``out_shape`` are row-major merges of (static
    sizes only; size-1 axes dropped), or None when there is none (sizes that do not nest)."""
    ins, outs = [_static(s) for s in in_shape], [_static(s) for s in out_shape]
    if None in ins or None in outs:
        return None

    def products(sizes):
        out, p = [], 1
        for n in sizes:
            if n != 1:
                p *= n
                out.append(p)
        return out

    a, b = products(ins), products(outs)
    if not a or not b or a[-1] != b[-1]:
        return None
    points = sorted(set(a) | set(b))
    if any(hi % lo for lo, hi in zip(points, points[1:])):
        return None
    return tuple([points[0]] + [hi // lo for lo, hi in zip(points, points[1:])])


def _reshape_fact(fact, in_shape, out_shape, name):
    groups = _reshape_groups(in_shape, out_shape)
    if groups is None:
        return None
    owner = {d: g for g in groups for d in g[0]}
    if isinstance(fact, Spatial) and fact.rank == 3:
        fact = _frames_folded(fact, owner)
    in_batch = set(fact.batch)
    fact = _reshape_images(fact, groups, in_shape, out_shape, owner)  # batch now in output axes
    if fact is None:
        return None
    if isinstance(fact, Tokens):
        gi, go = owner.get(fact.dim, (None, None))
        if gi is None:
            return None
        if fact.lead:
            return _reshape_lead(fact, gi, go, out_shape, name)
        if gi == [fact.dim] and len(go) == 1:
            return _step(replace(fact, dim=go[0]), name)
        whole = _hint(fact.prefix) == 0 and _hint(fact.suffix) == 0
        if gi == [fact.dim] and len(go) == fact.rank and whole:
            # the tokens unflattened into one axis per image axis, in their storage order
            if all(_same_size(out_shape[o], n) for o, n in zip(go, fact.storage_shape)):
                axes = tuple(go[fact.order.index(i)] for i in range(fact.rank))
                return _step(Spatial(axes, fact.image_shape, fact.origin, fact.trail, fact.image, fact.batch,
                                     source=fact.source, marked=fact.marked), name)
        if gi == [fact.dim] and len(go) == 2 and fact.rank == 3 and fact.order[0] == 0 and whole:
            # a video's tokens split into (frames, tokens per frame): frames into the batch, each
            # frame an image of its own (per-frame spatial attention)
            frames, height, width = fact.image_shape
            if _same_size(out_shape[go[0]], frames) and _same_size(out_shape[go[1]], height * width):
                return _step(replace(fact, dim=go[1], image_shape=(height, width),
                                     order=tuple(a - 1 for a in fact.order[1:]),
                                     batch=tuple(sorted({*fact.batch, go[0]})),
                                     image=fact.image + (("frames split", _hint(frames)),)), name + " (frames)")
        if len(go) == 1 and gi[0] == fact.dim and len(gi) > 1:
            return _frames_behind(fact, [(in_shape[d], d in in_batch) for d in gi[1:]], go[0], name)
        if len(go) == 1 and gi[-1] == fact.dim and fact.dim not in in_batch:
            # outer axes merged in front of the tokens (``x.flatten(0, 1)``): tokens stay in order
            # within each outer index; a later reshape must split exactly these axes off again
            lead = tuple((in_shape[d], d in in_batch) for d in gi[:-1])
            batch = set(fact.batch) | ({go[0]} if any(is_batch for _, is_batch in lead) else set())
            return _step(replace(fact, dim=go[0], lead=lead, batch=tuple(sorted(batch))), name)
        return None
    groups_of = [owner.get(d) for d in fact.axes]
    if any(g is None for g in groups_of):
        return None
    if all(g is groups_of[0] for g in groups_of):  # every image axis merges into one sequence axis
        gi, go = groups_of[0]
        if len(go) == 1 and sorted(gi) != sorted(fact.axes):
            return _frames_in_front(fact, gi, go[0], in_shape, in_batch, name)
        if len(go) != 1 or sorted(gi) != sorted(fact.axes):
            return None
        order = tuple(sorted(range(fact.rank), key=lambda i: fact.axes[i]))
        return _step(Tokens(go[0], 0, fact.sizes, 0, order, fact.origin, fact.trail, fact.image, fact.batch,
                            source=fact.source, marked=fact.marked), name)
    if len({id(g) for g in groups_of}) != fact.rank or any(len(g[0]) != 1 for g in groups_of):
        return None  # some image axes merged with each other or with other axes
    axes = tuple(g[1][0] for g in groups_of)
    if all(len(g[1]) == 1 for g in groups_of):
        return _step(replace(fact, axes=axes), name)
    # Patchify (Flux's _pack_latents, pixel-unshuffle spelled as view/permute, a video's p_t x p x p
    # patches): rows split into (H/p, p) are read as the rows of the H/p x W/q grid of p x q patches.
    # Only the *outer* factor indexes patches (row r = outer * p + inner); the inner factors become
    # per-token feature axes, which the fact does not track, so merging them into the feature axis
    # keeps the fact and merging them back into rows or columns drops it (the group then has more
    # than one input axis).
    sizes = tuple(out_shape[g[1][0]] if len(g[1]) > 1 else n for g, n in zip(groups_of, fact.sizes))
    return _step(replace(fact, axes=axes, sizes=sizes), name + " (patchify)")


def _frames_behind(fact: Tokens, inner: list, dim: int, name: str):
    """Frames merged *behind* each token (TimeSformer's divided space-time:
    ``x.view(B, N, T, C).reshape(B, N * T, C)``): token ``n * T + f`` is frame ``f`` of position
    ``n``, a T x H x W video stored with time fastest, when those axes are frames
    (layout/facts.py _frame_count); anything else mixes tokens of different images."""
    frames = _frame_count(fact, inner)
    if frames is None:
        return None
    video = replace(fact, dim=dim, image_shape=(frames, *fact.image_shape),
                    order=(*(a + 1 for a in fact.order), 0), image=fact.image + (("frames", frames),))
    return _step(video, name + " (frames behind tokens)")


def _frames_in_front(fact: Spatial, gi: list, dim: int, in_shape, in_batch, name: str):
    """Frames (an axis indexing images) merged with rows and columns into one sequence axis, in
    front of them (EasyAnimate: a Conv2d over frames folded into the batch, then
    ``x.unflatten(0, (B, T)).permute(0, 2, 1, 3, 4).flatten(2, 4)``): a T x H x W video, time
    slowest, when that axis holds frames (layout/facts.py _frame_count); anything else mixes
    images' tokens."""
    extra = [d for d in gi if d not in fact.axes]
    frames = _frame_count(fact, [(in_shape[d], d in in_batch) for d in extra])
    if frames is None or len(extra) != 1 or extra[0] > min(fact.axes):
        return None
    order = tuple(sorted(range(fact.rank), key=lambda i: fact.axes[i]))
    batch = tuple(b for b in fact.batch if b != dim)  # (already output axes: the frames went into ``dim``)
    return _step(Tokens(dim, 0, (frames, *fact.sizes), 0, (0, *(a + 1 for a in order)), fact.origin, fact.trail,
                        fact.image + (("frames", frames),), batch, source=fact.source, marked=fact.marked),
                 name + " (frames in front)")


def _frames_folded(fact: Spatial, owner: dict) -> Spatial:
    """A video whose frame axis a reshape merges with batch axes only (``x.permute(0, 2, 1, 3, 4)
    .reshape(B * T, C, H, W)``), or whose rows and columns merge into tokens without it
    (``x.flatten(3)``: (B, C, T, H * W)): from here on, every frame is an image of its own, indexed
    along the frame axis. The frame axis becomes a batch axis of the same images (one per frame),
    before the batch is reshaped."""
    frames, rows, cols = fact.axes
    gi, go = owner.get(frames, (None, None))
    if gi is None:
        return fact
    merged_with_batch = len(gi) >= 2 and all(d == frames or d in fact.batch for d in gi)
    frame_tokens = (gi == [frames] and len(go) == 1 and owner.get(rows) is not None
                    and owner.get(rows) is owner.get(cols) and len(owner[rows][1]) == 1)
    if not (merged_with_batch or frame_tokens):
        return fact
    return replace(fact, axes=fact.axes[1:], sizes=fact.sizes[1:], batch=tuple(sorted({*fact.batch, frames})),
                   image=fact.image + (("frames folded", _hint(fact.sizes[0])),))


def _reshape_images(fact, groups, in_shape, out_shape, owner):
    """Carry a fact's image axes through a reshape (its image axes only; the caller maps the rest).

    An image axis kept whole moves; any other group holding an image axis (images merged with
    each other or with heads, or split) makes all its output axes image axes and is recorded in
    the identity, so two tensors agree on their image per index only if reshaped alike.
    """
    batch, records = set(), []
    for b in fact.batch:
        if b not in owner:
            if _hint(in_shape[b]) != 1:
                return None
            continue  # a single image along this axis: nothing to track
        gi, go = owner[b]
        if isinstance(fact, Tokens) and fact.dim in gi:
            continue  # merged with the tokens: _reshape keeps it in ``lead``
        batch.update(go)
        if len(gi) != 1 or len(go) != 1:
            record = ("reshape", tuple((_hint(in_shape[d]), d in fact.batch) for d in gi),
                      tuple(_hint(out_shape[d]) for d in go))
            if record not in records:
                records.append(record)
    return replace(fact, batch=tuple(sorted(batch)), image=fact.image + tuple(records))


def _reshape_lead(fact, gi, go, out_shape, name):
    """Split the outer axes merged into a token axis off again (``bn(x.flatten(0, 1)).reshape_as(x)``)."""
    if gi != [fact.dim]:
        return None
    any_batch = any(is_batch for _, is_batch in fact.lead)
    if len(go) == 1:  # still merged
        batch = set(fact.batch) | ({go[0]} if any_batch else set())
        return _step(replace(fact, dim=go[0], batch=tuple(sorted(batch))), name)
    outer = [(size, is_batch) for size, is_batch in fact.lead if _hint(size) != 1]
    if len(go) != len(outer) + 1 or [_hint(out_shape[d]) for d in go[:-1]] != [_hint(size) for size, _ in outer]:
        return None
    batch = set(fact.batch) | {d for d, (_, is_batch) in zip(go[:-1], outer) if is_batch}
    return _step(replace(fact, dim=go[-1], lead=(), batch=tuple(sorted(batch))), name)


def _broadcast(fact, in_shape, out_shape, name):
    shift = len(out_shape) - len(in_shape)
    moved = _shift(fact, shift)
    if any(not _same_size(in_shape[d - shift], out_shape[d]) for d in moved.dims()):
        return None
    return _step(moved, name)


def full_index(index, ndim: int) -> tuple:
    """A basic index with its (first) Ellipsis expanded and the trailing axes it leaves out given
    as full slices; ``None`` entries (new axes) stay where they are."""
    index = index if isinstance(index, tuple) else (index,)
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (ndim - consumed) + index[at + 1:]
    return index + (slice(None),) * (ndim - sum(1 for i in index if i is not None))


def _index(fact, shape, index, selector: str = ""):
    """``x[index]`` for basic indexing (ints, slices, None, Ellipsis); ``selector`` names the op,
    recorded in the image identity when it picks along an image axis."""
    if not isinstance(index, tuple):
        index = (index,)
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice, torch.SymInt))) for i in index):
        return None  # advanced indexing can reorder tokens
    index = full_index(index, len(shape))
    mapping, sizes, in_d, out_d = {}, {}, 0, 0
    picks = False
    for item in index:
        if item is None:
            out_d += 1
            continue
        if isinstance(item, slice):
            mapping[in_d] = out_d
            sizes[in_d] = item
            out_d += 1
        if in_d in fact.batch and _hint(shape[in_d]) != 1 and not _is_full(item, shape[in_d]):
            picks = True
        in_d += 1
    fact = _remap(fact, mapping)
    if fact is None:
        return None
    if picks:  # some of the images, not all: a different identity
        fact = replace(fact, image=fact.image + (("select", selector),))
    inverse = {v: k for k, v in mapping.items()}
    for d in fact.dims():
        fact = _slice(fact, d, sizes[inverse[d]], shape[inverse[d]])
        if fact is None:
            return None
    return _step(fact, "getitem")


def _is_full(item, length) -> bool:
    """Whether ``item`` keeps a whole axis: provably so when a bound or the length is symbolic
    (matching traced values would let a batch selection keep its image identity)."""
    if not isinstance(item, slice):
        return False
    if any(isinstance(x, torch.SymInt) for x in (item.start, item.stop, item.step, length)):
        return (item.step in (None, 1) and (item.start is None or known_true(item.start == 0))
                and (item.stop is None or known_true(item.stop >= length)))
    n = _hint(length)
    bounds = [_hint(x) if x is not None else None for x in (item.start, item.stop, item.step)]
    if n is None or any(b is None and raw is not None for b, raw in zip(bounds, (item.start, item.stop, item.step))):
        return False
    return slice(*bounds).indices(n) == (0, n, 1)


def _slice(fact, dim, sl: slice, length):
    if any(isinstance(x, torch.SymInt) for x in (sl.start, sl.stop, sl.step, length)):
        return _slice_symbolic(fact, dim, sl, length)
    n = _hint(length)
    start, stop, step = (_hint(x) if x is not None else None for x in (sl.start, sl.stop, sl.step))
    if any(x is None for x, raw in zip((start, stop, step), (sl.start, sl.stop, sl.step)) if raw is not None):
        return None
    start, stop, step = slice(start, stop, step).indices(n)
    if (start, stop, step) == (0, n, 1):
        return fact
    if isinstance(fact, Spatial):
        # A crop of rows or columns is still a grid, and so is every step-th row or column
        # (LeViT's subsampling ``x.view(B, H, W, C)[:, ::2, ::2]``): a smaller image of its own.
        return _resized(fact, dim, len(range(start, stop, step)))
    if fact.lead:
        fact = _frames_merged(fact)
    if step != 1 or fact.lead or fact.shard:
        return None
    first, end = _hint(fact.prefix), _hint(fact.prefix) + _hint(fact.image_tokens)
    if start <= first and stop >= end:
        return replace(fact, prefix=fact.prefix - start, suffix=fact.suffix - (n - stop))
    if stop <= first or start >= end:
        return None  # only non-image tokens
    return _chunk_of(fact, start, stop, n)  # cuts through the image: a rank's chunk, or nothing


def _chunk_of(fact: Tokens, start: int, stop: int, n: int) -> Tokens | None:
    """``x.chunk(P, dim)[i]`` of a whole sequence that cuts through its image: one of P equal
    contiguous chunks, a rank's share under context parallelism (layout/collectives.py). Only an
    all-to-all that gathers the chunks back in order makes it a sequence again."""
    size = stop - start
    if size <= 0 or size == n or n % size or start % size:
        return None
    return replace(fact, shard=(start // size, n // size))


def _resized(fact: Spatial, dim: int, size):
    """A crop (or every step-th entry) of the image axis on tensor axis ``dim``: a smaller image."""
    sizes = tuple(size if d == dim else n for d, n in zip(fact.axes, fact.sizes))
    return replace(fact, sizes=sizes)


def _slice_symbolic(fact, dim, sl: slice, length):
    """:func:`_slice` when a bound or the axis length is symbolic: only provable effects count."""
    if sl.step not in (None, 1):
        return None
    start = 0 if sl.start is None else sl.start
    stop = length if sl.stop is None or (isinstance(sl.stop, int) and sl.stop >= 2 ** 62) else sl.stop
    start = start + length if isinstance(start, int) and start < 0 else start
    stop = stop + length if isinstance(stop, int) and stop < 0 else stop
    if not (known_true(start >= 0) and known_true(start <= stop) and known_true(stop <= length)):
        return None
    if known_true(start == 0) and known_true(stop == length):
        return fact
    if isinstance(fact, Spatial):
        return _resized(fact, dim, stop - start)
    if known_true(start <= fact.prefix) and known_true(stop >= fact.prefix + fact.image_tokens):
        return replace(fact, prefix=fact.prefix - start, suffix=fact.suffix - (length - stop))
    return None

"""Token-layout inference: prove, from the graph's own dataflow, which tensor axes are images.

A forward abstract interpretation over the graph. Spatial tensors are *born* at conv / pool /
interpolate outputs (NCHW: rows on axis 2, columns on axis 3; NCTHW for a video: frames on axis 2,
from a Conv3d or a 3-D pool) and at a patchify of an NCHW / NCTHW model input
(:meth:`LayoutAnalysis._patchified_input`). Every op that moves axes
around (permute, reshape, flatten, cat, slicing, split, ...) or keeps positions in place
(pointwise ops, linear, norms, attention itself) carries the fact to its output; any op we do not
understand drops it. A site's layout is therefore proven exactly when an unbroken chain of
understood ops connects it to a spatial source; the sequence *length* alone never proves anything.

Two kinds of fact:

* :class:`Spatial` - one tensor axis per image axis (``axes``: rows and columns, or frames, rows
  and columns), e.g. NCHW, NHWC or NCTHW.
* :class:`Tokens` - one sequence axis ``dim`` holding ``prefix`` tokens, then the N-D image in the
  storage ``order`` of its axes (identity: row-major, time slowest), then ``suffix`` tokens.

Both are rank-generic (an image is the N = 2 case, a video T x H x W the N = 3 one). A video axis
of size 1 is dropped wherever a fact is made (:func:`_step`): a single-frame video *is* its image,
and no token's position depends on that axis. Frames folded into the batch (a Conv3d output
reshaped to (B * T, C, H, W), or a 2-D conv run on ``video.reshape(-1, C, H, W)``) are images along
a batch axis; merged back in front of their tokens (``x.view(B, T, N, C).flatten(1, 2)``) they are a
T x H x W video on the sequence axis (:func:`_frames_merged`).

Every fact also says *which image* its positions belong to (``image``: a root named by the tensor a
spatial source read, plus a record of every selection, reordering or merge along the axes that
index images, the ``batch`` axes) so that a site attends within one image only when its queries
and keys provably come from the same one (or a reduction of it, as SegFormer's strided-conv keys):
two images of a batch split apart (feature matching) keep different identities. Any write into a
tensor on the provenance path (``copy_``, ``index_copy_``, ``x[i] = y``; only in-place pointwise
ops keep positions) breaks the proof for every alias of that tensor.

Sizes are kept as the graph gives them (``int`` or ``torch.SymInt``); wherever a transfer function
compares symbolic sizes it needs the equality proven through the ShapeEnv (:func:`_same_size`), never
matched by the values the sizes were traced with.
"""

from __future__ import annotations

import operator
from collections import deque
from dataclasses import replace

import torch
import torch.fx as fx

from ..grid import TokenLayout
from ..ir.module_paths import module_path
from ..ir.op_catalogue import (
    ATTRIBUTE,
    BROADCAST,
    CAST,
    CAT,
    CHANNEL_NORM,
    FEATURES,
    IDENTITY,
    IM2COL,
    INDEX,
    KEEPDIM_REDUCTION,
    NARROW,
    OUTER,
    PAD,
    PERMUTE,
    POINTWISE,
    POOL1D,
    PRODUCT,
    REPEAT,
    RESHAPE,
    RESHAPES,
    SELECT,
    SOFTMAX,
    SPLIT,
    STACK,
    TEMPLATE_READS,
    TILE,
    arg,
    narrowed,
    permutation,
    resolve,
    rule,
    source_rank,
    split_dim,
)
from ..ir.ops import mutates, op_name, written_args
from ..ir.values import shape_of as _shape
from ..ir.values import value_of as _val
from .collectives import Scattered, dtensor_step, follow_node, gathered, movement_name, scatter
from .facts import (
    LayoutSource,
    Loss,
    Spatial,
    Tokens,
    _frames_merged,
    _hint,
    _image_text,
    _image_text_sizes,
    _merge,
    _positions,
    _remap,
    _same_size,
    _shift,
    _static,
    _step,
    _trail_text,
    layout_source,
)
from .fills import Fills
from .mutation import _alias_closure, _feature_fills, _slice_writes, _token_fills, _written_tensors
from .patches import Patches
from .positions import coordinate_grid
from .reshape import _broadcast, _index, _normalized_shape, _permute, _reshape

__all__ = ["LayoutAnalysis", "LayoutSource", "Spatial", "Tokens", "layout_source"]


_LOSS_HINTS = {
    **{v: "a reshape that splits or merges the image axes, e.g. into windows" for v in RESHAPES},
    "getitem": "indexing that drops or reorders image tokens",
    "cat": "concatenation of two image layouts",
    "pad": "padding of the image axes, e.g. to a multiple of the window size",
}


# --- the analysis -----------------------------------------------------------------------------

class LayoutAnalysis(Fills, Patches):
    """Runs once over a graph; then answers :meth:`layout` for any node and sequence axis.

    ``attention_outputs`` maps each attention site's output node to (query node, its sequence
    axis): the output carries the query's token layout on the same axis. ``inherited`` gives facts
    for placeholders proven in an earlier piece of the same split graph (crossgraph/split_handoff.py).
    ``hints`` gives facts that prepare() remembered or the user declared for a node
    (crossgraph/hints.py): a node the graph proves by itself keeps its proof when the two agree
    and gets no fact when they differ; ``hint_conflicts`` names nodes whose hints disagreed.
    ``positions`` gives facts for placeholders whose values list token coordinates
    (layout/positions.py), ``handed`` for placeholders an earlier graph returned
    (crossgraph/break_handoff.py), both for a caller that checks them at every call.
    """

    def __init__(self, gm: fx.GraphModule, attention_outputs: dict[fx.Node, tuple[fx.Node, int]],
                 inherited: dict[fx.Node, object] | None = None, hints: dict[fx.Node, object] | None = None,
                 hint_conflicts: dict[fx.Node, str] | None = None, positions: dict[fx.Node, object] | None = None,
                 handed: dict[fx.Node, object] | None = None):
        self.gm = gm
        self.positions = positions or {}
        self.handed = handed or {}
        self.attention_outputs = attention_outputs
        self.inherited = inherited or {}
        self.hints = hints or {}
        self.hint_conflicts = dict(hint_conflicts or {})
        self.fills = _feature_fills(gm)
        self.token_fills = _token_fills(gm, self.fills)
        fill_writes = {w for fills in (self.fills, self.token_fills) for writes in fills.values() for w in writes}
        self.slice_writes = [w for w in _slice_writes(gm) if w not in fill_writes]
        self.written = _written_tensors(gm, skip=fill_writes | set(self.slice_writes))
        self._run()
        while True:
            # An in-place pointwise op keeps positions only if it adds nothing laid out differently
            # (``x.add_(x.transpose(1, 2))`` would not): where its own fact is lost, so is its target's.
            bad = {dest: node for node in gm.graph.nodes if node in self._inplace_pointwise
                   and self.facts.get(node) is None
                   for dest in written_args(node) if self.facts.get(dest) is not None}
            bad.update(self._unproven_slice_writes())
            if not bad:
                break
            self.written.update(_alias_closure(gm, bad, self.written))
            self._run()

    def _unproven_slice_writes(self) -> dict[fx.Node, fx.Node]:
        """The basic-index writes (:func:`_slice_writes`) whose value is not laid out as the part of
        the tensor it overwrites (or whose tensor has no fact to compare with), not yet counted."""
        bad = {}
        for write in self.slice_writes:
            dest, index, value = write.args
            if dest in self.written:
                continue
            target, laid = self.facts.get(dest), self.facts.get(value)
            part = _index(target, _shape(dest), resolve(index), write.name) if target is not None else None
            if part is None or laid is None or _positions(part) != _positions(laid) or part.image != laid.image:
                bad[dest] = write
        return bad

    def _run(self):
        self.facts: dict[fx.Node, object] = {}
        self.lost: dict[fx.Node, Loss] = {n: Loss("layout_hint", why) for n, why in self.hint_conflicts.items()}
        self._inplace_pointwise = set()
        self._why: dict[fx.Node, str] = {}   # a transfer's own account of why it lost a fact
        self._fill_of = {w: fresh for fresh, writes in self.fills.items() for w in writes}
        self._token_fill_of = {writes[-1]: fresh for fresh, writes in self.token_fills.items()}
        self._fill_failed = set()
        self.scattered: dict[fx.Node, Scattered] = {}   # tokens spread over axes around a collective
        for node in self.gm.graph.nodes:
            try:
                fact = self._transfer(node)
            except Exception:  # an op we mis-read must never become a wrong proof
                fact = None
            if node in self.hints:
                fact = self._with_hint(node, fact)
            if node in self._fill_of:
                self._fill(node)
            if node in self._token_fill_of:
                self._token_fill(self._token_fill_of[node])
            writer = self.written.get(node)
            if writer is not None:
                if fact is not None:  # the write, not the op, is what loses this layout
                    op = str(op_name(writer, self.gm) or writer.target)
                    self.lost[node] = Loss(op, f"in-place {op} `{writer.name}` (a write into this tensor or a "
                                               "view of it can move its tokens)")
                fact = None
            if fact is not None:
                self.facts[node] = fact
            elif node not in self.lost and node not in self.attention_outputs and isinstance(
                    _val(node), torch.Tensor) and any(self.facts.get(a) is not None for a in _data_inputs(node, self.gm)):
                name = op_name(node, self.gm)
                why = self._why.get(node) or _LOSS_HINTS.get(name, "")
                self.lost[node] = Loss(str(name or node.target),
                                       f"{name or node.target} `{node.name}`" + (f" ({why})" if why else ""))

    def _with_hint(self, node: fx.Node, proven):
        hint = self.hints[node]
        if proven is None:
            shape = _shape(node)
            if shape is None or any(d >= len(shape) for d in hint.dims()):
                self.lost[node] = Loss("layout_hint", f"{hint.origin} does not fit `{node.name}` of shape {shape}")
                return None
            if isinstance(hint, Tokens) and _hint(shape[hint.dim]) != _hint(hint.prefix + hint.image_tokens + hint.suffix):
                self.lost[node] = Loss("layout_hint", f"{hint.origin}: {hint.prefix}+{_image_text_sizes(hint.image_shape)}"
                                                      f"+{hint.suffix} tokens do not match `{node.name}`'s {shape[hint.dim]}")
                return None
            if isinstance(hint, Spatial) and tuple(_hint(shape[d]) for d in hint.axes) != tuple(
                    _hint(n) for n in hint.sizes):
                self.lost[node] = Loss("layout_hint", f"{hint.origin}: {_image_text_sizes(hint.sizes)} does not match "
                                                      f"`{node.name}` {shape}")
                return None
            return hint
        if _positions(proven) == _positions(hint):
            return proven  # the graph proves it by itself: report it as proven here
        self.lost[node] = Loss("layout_hint", f"{hint.origin} contradicts this graph's proof ({proven.origin}) at "
                                              f"`{node.name}`")
        return None

    # -- queries --------------------------------------------------------------------------------
    def layout(self, node: fx.Node, seq_dim: int) -> tuple[TokenLayout | None, str]:
        """The proven layout of ``node``'s axis ``seq_dim`` and the evidence, or None and why not."""
        fact = self.facts.get(node)
        shape = _shape(node)
        if shape is None:
            return None, "not a tensor"
        seq_dim = seq_dim % len(shape)
        if isinstance(fact, Tokens) and fact.dim == seq_dim and fact.lead:
            fact = _frames_merged(fact)
            if fact.lead:
                return None, f"image tokens merged with the batch axis ({fact.origin} via {_trail_text(fact.trail)})"
        if isinstance(fact, Tokens) and fact.dim == seq_dim and fact.groups and not fact.shard:
            return None, (f"tokens in grid-group order ({fact.origin}): attention here is either gridded on each "
                          "rank's own groups (grid-group sharding) or dense, which is exact in any token order")
        if isinstance(fact, Tokens) and fact.dim == seq_dim and fact.shard:
            index, count = fact.shard
            return None, (f"this rank holds chunk {index} of {count} of the sequence ({fact.origin}): attention "
                          "over a chunk, as in ring attention, is not attention within the image's grid groups; "
                          "use Ulysses (ulysses_degree) instead of ring_degree")
        if isinstance(fact, Tokens) and fact.dim == seq_dim:
            # Symbolic sizes stay SymInts: the policy and the rewrite decide on them through the
            # ShapeEnv (guards), never on the values they were traced with.
            raw = (fact.prefix, *fact.image_shape, fact.suffix)
            sizes = [s if _static(s) is None else _static(s) for s in raw]
            if any(not isinstance(s, (int, torch.SymInt)) for s in sizes):
                return None, f"image size {_image_text_sizes(fact.image_shape)} is not an integer"
            evidence = f"{fact.origin} via {_trail_text(fact.trail)}"
            return TokenLayout(sizes[0], image_shape=tuple(sizes[1:-1]), suffix=sizes[-1], order=fact.order), evidence
        if fact is not None and seq_dim in fact.batch:
            # divided space-time attention's temporal half: image positions folded into the batch
            return None, (f"temporal attention: the sequence axis indexes frames at one image position (the "
                          f"image runs along axes {fact.dims()}); only attention within an image is gridded")
        if fact is not None:
            # e.g. window partitioning: the window grid is enumerated along the batch axis (a
            # 1-image batch drops out of the reshape), the sequence holds one window's tokens
            return None, (f"no proven image layout on the sequence axis: the image runs along "
                          f"{type(fact).__name__.lower()} axes {fact.dims()} instead (e.g. windows or "
                          "patches enumerated outside the attention's sequence)")
        return None, "no proven image layout: " + self._why_not(node)

    def rank_chunk(self, node: fx.Node) -> bool:
        """Whether ``node`` holds only this rank's chunk of its token sequence."""
        fact = self.facts.get(node)
        return isinstance(fact, Tokens) and bool(fact.shard)

    def rank_partial(self, node: fx.Node) -> bool:
        """Whether ``node`` holds only this rank's block of its heads (between Ulysses' all-to-alls)."""
        fact = self.facts.get(node)
        return isinstance(fact, Tokens) and fact.partial

    def _why_not(self, node: fx.Node) -> str:
        loss = self._loss(node)
        if loss is None:
            return "no spatial source (conv/pool/interpolate output, patchified model input) reaches it"
        src = next((self.facts[a] for a in loss.all_input_nodes if a in self.facts), None)
        origin = f" (from {src.origin})" if src is not None else ""
        return f"image layout{origin} lost at {self.lost[loss].text}"

    def _loss(self, node: fx.Node) -> fx.Node | None:
        """The nearest node upstream of ``node`` at which an image layout was lost, if any."""
        seen, queue = {node}, deque([node])
        while queue and len(seen) < 5000:
            cur = queue.popleft()
            if cur in self.lost:
                return cur
            # An attention output's positions are its query's: only that lineage explains them.
            inputs = [self.attention_outputs[cur][0]] if cur in self.attention_outputs else _data_inputs(cur, self.gm)
            for a in inputs:
                if a not in seen:
                    seen.add(a)
                    queue.append(a)
        return None

    def lost_at(self, node: fx.Node) -> str | None:
        """The op at which the image layout reaching ``node`` was lost; None when no layout was lost
        on the way (no spatial source reaches it, or it has a layout)."""
        if node in self.facts:
            return None
        loss = self._loss(node)
        return None if loss is None else self.lost[loss].op

    def writer_of(self, node: fx.Node) -> fx.Node | None:
        """The in-place op that writes into ``node``'s tensor or an alias of it in a way that can
        move values between positions, if any (in-place pointwise ops are not such writes)."""
        return self.written.get(node)

    def same_image(self, query: fx.Node, key: fx.Node) -> str | None:
        """None when, for every attention batch index, the query's and the key's tokens provably
        come from the same image (or a reduction of it); otherwise why not. Both must carry facts."""
        fq, fk = self.facts.get(query), self.facts.get(key)
        if fq is None or fk is None:
            return "no proven image on one side"
        # Frames merged in front of their tokens are read as the video where the layout is read
        # (:meth:`layout`), and already merged where tokens were glued on (a cat): compare the two
        # sides as the videos they are, whichever side merged them first.
        fq, fk = (_frames_merged(f) if isinstance(f, Tokens) and f.lead else f for f in (fq, fk))
        if fq.image != fk.image:
            q_text, k_text = _image_text(fq.image), _image_text(fk.image)
            if q_text == k_text:
                k_text += " (arranged differently)"
            return (f"cross-attention between two different images: queries from {q_text}, "
                    f"keys from {k_text} (the grid applies only within one image)")
        q_shape, k_shape = _shape(query), _shape(key)
        for back in range(1, max(len(q_shape), len(k_shape)) + 1):
            sides = []
            for fact, shape in ((fq, q_shape), (fk, k_shape)):
                axis = len(shape) - back
                size = _hint(shape[axis]) if axis >= 0 else 1
                sides.append((axis >= 0 and axis in fact.batch and size != 1, size))
            (q_batch, q_size), (k_batch, k_size) = sides
            if (q_batch or k_batch) and (q_batch, q_size) != (k_batch, k_size):
                return (f"queries and keys index their images differently (axis -{back}: {q_size} "
                        f"{'images' if q_batch else 'non-image entries'} vs {k_size} "
                        f"{'images' if k_batch else 'non-image entries'}): not provably the same image")
        return None

    # -- transfer functions ---------------------------------------------------------------------
    def _transfer(self, node: fx.Node):
        fact = self._transfer_op(node)
        if node.op in ("call_function", "call_method"):
            split = {a: f for a in _data_inputs(node, self.gm) if _split_fact(f := self.facts.get(a))}
            if split and not _keeps_positions(list(split.values()), fact):
                # A rank's share of the tokens (or of the heads, or tokens in grid-group order) passes
                # only through ops that keep every token where it is. Any other op reads those
                # inputs as carrying no layout, as it did before such facts existed (a slice of
                # tokens appended to the sequence is just more tokens).
                for a in split:
                    del self.facts[a]
                try:
                    fact = self._transfer_op(node)
                finally:
                    self.facts.update(split)
                if fact is None:
                    self._why[node] = "an op on one rank's share of the tokens that moves them"
            gathered_fact = self._through_collectives(node)
            if fact is None:
                fact = gathered_fact
            if fact is None and node.args and isinstance(node.args[0], fx.Node):
                step = dtensor_step(node, self.facts.get(node.args[0]))
                fact = _step(step, node.target if node.op == "call_method" else "from_local") if step else None
        return fact

    def _through_collectives(self, node: fx.Node):
        """Views and collectives between a rank's chunk of tokens and the gathered sequence, or a
        grid-group order (layout/collectives.py): a Tokens fact once the tokens sit on one axis
        again. Followed beside the ordinary rules: a view they read as image axes may be the
        first step of such a chain."""
        if movement_name(node, self.gm) is None or not isinstance(_val(node), torch.Tensor):
            return None
        src = node.args[0]
        spread = self.scattered.get(src)
        if spread is None and isinstance(self.facts.get(src), Tokens):
            spread = scatter(self.facts[src], _shape(src))
        out = follow_node(spread, node, self.gm) if spread is not None else None
        if out is None:
            return None
        tokens = gathered(out)
        if tokens is not None:
            return _step(tokens, movement_name(node, self.gm))
        self.scattered[node] = out
        return None

    def _transfer_op(self, node: fx.Node):
        if node.op == "placeholder":
            for facts, how in ((self.inherited, "DDP bucket split"), (self.handed, "graph break")):
                if facts.get(node) is not None:
                    return _step(replace(facts[node], source=LayoutSource.HANDED_OVER), how)
            return self.positions.get(node)
        if node.op not in ("call_function", "call_method", "call_module"):
            return None
        if node in self.attention_outputs:
            # Attention keeps the query's token positions (rewritten or not: grid recovering
            # puts every output token back in place).
            query, query_dim = self.attention_outputs[node]
            fact = self.facts.get(query)
            seq = query_dim % len(_shape(query))
            on_seq_axis = isinstance(fact, Tokens) and fact.dim == seq
            same_rank = _shape(node) is not None and len(_shape(node)) == len(_shape(query))
            # Attention along an axis that indexes images (the temporal half of divided space-time
            # attention: frames) mixes values across frames at each position and moves none.
            across_images = (fact is not None and seq in fact.batch and same_rank and all(
                _same_size(_shape(node)[d], _shape(query)[d]) for d in (*fact.dims(), *fact.batch)))
            return _step(fact, "attention") if (on_seq_axis and same_rank) or across_images else None
        if node.op == "call_function" and node.target is operator.getitem and not isinstance(_val(node.args[0]), torch.Tensor):
            pieces = self.facts.get(node.args[0])
            return pieces[node.args[1]] if isinstance(pieces, tuple) else None
        name = op_name(node, self.gm)
        if name is None:
            return None
        if name == "meshgrid":
            return coordinate_grid(node, self.gm)
        out = _val(node)
        rank = source_rank(name, out.dim()) if isinstance(out, torch.Tensor) else None
        if rank is not None:  # (N, C, *image): an image (rank 2) or a video T x H x W (rank 3)
            image = self._source_image(node)
            return _step(Spatial(tuple(range(2, 2 + rank)), tuple(out.shape[2:]), origin=self._source_text(node, name, out),
                                 image=image, batch=(0,)), name)
        op_rule = rule(name)
        transfer = _TRANSFERS.get(op_rule.kind) if op_rule is not None else None
        if transfer is None:
            return None
        inp = node.args[0] if node.args else None
        fact = self.facts.get(inp) if isinstance(inp, fx.Node) else None
        if fact is None and op_rule.kind == RESHAPE:
            return self._patchified_input(node, name, inp, out)
        if fact is None and op_rule.kind == IM2COL:
            return self._im2col(node, name, None, out)
        if fact is None and op_rule.kind not in _FROM_SEVERAL_INPUTS:
            return None
        return transfer(self, node, name, fact, out)

    def _attribute(self, node, name, fact, out):
        if node.args[1] not in ("mT", "T"):
            return None
        ndim = len(_shape(node.args[0]))
        perm = list(range(ndim))[::-1] if node.args[1] == "T" else list(range(ndim - 2)) + [ndim - 1, ndim - 2]
        return _permute(fact, perm, node.args[1])

    def _keepdim_reduction(self, node, name, fact, out):
        dims = resolve(arg(node, 1, "dim"))
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        keepdim = arg(node, 2, "keepdim", False)
        reduced = {d % out.dim() for d in dims}
        kept = not reduced & (set(fact.dims()) | set(fact.batch))
        return _step(fact, name) if dims and keepdim is True and kept else None

    def _softmax(self, node, name, fact, out):
        dim = arg(node, 1, "dim")
        ok = isinstance(dim, int) and dim % out.dim() not in (*fact.dims(), *fact.batch)
        return _step(fact, name) if ok else None

    def _reshape_op(self, node, name, fact, out):
        return _reshape(fact, _shape(node.args[0]), tuple(out.shape), name)

    def _permute_op(self, node, name, fact, out):
        return _permute(fact, permutation(node, name, len(_shape(node.args[0]))), name)

    def _features(self, node, name, fact, out):
        n_last = len(_normalized_shape(node, self.gm)) if name != "linear" else 1
        ndim = len(_shape(node.args[0]))
        return _step(fact, name) if all(d < ndim - n_last for d in (*fact.dims(), *fact.batch)) else None

    def _getitem(self, node, name, fact, out):
        return _index(fact, _shape(node.args[0]), resolve(node.args[1]), node.name)

    def _select(self, node, name, fact, out):
        shape = _shape(node.args[0])
        dim, index = resolve(arg(node, 1, "dim")), resolve(arg(node, 2, "index"))
        idx = [slice(None)] * (dim % len(shape)) + [index]
        return _index(fact, shape, tuple(idx), node.name)

    def _repeat(self, node, name, fact, out):
        """Along a batch-like axis (SAM repeats images per prompt)."""
        dim = resolve(arg(node, 2, "dim"))
        ndim = len(_shape(node.args[0]))
        ok = isinstance(dim, int) and dim % ndim not in fact.dims() and len(out.shape) == ndim
        if ok and dim % ndim in fact.batch:  # each image repeated: a new arrangement of images
            fact = replace(fact, image=fact.image + (("repeat", node.name),))
        return _step(fact, name) if ok else None

    def _tile(self, node, name, fact, out):
        """``x.repeat(r0, r1, ...)``: positions stay where they are along every axis repeated once;
        an axis that indexes images, repeated, is a new arrangement of them (as :meth:`_repeat`)."""
        sizes = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (list, tuple)) else node.args[1]
        sizes = resolve(list(sizes))
        ndim = len(_shape(node.args[0]))
        if not all(isinstance(r, int) for r in sizes) or len(sizes) < ndim:
            return None
        fact = _shift(fact, len(sizes) - ndim)
        if any(sizes[d] != 1 for d in fact.dims()):
            return None
        if any(sizes[d] != 1 for d in fact.batch):
            fact = replace(fact, image=fact.image + (("repeat", node.name),))
        return _step(fact, name)

    def _broadcast_op(self, node, name, fact, out):
        return _broadcast(fact, _shape(node.args[0]), tuple(out.shape), name)

    def _pad(self, node, name, fact, out):
        pads = resolve(arg(node, 1, "pad"))
        ndim = len(_shape(node.args[0]))
        touched = {ndim - 1 - i // 2 for i, p in enumerate(pads) if p != 0}
        return _step(fact, name) if not touched & (set(fact.dims()) | set(fact.batch)) else None

    def _product(self, node, name, fact, out):
        """``x @ W`` with a 2-D right operand that carries no layout: a per-token linear map."""
        other = _val(node.args[1]) if len(node.args) > 1 else None
        if isinstance(other, torch.Tensor) and other.dim() == 2 and self.facts.get(node.args[1]) is None:
            ndim = len(_shape(node.args[0]))
            return _step(fact, name) if all(d < ndim - 1 for d in (*fact.dims(), *fact.batch)) else None
        return None

    def _outer(self, node, name, fact, out):
        """``outer(positions, freqs)``: row i of the table belongs to position i."""
        other = node.args[1] if len(node.args) > 1 else None
        if isinstance(other, fx.Node) and self.facts.get(other) is not None:
            return None
        return _step(fact, name) if fact.dims() == (0,) and not fact.batch else None

    def _source_image(self, node) -> tuple:
        """The image a spatial source's output shows: its input's when that input is already an
        NCHW image (a strided conv / pool / resize of it is a reduction of the same image),
        otherwise a new image named by the tensor it reads (two convs of one tensor see one image)."""
        inp = node.args[0] if node.args else None
        fact = self.facts.get(inp) if isinstance(inp, fx.Node) else None
        ndim = len(_shape(inp) or ())
        if isinstance(fact, Spatial) and fact.dims() == tuple(range(ndim - fact.rank, ndim)) and ndim - fact.rank >= 2:
            n = _shape(inp)[0]
            if fact.batch == (0,) or (not fact.batch and _hint(n) == 1):
                return fact.image
        read = inp if isinstance(inp, fx.Node) else node
        return (("root", read.name, id(self.gm)),)

    def _channel_norm(self, node, name, fact, out):
        """Norms with a channel axis 1: per-channel statistics (batch norm, in eval or training
        mode) or per-sample ones (group / instance norm, whose statistics may span the frames of a
        5-D video) never move a value to another position."""
        if rule(name).per_channel:
            ok = 1 not in fact.dims() and 1 not in fact.batch and len(_shape(node.args[0])) >= 2
        else:  # statistics over a sample's channels and positions (and frames): nothing moves
            ok = all(d >= 2 for d in fact.dims()) and 1 not in fact.batch
        return _step(fact, name) if ok else None

    def _source_text(self, node, name, out) -> str:
        path = module_path(node)
        where = f" `{path}`" if path else f" `{node.name}`"
        return f"{name}{where} ({'x'.join(str(s) for s in out.shape[2:])})"

    def _inputs_with_facts(self, tensors):
        return [(t, self.facts.get(t) if isinstance(t, fx.Node) else None) for t in tensors]

    def _pointwise(self, node, name, fact, out):
        out_shape = _shape(node)
        if out_shape is None:
            return None
        found = []
        for operand in node.all_input_nodes:
            fact = self.facts.get(operand)
            if fact is None:
                continue
            shape = _shape(operand)
            shift = len(out_shape) - len(shape)
            moved = _shift(fact, shift)
            if any(not _same_size(shape[d - shift], out_shape[d]) for d in moved.dims()):
                return None  # the fact's axis is broadcast into something larger
            found.append(moved)
        if not found:
            return None
        if node.op in ("call_method", "call_function") and mutates(node):
            self._inplace_pointwise.add(node)
        merged = _merge(found)  # None: two different layouts meet, no single proof
        return _step(merged, name) if merged is not None else None

    def _cat(self, node, name, fact, out):
        tensors = list(arg(node, 0, "tensors"))
        dim = arg(node, 1, "dim", 0)
        out_shape = _shape(node)
        dim %= len(out_shape)
        facts = self._inputs_with_facts(tensors)
        # frames merged in front of their tokens, then text tokens glued on (CogVideoX): a video
        facts = [(t, _frames_merged(f) if isinstance(f, Tokens) and f.lead and f.dim == dim else f) for t, f in facts]
        with_fact = [(t, f) for t, f in facts if f is not None]
        if not with_fact:
            return None
        if any(dim in f.dims() for _, f in with_fact):
            if len(with_fact) > 1 and all(isinstance(f, Tokens) and f.dim == dim for _, f in with_fact):
                self._why[node] = ("several images packed into one sequence, Pixtral-style: a grid is defined "
                                   "within one image per sequence, and one grid per packed image is not "
                                   "modelled; batch same-size images to have them rewritten")
            if len(with_fact) != 1 or not isinstance(with_fact[0][1], Tokens) or with_fact[0][1].lead:
                return None  # two images in one sequence, or rows glued to rows: not a layout we model
            target, fact = with_fact[0]
            if dim in fact.batch:
                return None
            idx = [t is target for t in tensors].index(True)
            before = sum((_shape(t)[dim] for t in tensors[:idx]), 0)
            after = sum((_shape(t)[dim] for t in tensors[idx + 1:]), 0)
            return _step(replace(fact, prefix=fact.prefix + before, suffix=fact.suffix + after), "cat")
        if any(dim in f.batch for _, f in with_fact):
            # Images stacked along the batch: every part must be an image laid out alike, and the
            # result's image index says which part (and which of its images) it came from.
            if len(with_fact) != len(tensors) or len({_positions(f) for _, f in with_fact}) != 1:
                return None
            parts = tuple((f.image, _hint(_shape(t)[dim])) for t, f in with_fact)
            return _step(replace(with_fact[0][1], image=(("cat", parts),)), "cat")
        merged = _merge([f for _, f in with_fact])
        if merged is None:
            return None
        if len({f.image for _, f in with_fact}) > 1:
            # Parts of different images glued along an axis that may index images (a size-1 batch
            # axis is not tracked): the order of the parts matters, as for a batch.
            parts = tuple((f.image if f is not None else None, _hint(_shape(t)[dim])) for t, f in facts)
            merged = replace(merged, image=(("cat", parts),), batch=tuple(sorted({*merged.batch, dim})))
        return _step(merged, "cat")

    def _stack(self, node, name, fact, out):
        tensors = list(arg(node, 0, "tensors"))
        dim = arg(node, 1, "dim", 0) % len(_shape(node))
        facts = [f for _, f in self._inputs_with_facts(tensors)]
        with_fact = [f for f in facts if f is not None]
        if not with_fact or len({_positions(f) for f in with_fact}) != 1:
            return None
        fact = _remap(with_fact[0], {d: d + (d >= dim) for d in range(len(_shape(node)))})
        if fact is None:
            return None
        images = tuple(f.image if f is not None else None for f in facts)
        if len(set(images)) != 1:  # the new axis picks an image: a batch axis
            fact = replace(fact, image=(("stack", images),), batch=tuple(sorted((*fact.batch, dim))))
        return _step(fact, "stack")

    def _narrow(self, node, name, fact, out):
        shape = _shape(node.args[0])
        dim, sl = narrowed(node, name)
        idx = [slice(None)] * (dim % len(shape)) + [sl]
        return _index(fact, shape, tuple(idx), node.name)

    def _split(self, node, name, fact, out):
        shape = _shape(node.args[0])
        pieces = _val(node)
        if not isinstance(pieces, (tuple, list)):
            return None
        dim = resolve(split_dim(node, name)) % len(shape)
        results, offset = [], 0
        for piece in pieces:
            if name == "unbind":
                idx = tuple([slice(None)] * dim + [offset])
                offset += 1
            else:
                size = piece.shape[dim]
                idx = tuple([slice(None)] * dim + [slice(offset, offset + size)])
                offset = offset + size
            results.append(_index(fact, shape, idx, f"{node.name}[{len(results)}]"))
        return tuple(results)


# What each kind of the op catalogue does to a fact (kinds without an entry lose it).
_TRANSFERS = {
    POINTWISE: LayoutAnalysis._pointwise, CAST: LayoutAnalysis._pointwise, IDENTITY: LayoutAnalysis._pointwise,
    CAT: LayoutAnalysis._cat, STACK: LayoutAnalysis._stack, ATTRIBUTE: LayoutAnalysis._attribute,
    KEEPDIM_REDUCTION: LayoutAnalysis._keepdim_reduction, SOFTMAX: LayoutAnalysis._softmax,
    RESHAPE: LayoutAnalysis._reshape_op, PERMUTE: LayoutAnalysis._permute_op, FEATURES: LayoutAnalysis._features,
    CHANNEL_NORM: LayoutAnalysis._channel_norm, INDEX: LayoutAnalysis._getitem, NARROW: LayoutAnalysis._narrow,
    SELECT: LayoutAnalysis._select, SPLIT: LayoutAnalysis._split, REPEAT: LayoutAnalysis._repeat,
    BROADCAST: LayoutAnalysis._broadcast_op, PAD: LayoutAnalysis._pad, PRODUCT: LayoutAnalysis._product,
    OUTER: LayoutAnalysis._outer, TILE: LayoutAnalysis._tile, POOL1D: LayoutAnalysis._pool1d,
    IM2COL: LayoutAnalysis._im2col,
}
def _split_fact(fact) -> bool:
    return isinstance(fact, Tokens) and bool(fact.shard or fact.partial or fact.groups)


def _keeps_positions(inputs: list[Tokens], result) -> bool:
    """Whether an op on a rank's share of tokens (or on tokens in grid-group order) keeps each token
    where it is: the result describes the same positions on whatever axis, or (a ``chunk`` / ``split``,
    a tuple) takes equal contiguous chunks of a whole sequence, each then a rank's share."""
    pieces = result if isinstance(result, tuple) else (result,)
    if not any(isinstance(p, Tokens) for p in pieces):
        return False
    for piece in pieces:
        if piece is None:
            continue
        if not isinstance(piece, Tokens):
            return False
        for f in inputs:
            chunked = piece.shard if not f.shard else f.shard
            if replace(_positions(piece), dim=0) != replace(_positions(f), dim=0, shard=chunked):
                return False
    return True


# Kinds whose result may carry a fact that reaches it through an operand other than the first.
_FROM_SEVERAL_INPUTS = frozenset({POINTWISE, CAST, IDENTITY, CAT, STACK})


def _data_inputs(node: fx.Node, gm) -> list[fx.Node]:
    """The inputs whose values flow into ``node``; ``x.reshape_as(template)`` only reads the
    template's shape."""
    if op_name(node, gm) in TEMPLATE_READS and isinstance(node.args[0], fx.Node):
        return [node.args[0]]
    return node.all_input_nodes

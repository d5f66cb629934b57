"""Token-layout inference: prove, from the graph's own dataflow, which tensor axes are images.

A forward abstract interpretation over the graph. Spatial tensors are *born* at conv / pool /
interpolate outputs (NCHW: rows on axis 2, columns on axis 3; NCTHW for a video: frames on axis 2,
from a Conv3d or a 3-D pool). Every op that moves axes
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

import enum
import math
import operator
from collections import deque
from dataclasses import dataclass, replace

import torch
import torch.fx as fx

from ..grid import TokenLayout
from ..ir.op_catalogue import (ATTRIBUTE, BROADCAST, CAST, CAT, CHANNEL_NORM, FEATURES, FRESH_TENSORS, IDENTITY, INDEX,
                               KEEPDIM_REDUCTION, KEEPS_POSITIONS, CATS, MAYBE_ALIASING, NARROW, PAD, PERMUTE, POINTWISE, PRODUCT, REPEAT,
                               RESHAPE, RESHAPES, SELECT, SOFTMAX, SPLIT, STACK, VIEWING, arg, permutation, resolve,
                               rule, source_rank, split_dim)
from ..ir.module_paths import module_path
from ..ir.ops import mutates, op_name, written_args
from ..ir.values import shape_of as _shape
from ..ir.values import value_of as _val


class LayoutSource(str, enum.Enum):
    """Where a fact came from (the report's "layout ..." note); a str so that it prints as its value."""

    PROVEN = "proven in this graph"
    REMEMBERED = "remembered by prepare"
    DECLARED = "declared"
    HANDED_OVER = "handed over across a split"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Spatial:
    axes: tuple         # the tensor axis of each image axis, logical order (frames,) rows, columns
    sizes: tuple        # the image's sizes in the same order
    origin: str
    trail: tuple = ()
    image: tuple = ()   # which image (see the module docstring); equal tuples = the same image
    batch: tuple = ()   # axes whose index selects an image (not necessarily all images of a batch)
    source: LayoutSource = LayoutSource.PROVEN
    marked: str = ""    # remembered / declared: the name of the marked tensor (a declared input's)

    def dims(self):
        return self.axes

    @property
    def rank(self) -> int:
        return len(self.axes)


@dataclass(frozen=True)
class Tokens:
    dim: int
    prefix: object
    image_shape: tuple  # logical sizes, slowest first: (H, W) or (T, H, W)
    suffix: object
    order: tuple        # storage order of the logical axes, outermost first (grid.TokenLayout.order)
    origin: str
    trail: tuple = ()
    image: tuple = ()
    batch: tuple = ()
    # Outer axes merged into ``dim`` in front of the tokens, as ((size, is_batch), ...): the tokens
    # of a (B, N, C) tensor flattened to (B * N, C) for a BatchNorm1d. Not a sequence layout
    # until a reshape splits them off again, or unless they are frames (:func:`_frames_merged`).
    lead: tuple = ()
    source: LayoutSource = LayoutSource.PROVEN
    marked: str = ""

    def dims(self):
        return (self.dim,)

    @property
    def rank(self) -> int:
        return len(self.image_shape)

    @property
    def image_tokens(self):
        return math.prod(self.image_shape)  # SymInts and traced sizes multiply too

    @property
    def storage_shape(self) -> tuple:
        """The image sizes in the order the tokens store them, outermost first."""
        return tuple(self.image_shape[a] for a in self.order)


def _image_text_sizes(sizes) -> str:
    return "x".join(str(s) for s in sizes)


def _hint(size) -> int | None:
    """A concrete value for a size: the int itself, or the hint Dynamo traced a SymInt with."""
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return int(hint) if hint is not None else None
    return None


def _same_size(a, b) -> bool:
    """Whether two sizes are provably equal: ints compare; a SymInt must equal the other for every
    value the ShapeEnv allows (checked without installing a guard). Equal traced values (hints) alone
    prove nothing: two unrelated symbols may happen to have been traced with the same value."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if _hint(a) is None or _hint(a) != _hint(b):
        return False
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt) and a.node.expr == b.node.expr:
        return True
    return _known(a == b)


def _known(condition) -> bool:
    """A size condition that holds for every size the ShapeEnv allows (no guard is installed)."""
    if isinstance(condition, bool):
        return condition
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(condition)


def _static(size) -> int | None:
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt) and size.node.is_constant():
        return int(size)
    return None




# What each op does to token axes is the catalogue's (ir/op_catalogue.py); what a loss means here:
_LOSS_HINTS = {
    **{v: "a reshape that splits or merges the image axes, e.g. into windows" for v in RESHAPES},
    "getitem": "indexing that drops or reorders image tokens",
    "cat": "concatenation of two image layouts",
    "pad": "padding of the image axes, e.g. to a multiple of the window size",
}


# --- the analysis -----------------------------------------------------------------------------

class LayoutAnalysis:
    """Runs once over a graph; then answers :meth:`layout` for any node and sequence axis.

    ``attention_outputs`` maps each attention site's output node to (query node, its sequence
    axis): the output carries the query's token layout on the same axis. ``inherited`` gives facts
    for placeholders proven in an earlier piece of the same split graph (crossgraph/split_handoff.py).
    ``hints`` gives facts that prepare() remembered or the user declared for a node
    (crossgraph/hints.py): a node the graph proves by itself keeps its proof when the two agree
    and gets no fact when they differ; ``hint_conflicts`` names nodes whose hints disagreed.
    """

    def __init__(self, gm: fx.GraphModule, attention_outputs: dict[fx.Node, tuple[fx.Node, int]],
                 inherited: dict[fx.Node, object] | None = None, hints: dict[fx.Node, object] | None = None,
                 hint_conflicts: dict[fx.Node, str] | None = None):
        self.gm = gm
        self.attention_outputs = attention_outputs
        self.inherited = inherited or {}
        self.hints = hints or {}
        self.hint_conflicts = dict(hint_conflicts or {})
        self.fills = _feature_fills(gm)
        self.written = _written_tensors(gm, skip={w for writes in self.fills.values() for w in writes})
        self._run()
        # An in-place pointwise op keeps positions only if it adds nothing laid out differently
        # (``x.add_(x.transpose(1, 2))`` would not): where its own fact is lost, so is its target's.
        bad = {dest: node for node in gm.graph.nodes if node in self._inplace_pointwise
               and self.facts.get(node) is None
               for dest in written_args(node) if self.facts.get(dest) is not None}
        if bad:
            self.written.update(_alias_closure(gm, bad, self.written))
            self._run()

    def _run(self):
        self.facts: dict[fx.Node, object] = {}
        self.lost: dict[fx.Node, str] = dict(self.hint_conflicts)
        # The op at which each lost layout was lost (the report command groups skips by it).
        self.lost_op: dict[fx.Node, str] = {n: "layout_hint" for n in self.hint_conflicts}
        self._inplace_pointwise = set()
        self._fill_of = {w: fresh for fresh, writes in self.fills.items() for w in writes}
        self._fill_failed = set()
        for node in self.gm.graph.nodes:
            try:
                fact = self._transfer(node)
            except Exception:  # an op we mis-read must never become a wrong proof
                fact = None
            if node in self.hints:
                fact = self._with_hint(node, fact)
            if node in self._fill_of:
                self._fill(node)
            writer = self.written.get(node)
            if writer is not None:
                if fact is not None:  # the write, not the op, is what loses this layout
                    self.lost_op[node] = str(op_name(writer, self.gm) or writer.target)
                    self.lost[node] = (f"in-place {op_name(writer, self.gm) or writer.target} `{writer.name}` "
                                       "(a write into this tensor or a view of it can move its tokens)")
                fact = None
            if fact is not None:
                self.facts[node] = fact
            elif node not in self.lost and node not in self.attention_outputs and isinstance(
                    _val(node), torch.Tensor) and any(self.facts.get(a) is not None for a in _data_inputs(node, self.gm)):
                name = op_name(node, self.gm)
                why = _LOSS_HINTS.get(name, "")
                self.lost_op[node] = str(name or node.target)
                self.lost[node] = f"{name or node.target} `{node.name}`" + (f" ({why})" if why else "")

    def _fill(self, write: fx.Node):
        """``fresh[..., idx] = value`` (see :func:`_feature_fills`): the fresh tensor takes the
        value's fact when the write leaves every token where it is (only axes after the fact's
        token and batch axes are indexed, the other sizes are equal), and every fill agrees."""
        fresh, value = write.args[0], write.args[2]
        fact = self.facts.get(value) if isinstance(value, fx.Node) else None
        out_shape, in_shape = _shape(fresh), _shape(value) if isinstance(value, fx.Node) else None
        indexed = len(write.args[1]) - 1
        first_indexed = len(out_shape) - indexed if out_shape is not None else 0
        ok = (fresh not in self._fill_failed and fact is not None and in_shape is not None
              and len(in_shape) == len(out_shape)
              and all(_same_size(a, b) for a, b in zip(in_shape[:first_indexed], out_shape[:first_indexed]))
              and all(d < first_indexed for d in (*fact.dims(), *fact.batch)))
        previous = self.facts.get(fresh)
        if ok and previous is not None:
            ok = (_positions(previous) == _positions(fact) and previous.image == fact.image
                  and previous.batch == fact.batch)
        if ok:
            self.facts[fresh] = _step(fact, "setitem")
            self.lost.pop(fresh, None)
        else:
            self._fill_failed.add(fresh)
            self.facts.pop(fresh, None)
            self.lost_op[fresh] = "setitem"
            self.lost[fresh] = (f"setitem `{write.name}` (a write whose value has no layout, another "
                                "layout, or indexes the token axes)")

    def _with_hint(self, node: fx.Node, proven):
        hint = self.hints[node]
        self.lost_op[node] = "layout_hint"  # read only where a text below is recorded in self.lost
        if proven is None:
            shape = _shape(node)
            if shape is None or any(d >= len(shape) for d in hint.dims()):
                self.lost[node] = f"{hint.origin} does not fit `{node.name}` of shape {shape}"
                return None
            if isinstance(hint, Tokens) and _hint(shape[hint.dim]) != _hint(hint.prefix + hint.image_tokens + hint.suffix):
                self.lost[node] = (f"{hint.origin}: {hint.prefix}+{_image_text_sizes(hint.image_shape)}+{hint.suffix} "
                                   f"tokens do not match `{node.name}`'s {shape[hint.dim]}")
                return None
            if isinstance(hint, Spatial) and tuple(_hint(shape[d]) for d in hint.axes) != tuple(
                    _hint(n) for n in hint.sizes):
                self.lost[node] = f"{hint.origin}: {_image_text_sizes(hint.sizes)} does not match `{node.name}` {shape}"
                return None
            return hint
        if _positions(proven) == _positions(hint):
            return proven  # the graph proves it by itself: report it as proven here
        self.lost[node] = f"{hint.origin} contradicts this graph's proof ({proven.origin}) at `{node.name}`"
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
        if isinstance(fact, Tokens) and fact.dim == seq_dim:
            # Symbolic sizes stay SymInts: the policy and the rewrite decide on them through the
            # ShapeEnv (guards), never on the values they were traced with.
            raw = (fact.prefix, *fact.image_shape, fact.suffix)
            sizes = [s if _static(s) is None else _static(s) for s in raw]
            if any(not isinstance(s, (int, torch.SymInt)) for s in sizes):
                return None, f"image size {_image_text_sizes(fact.image_shape)} is not an integer"
            evidence = f"{fact.origin} via {_trail_text(fact.trail)}"
            return TokenLayout(sizes[0], image_shape=tuple(sizes[1:-1]), suffix=sizes[-1], order=fact.order), evidence
        if fact is not None:
            # e.g. window partitioning: the window grid is enumerated along the batch axis (a
            # 1-image batch drops out of the reshape), the sequence holds one window's tokens
            return None, (f"no proven image layout on the sequence axis: the image runs along "
                          f"{type(fact).__name__.lower()} axes {fact.dims()} instead (e.g. windows or "
                          "patches enumerated outside the attention's sequence)")
        return None, "no proven image layout: " + self._why_not(node)

    def _why_not(self, node: fx.Node) -> str:
        loss = self._loss(node)
        if loss is None:
            return "no spatial source (conv/pool/interpolate output) reaches it"
        src = next((self.facts[a] for a in loss.all_input_nodes if a in self.facts), None)
        origin = f" (from {src.origin})" if src is not None else ""
        return f"image layout{origin} lost at {self.lost[loss]}"

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
        return None if loss is None else self.lost_op.get(loss)

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
        if node.op == "placeholder":
            inherited = self.inherited.get(node)
            if inherited is not None:
                inherited = replace(inherited, source=LayoutSource.HANDED_OVER)
            return _step(inherited, "DDP bucket split")
        if node.op not in ("call_function", "call_method", "call_module"):
            return None
        if node in self.attention_outputs:
            # Attention keeps the query's token positions (rewritten or not: grid recovering
            # puts every output token back in place).
            query, query_dim = self.attention_outputs[node]
            fact = self.facts.get(query)
            on_seq_axis = isinstance(fact, Tokens) and fact.dim == query_dim % len(_shape(query))
            same_rank = _shape(node) is not None and len(_shape(node)) == len(_shape(query))
            return _step(fact, "attention") if on_seq_axis and same_rank else None
        if node.op == "call_function" and node.target is operator.getitem and not isinstance(_val(node.args[0]), torch.Tensor):
            pieces = self.facts.get(node.args[0])
            return pieces[node.args[1]] if isinstance(pieces, tuple) else None
        name = op_name(node, self.gm)
        if name is None:
            return None
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
        if fact is None and op_rule.kind not in _FROM_SEVERAL_INPUTS:
            return None
        return transfer(self, node, name, fact, out)

    # One transfer function per kind of the op catalogue (ir/op_catalogue.py); ``fact`` is the
    # first operand's (None only for the kinds in _FROM_SEVERAL_INPUTS), ``out`` the output value.
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
        mode) or per-sample ones (group / instance norm) never move a value to another position."""
        if name in ("batch_norm", "_native_batch_norm_legit_no_training"):
            ok = 1 not in fact.dims() and 1 not in fact.batch and len(_shape(node.args[0])) >= 2
        else:
            ok = all(d >= 2 for d in fact.dims()) and set(fact.batch) <= {0}
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
        if name == "narrow":
            dim, start, length = (resolve(arg(node, i, n)) for i, n in ((1, "dim"), (2, "start"), (3, "length")))
            sl = slice(start, start + length)
        else:  # aten.slice(x, dim, start, end, step)
            dim = resolve(arg(node, 1, "dim", 0))
            sl = slice(resolve(arg(node, 2, "start")), resolve(arg(node, 3, "end")), resolve(arg(node, 4, "step", 1)))
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
}
# Kinds whose result may carry a fact that reaches it through an operand other than the first.
_FROM_SEVERAL_INPUTS = frozenset({POINTWISE, CAST, IDENTITY, CAT, STACK})


# --- mutation ---------------------------------------------------------------------------------

def _storage(node):
    value = _val(node)
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return value.untyped_storage()._cdata
    except Exception:  # sparse, nested, or a value without storage
        return None


def _alias_classes(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """Each node's representative among the nodes that may share its storage (conservative)."""
    parent: dict[fx.Node, fx.Node] = {}

    def find(n):
        parent.setdefault(n, n)
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    def union(a, b):
        parent[find(a)] = find(b)

    for node in gm.graph.nodes:
        find(node)
        if node.op not in ("call_function", "call_method", "call_module") or not node.args:
            continue
        first = node.args[0]
        if isinstance(first, (list, tuple)) and op_name(node, gm) in CATS:
            continue
        if not isinstance(first, fx.Node):
            continue
        name, storage, source = op_name(node, gm), _storage(node), _storage(first)
        same = storage is not None and storage == source
        unknown = storage is None or source is None
        if name in VIEWING or mutates(node) or same or (name in MAYBE_ALIASING and unknown):
            union(node, first)
        for dest in (written_args(node) if mutates(node) else ()):
            union(node, dest)
    return {n: find(n) for n in parent}


def _trailing_index(index) -> int:
    """How many trailing axes ``x[index]`` indexes when ``index`` is ``(..., slice, ...)`` with an
    Ellipsis first and only plain slices after it (no ints, tensors or None); 0 otherwise."""
    if not (isinstance(index, tuple) and len(index) >= 2 and index[0] is Ellipsis):
        return 0
    for part in index[1:]:
        if not isinstance(part, slice) or any(
                b is not None and (not isinstance(b, int) or isinstance(b, bool))
                for b in (part.start, part.stop, part.step)):
            return 0
    return len(index) - 1


def _feature_fills(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """Fresh tensors filled through ``fresh[..., idx] = value`` writes along trailing axes only, as
    interleaved rotary embeddings write their output (diffusers' Wan: ``out = torch.empty_like(x);
    out[..., 0::2] = ...; out[..., 1::2] = ...``), mapped to those writes in graph order.

    Such a write keeps every value of the leading axes where it is, so the filled tensor is laid out
    as its values are (:meth:`LayoutAnalysis._fill` checks the values' facts). Only when nothing else
    can see the tensor change: every other user comes after the last write (no reader or view in
    between) and none of them writes into it (a write through a later view is a write as usual)."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    fills = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or op_name(node, gm) not in FRESH_TENSORS:
            continue
        writes = [u for u in node.users if u.op == "call_function" and u.target is operator.setitem
                  and len(u.args) == 3 and u.args[0] is node and _trailing_index(u.args[1])]
        if not writes:
            continue
        last = max(order[w] for w in writes)
        others = [u for u in node.users if u not in writes]
        if all(order[u] > last and not mutates(u) for u in others):
            fills[node] = sorted(writes, key=order.get)
    return fills


def _written_tensors(gm: fx.GraphModule, skip=frozenset()) -> dict[fx.Node, fx.Node]:
    """Every node whose tensor (or an alias of it) some op writes into in a way that can move
    values between positions, mapped to that op. In-place pointwise ops (``x.add_(y)``,
    ``x.mul_(s)``, ``relu_``) keep every value at its position and are left to the transfer, and so
    are the fills of fresh tensors along trailing axes in ``skip`` (:func:`_feature_fills`)."""
    writers = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or not mutates(node) or node in skip:
            continue
        name = op_name(node, gm)
        dests = written_args(node)
        if name in KEEPS_POSITIONS and dests == [node.args[0]] and "out" not in node.kwargs:
            continue
        for dest in dests:
            writers.setdefault(dest, node)
    return _alias_closure(gm, writers, {})


def _alias_closure(gm, writers: dict, known: dict) -> dict[fx.Node, fx.Node]:
    """Spread each written node's writer over its whole alias class (views share storage)."""
    if not writers:
        return dict(known)
    classes = _alias_classes(gm)
    by_class = {}
    for dest, writer in writers.items():
        by_class.setdefault(classes.get(dest, dest), writer)
    out = dict(known)
    for node, rep_ in classes.items():
        if rep_ in by_class:
            out.setdefault(node, by_class[rep_])
    return out


def _data_inputs(node: fx.Node, gm) -> list[fx.Node]:
    """The inputs whose values flow into ``node``; ``x.reshape_as(template)`` only reads the
    template's shape."""
    if op_name(node, gm) in ("view_as", "reshape_as", "expand_as", "type_as") and isinstance(node.args[0], fx.Node):
        return [node.args[0]]
    return node.all_input_nodes


# --- fact arithmetic --------------------------------------------------------------------------

def _positions(fact):
    """Facts that describe the same positions compare equal regardless of history and image."""
    return replace(fact, origin="", trail=(), image=(), batch=(), source=LayoutSource.PROVEN, marked="")


def _merge(facts: list):
    """The fact of a value computed position by position from several facts (``a + b``, a cat of
    channels): they must agree on positions and image axes; the values mix their images."""
    first = facts[0]
    if any(_positions(f) != _positions(first) for f in facts[1:]):
        return None
    batch = tuple(sorted({b for f in facts for b in f.batch}))  # a size-1 image axis may be untracked
    images = sorted({f.image for f in facts}, key=repr)
    image = images[0] if len(images) == 1 else (("mix", tuple(images)),)
    return replace(first, batch=batch, image=image)


def _image_text(image: tuple) -> str:
    if not image:
        return "an unnamed image"
    root = image[0]
    kinds = {"cat": "images concatenated along the batch", "stack": "images stacked along a new axis",
             "mix": "a mix of several images"}
    text = f"the image read from `{root[1]}`" if root[0] == "root" else kinds.get(root[0], root[0])
    picks = [r[1] for r in image[1:] if r[0] == "select"]
    return text + (f", selected by `{picks[-1]}`" if picks else "")


def _step(fact, op: str):
    if fact is None:
        return None
    fact = _single_frame_is_an_image(fact)
    trail = fact.trail if fact.trail and fact.trail[-1] == op else fact.trail + (op,)
    return replace(fact, trail=trail)


def _single_frame_is_an_image(fact):
    """A video fact whose frame axis has size 1 (statically) as the fact of its image: no token's
    position depends on that axis, and the policy then treats the site as the 2-D image it is."""
    if isinstance(fact, Spatial) and fact.rank == 3 and _static(fact.sizes[0]) == 1:
        return replace(fact, axes=fact.axes[1:], sizes=fact.sizes[1:])
    if isinstance(fact, Tokens) and fact.rank == 3 and _static(fact.image_shape[0]) == 1:
        return replace(fact, image_shape=fact.image_shape[1:], order=tuple(a - 1 for a in fact.order if a != 0))
    return fact


def _frames_merged(fact: Tokens) -> Tokens:
    """Tokens with outer axes merged in front of them, read as a video when those axes are frames:
    exactly one merged axis of size > 1, an axis that indexes images of one source tensor (frames
    folded into the batch, CogVideoX's ``x.view(B, F, ...)``; not images concatenated or stacked
    from different tensors), and an image that fills each frame's tokens (no prefix or suffix, an
    image, not already a video). Token ``f * N + n`` is then token ``n`` of frame ``f``:
    a T x H x W layout, time slowest. Anything else is returned as it is (still merged)."""
    outer = [(size, is_batch) for size, is_batch in fact.lead if _hint(size) != 1]
    if (len(outer) != 1 or not outer[0][1] or fact.rank != 2 or _static(fact.prefix) != 0
            or _static(fact.suffix) != 0 or _static(outer[0][0]) is None):
        return fact  # (symbolic frame counts or borders: not proven here)
    if not fact.image or fact.image[0][0] != "root":
        # The images along that axis were concatenated / stacked from different tensors (two
        # images of a feature matcher glued into one sequence): not the frames of one video.
        return fact
    frames = _static(outer[0][0])
    batch = tuple(b for b in fact.batch if b != fact.dim)
    return _single_frame_is_an_image(replace(
        fact, image_shape=(frames, *fact.image_shape), order=(0, *(a + 1 for a in fact.order)), lead=(),
        batch=batch, image=fact.image + (("frames", frames),), trail=fact.trail + ("frames merged",)))


def _trail_text(trail) -> str:
    if len(trail) > 8:
        trail = trail[:4] + ("...",) + trail[-3:]
    return " > ".join(trail) if trail else "(source)"


def layout_source(fact) -> str:
    """Where a proven layout came from, for the report ("" for no fact)."""
    return "" if fact is None else fact.source.value


def _shift(fact, by: int):
    return _remap(fact, {d: d + by for d in (*fact.dims(), *fact.batch)}) if by else fact


def _remap(fact, mapping: dict):
    """Move a fact's axes; None when one of them disappears (a vanishing image axis is dropped:
    callers record selections along it first)."""
    new = {d: mapping.get(d) for d in fact.dims()}
    if any(v is None for v in new.values()):
        return None
    batch = tuple(sorted(mapping[b] for b in fact.batch if mapping.get(b) is not None))
    if isinstance(fact, Spatial):
        return replace(fact, axes=tuple(new[d] for d in fact.axes), batch=batch)
    return replace(fact, dim=new[fact.dim], batch=batch)




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
    Returns None when the sizes cannot be read concretely.
    """
    ins = [(d, _hint(s)) for d, s in enumerate(in_shape)]
    outs = [(d, _hint(s)) for d, s in enumerate(out_shape)]
    if any(s is None for _, s in ins + outs):
        return None
    ins = [(d, s) for d, s in ins if s != 1]
    outs = [(d, s) for d, s in outs if s != 1]
    groups, i, j = [], 0, 0
    while i < len(ins) and j < len(outs):
        gi, gj = [ins[i][0]], [outs[j][0]]
        pi, pj = ins[i][1], outs[j][1]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(ins):
                gi.append(ins[i][0]); pi *= ins[i][1]; i += 1
            elif pj < pi and j < len(outs):
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
                return _step(Spatial(axes, fact.image_shape, fact.origin, fact.trail, fact.image, fact.batch), name)
        if gi == [fact.dim] and len(go) == 2 and fact.rank == 3 and fact.order[0] == 0 and whole:
            # a video's tokens split into (frames, tokens per frame): frames into the batch, each
            # frame an image of its own (per-frame spatial attention)
            frames, height, width = fact.image_shape
            if _same_size(out_shape[go[0]], frames) and _same_size(out_shape[go[1]], height * width):
                return _step(replace(fact, dim=go[1], image_shape=(height, width),
                                     order=tuple(a - 1 for a in fact.order[1:]),
                                     batch=tuple(sorted({*fact.batch, go[0]})),
                                     image=fact.image + (("frames split", _hint(frames)),)), name + " (frames)")
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
        if len(go) != 1 or sorted(gi) != sorted(fact.axes):
            return None
        order = tuple(sorted(range(fact.rank), key=lambda i: fact.axes[i]))
        return _step(Tokens(go[0], 0, fact.sizes, 0, order, fact.origin, fact.trail, fact.image, fact.batch), name)
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


def _index(fact, shape, index, selector: str = ""):
    """``x[index]`` for basic indexing (ints, slices, None, Ellipsis); ``selector`` names the op,
    recorded in the image identity when it picks along an image axis."""
    if not isinstance(index, tuple):
        index = (index,)
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice, torch.SymInt))) for i in index):
        return None  # advanced indexing can reorder tokens
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - consumed) + index[at + 1:]
    index = index + (slice(None),) * (len(shape) - sum(1 for i in index if i is not None))
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
        return (item.step in (None, 1) and (item.start is None or _known(item.start == 0))
                and (item.stop is None or _known(item.stop >= length)))
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
    if step != 1 or fact.lead:
        return None
    first, end = _hint(fact.prefix), _hint(fact.prefix) + _hint(fact.image_tokens)
    if start <= first and stop >= end:
        return replace(fact, prefix=fact.prefix - start, suffix=fact.suffix - (n - stop))
    return None  # the slice keeps only non-image tokens, or cuts through the image


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
    if not (_known(start >= 0) and _known(start <= stop) and _known(stop <= length)):
        return None
    if _known(start == 0) and _known(stop == length):
        return fact
    if isinstance(fact, Spatial):
        return _resized(fact, dim, stop - start)
    if _known(start <= fact.prefix) and _known(stop >= fact.prefix + fact.image_tokens):
        return replace(fact, prefix=fact.prefix - start, suffix=fact.suffix - (length - stop))
    return None

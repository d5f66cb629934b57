"""Layout facts: what the analysis knows about one tensor's axes, and the arithmetic on them.

* :class:`Spatial` - one tensor axis per image axis (``axes``: rows and columns, or frames, rows
  and columns), e.g. NCHW, NHWC or NCTHW.
* :class:`Tokens` - one sequence axis ``dim`` holding ``prefix`` tokens, then the N-D image in the
  storage ``order`` of its axes (identity: row-major, time slowest), then ``suffix`` tokens.

Every fact also says which image its positions belong to (``image``), which axes index images
(``batch``), and where it came from (``source``: proven in this graph, remembered by prepare(),
declared, handed over across a split). Sizes are ``int`` or ``torch.SymInt``; comparisons of
symbolic sizes are proven through the ShapeEnv (:func:`_same_size`), never matched by the values
they were traced with.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from ..ir.values import known_true


class LayoutSource(str, enum.Enum):
    """Where a fact came from (the report's "layout ..." note); a str so that it prints as its value."""

    PROVEN = "proven in this graph"
    REMEMBERED = "remembered by prepare"
    DECLARED = "declared"
    HANDED_OVER = "handed over across a split"
    POSITIONS = "position values"   # the model's own token coordinates (layout/positions.py)

    def __str__(self) -> str:
        return self.value


class Loss(NamedTuple):
    """Where a layout was lost: the op (the report command groups skips by it) and why, for humans."""

    op: str
    text: str


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
    # Context parallelism (layout/collectives.py): (index, count) when the axis holds chunk ``index``
    # of ``count`` equal contiguous chunks of the sequence (this rank's); ``partial`` when the tensor
    # holds only this rank's block of another axis (the heads, between Ulysses' all-to-alls).
    shard: tuple = ()
    partial: bool = False
    # Grid-group sharding (frontends/context_parallel.py): the tokens in the group-major order of a
    # grid stride, as canonical virtual axes (layout/collectives.py); () for the ``order`` above.
    groups: tuple = ()

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
    if _hint(a) != _hint(b):
        return False
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt) and a.node.expr == b.node.expr:
        return True
    return known_true(a == b)


def _static(size) -> int | None:
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt) and size.node.is_constant():
        return int(size)
    if isinstance(size, torch.SymInt):
        return _pinned(size)
    return None


def _pinned(size: torch.SymInt) -> int | None:
    """The value an equality guard pins a symbolic size to, if one does: ``s0*s1 - 31`` under the
    guard ``Eq(s0*s1 + 2, 34)`` is 1 in every call this graph serves (Dynamo checks its guards before
    running it), though the ShapeEnv records no replacement for a product of symbols."""
    hint, env = size.node.hint, size.node.shape_env
    if hint is None or env is None:
        return None
    offset = size.node.expr - int(hint)
    symbols = offset.free_symbols
    for guard in env.guards:
        condition = guard.expr
        if not getattr(condition, "is_Equality", False):
            continue
        difference = condition.lhs - condition.rhs
        if not symbols or difference.free_symbols != symbols:
            continue  # (a constant offset is no pinned size: is_constant() already read it)
        ratio = (offset / difference).cancel()
        if ratio.is_number and ratio.is_finite:
            return int(hint)
    return None




# What each op does to token axes is the catalogue's (ir/op_catalogue.py); what a loss means here:


# --- fact arithmetic --------------------------------------------------------------------------

def _positions(fact):
    """Facts that describe the same positions compare equal regardless of history and image."""
    return replace(fact, origin="", trail=(), image=(), batch=(), source=LayoutSource.PROVEN, marked="")


def _merge(facts: list):
    """The fact of a value computed position by position from several facts (``a + b``, a cat of
    channels): they must agree on positions and image axes; the values mix their images."""
    first = facts[0]
    if any(_positions(f) != _positions(first) for f in facts[1:]):
        facts = [_per_frame(f) for f in facts]  # a video plus its frames as images: images agree
        first = facts[0]
        if any(f is None for f in facts) or any(_positions(f) != _positions(first) for f in facts[1:]):
            return None
    batch = tuple(sorted({b for f in facts for b in f.batch}))  # a size-1 image axis may be untracked
    images = sorted({f.image for f in facts}, key=repr)
    image = images[0] if len(images) == 1 else (("mix", tuple(images)),)
    # One true fact is enough for every position of the result: a structural one outranks
    # position values (which the compiled graph must then check at run time).
    first = next((f for f in facts if f.source is not LayoutSource.POSITIONS), first)
    return replace(first, batch=batch, image=image)


def _per_frame(fact):
    """A Spatial fact as images, one per frame: a video's frame axis becomes an axis that indexes
    images (UNet3D adds a temporal Conv3d's video to its frames-as-images residual). A weaker fact,
    never a wrong one: every frame's rows and columns stay where they are. None for token facts."""
    if not isinstance(fact, Spatial):
        return None
    if fact.rank != 3:
        return fact
    return replace(fact, axes=fact.axes[1:], sizes=fact.sizes[1:], batch=tuple(sorted({*fact.batch, fact.axes[0]})))


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


def _frame_count(fact, merged) -> int | None:
    """How many frames the axes ``merged`` with a 2-D image's tokens hold ((size, indexes images)
    each), when they are frames: exactly one axis of size > 1, one that indexes images of one source
    tensor (not images concatenated or stacked from different tensors: two images of a feature
    matcher glued into one sequence are no video), of static size, around an image that fills each
    frame's tokens (no prefix or suffix). None otherwise (symbolic frame counts or borders are not
    proven here)."""
    outer = [(size, is_batch) for size, is_batch in merged if _hint(size) != 1]
    if len(outer) != 1 or not outer[0][1] or fact.rank != 2 or not fact.image or fact.image[0][0] != "root":
        return None
    if isinstance(fact, Tokens) and (_static(fact.prefix) != 0 or _static(fact.suffix) != 0):
        return None
    return _static(outer[0][0])


def _frames_merged(fact: Tokens) -> Tokens:
    """Tokens with outer axes merged in front of them, read as a video when those axes are frames:
    exactly one merged axis of size > 1, an axis that indexes images of one source tensor (frames
    folded into the batch, CogVideoX's ``x.view(B, F, ...)``; not images concatenated or stacked
    from different tensors), and an image that fills each frame's tokens (no prefix or suffix, an
    image, not already a video). Token ``f * N + n`` is then token ``n`` of frame ``f``:
    a T x H x W layout, time slowest. Anything else is returned as it is (still merged)."""
    frames = _frame_count(fact, fact.lead)
    if frames is None:
        return fact
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

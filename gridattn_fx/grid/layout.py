"""Token layouts and strides: what a sequence axis holds, and how a stride is spelt."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# (Gh, Gw) for an image, (Gt, Gh, Gw) for a video: one step per image axis, slowest first.
Stride = tuple[int, ...]


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
        return math.prod(self.image_shape)  # SymInts and traced sizes multiply too

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
        def size(s):  # None: a size without a known value (data-dependent)
            return "?" if s is None else str(s)

        text = "x".join(size(s) for s in self.image_shape)
        if not row_major:
            text += "(col-major)" if self.rank == 2 else f"(order {self.order})"
        # ``not (int and == 0)``: a data-dependent size (an unbacked SymInt) must not be guarded on
        if not (_is_int(self.prefix) and self.prefix == 0):
            text = f"{size(self.prefix)}+{text}"
        if not (_is_int(self.suffix) and self.suffix == 0):
            text = f"{text}+{size(self.suffix)}"
        return text

    def __repr__(self) -> str:
        return (f"TokenLayout(prefix={self.prefix!r}, image_shape={self.image_shape!r}, "
                f"suffix={self.suffix!r}, order={self.order!r})")


def present(size) -> bool:
    """Whether a prefix / suffix part may hold tokens: False only where it is known to be empty.

    A data-dependent count (an unbacked SymInt: the text tokens a ``nonzero`` keeps) counts as
    present without a guard, which could not be installed on it: its pieces are then slices that
    may be empty at run time, and every op the regrouping applies to them (narrow, cat, SDPA over
    zero queries) accepts empty ones. A traced size is asked through the SymInt it stands for.
    """
    return data_dependent(size) or bool(size)


def has_data_dependent_parts(layout: TokenLayout) -> bool:
    """Whether the layout's prefix or suffix count is data-dependent (see :func:`present`)."""
    return data_dependent(layout.prefix) or data_dependent(layout.suffix)


def data_dependent(size) -> bool:
    """Whether a size (an int, a SymInt or a traced size) is an unbacked SymInt: no value to guard on."""
    sym = getattr(size, "sym", size)
    return isinstance(sym, torch.SymInt) and not sym.node.has_hint()


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def normalize_stride(stride, rank: int | None = None) -> Stride:
    """A stride as a tuple of ints, one per image axis of a rank-``rank`` layout.

    Without ``rank`` (a config value): an int ``G`` is ``(G, G)``; a pair ``(Gh, Gw)`` and a triple
    ``(Gt, Gh, Gw)`` are kept as given. With ``rank`` (docs/design.md section 1):
    on an image (rank 2) ``G`` is ``(G, G)``, a pair is ``(Gh, Gw)`` and a triple applies its
    ``(Gh, Gw)`` (the caller warns); on a video (rank 3) ``G`` is ``(1, G, G)`` (temporal stride 1:
    every group spans all frames), a pair ``(Gh, Gw)`` is ``(1, Gh, Gw)``, a triple is as given.
    """
    if _is_int(stride):
        spatial = (stride, stride)
    elif isinstance(stride, (tuple, list)) and len(stride) in (2, 3) and all(_is_int(s) for s in stride):
        spatial = tuple(int(s) for s in stride)
    else:
        raise TypeError(f"stride must be an int, a pair (Gh, Gw) or a triple (Gt, Gh, Gw) of ints, got {stride!r}")
    if rank is None:
        return spatial
    if rank < 2:
        raise ValueError(f"a stride needs an image of rank >= 2, got rank {rank}")
    if len(spatial) == rank:
        return spatial
    if len(spatial) > rank:
        return spatial[-rank:]
    return (1,) * (rank - len(spatial)) + spatial


def format_stride(stride) -> str:
    """``2x2`` / ``1x2x2``: how the report and the reasons spell a stride."""
    return "x".join(str(g) for g in stride)


def _ceil_div(n: int, d: int) -> int:
    """ceil(n / d), written for sizes that may be symbolic."""
    # Symbolic sizes (passes/rewrite.py): `n % d == 0` is the guard the padding decision takes
    # anyway, and `n // d` / `(n + d - 1) // d` stay expressions the ShapeEnv simplifies.
    return n // d if n % d == 0 else (n + d - 1) // d

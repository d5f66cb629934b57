"""Fresh tensors filled by writes (layout/mutation.py finds them): what the filled tensor holds.

Two kinds, methods of :class:`LayoutAnalysis` (layout/analysis.py) kept here: feature fills
(``fresh[..., idx] = value`` along trailing axes, Wan's interleaved rotary output) and token fills
(parts written along the token axis, Lumina 2's joint sequence of text and image tokens).
"""

from __future__ import annotations

from dataclasses import replace

import torch.fx as fx

from ..ir.op_catalogue import resolve
from ..ir.values import shape_of as _shape
from .facts import Loss, Tokens, _hint, _positions, _same_size, _step
from .reshape import full_index


class Fills:
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
            self.lost[fresh] = Loss("setitem", f"setitem `{write.name}` (a write whose value has no layout, "
                                               "another layout, or indexes the token axes)")

    def _token_fill(self, fresh: fx.Node):
        """After the last of the writes that fill ``fresh`` (:func:`_token_fills`): when exactly one
        write's value carries tokens and lands on a contiguous range ``[a, b)`` of one axis of
        ``fresh`` whose every other index covers its whole axis (an int only on an axis of size 1;
        trailing feature axes may be cut), and every other write lands outside that range, the
        filled tensor holds those tokens with ``a`` tokens before them and the rest after, as a cat
        would (Lumina 2's joint sequence)."""
        writes = self.token_fills[fresh]
        with_fact = [(w, self.facts.get(w.args[2])) for w in writes if self.facts.get(w.args[2]) is not None]
        shape = _shape(fresh)
        fact = None
        if len(with_fact) == 1 and isinstance(with_fact[0][1], Tokens) and not with_fact[0][1].lead and shape:
            fact = self._tokens_written(fresh, shape, *with_fact[0], writes)
        if fact is None:
            self.lost[fresh] = Loss("setitem", f"setitem into `{fresh.name}` (a fill whose parts are not one "
                                               "image's tokens in one contiguous range of one axis)")
            return
        self.facts[fresh] = fact
        self.lost.pop(fresh, None)

    def _tokens_written(self, fresh, shape, write, value_fact, writes):
        index = _expanded_index(resolve(write.args[1]), len(shape))
        if index is None:
            return None
        kept = [d for d, part in enumerate(index) if isinstance(part, slice)]  # fresh axis of each value axis
        if len(kept) != len(_shape(write.args[2])):
            return None
        axis = kept[value_fact.dim]
        start, stop = _range(index[axis], shape[axis])
        if start is None or stop - start != _hint(_shape(write.args[2])[value_fact.dim]):
            return None
        for d, part in enumerate(index):
            if d == axis or (d > axis and isinstance(part, slice)):
                continue  # the token range, and feature axes after it (cut or not, no token moves)
            whole = (0, _hint(shape[d]))
            if (isinstance(part, int) and _hint(shape[d]) != 1) or (isinstance(part, slice) and _range(
                    part, shape[d]) != whole):
                return None
        for other in writes:
            if other is write:
                continue
            other_index = _expanded_index(resolve(other.args[1]), len(shape))
            lo, hi = _range(other_index[axis], shape[axis]) if other_index is not None else (None, None)
            if lo is None or (lo < stop and start < hi):
                return None  # overlaps the image tokens (or cannot tell)
        batch = tuple(kept[b] for b in value_fact.batch)
        return _step(replace(value_fact, dim=axis, prefix=start + value_fact.prefix, batch=batch,
                             suffix=(_hint(shape[axis]) - stop) + value_fact.suffix), "setitem")


def _expanded_index(index, ndim: int):
    """A basic index as one entry per axis (ints and slices; Ellipsis expanded), or None."""
    parts = full_index(index, ndim)
    if len(parts) != ndim or any(p is None or p is Ellipsis for p in parts):
        return None
    return list(parts)


def _range(part, size) -> tuple:
    """The ``[start, stop)`` an int or a step-1 slice selects along an axis of ``size``, as ints;
    (None, None) for anything else (steps, symbolic bounds)."""
    size = _hint(size)
    if isinstance(part, int) and not isinstance(part, bool):
        i = part % size if size else part
        return i, i + 1
    if isinstance(part, slice) and part.step in (None, 1) and isinstance(size, int):
        start, stop, _ = part.indices(size)
        return (start, stop) if stop >= start else (None, None)
    return None, None

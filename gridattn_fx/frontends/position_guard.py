"""A compiled graph whose layouts were read from the values of its position inputs
(layout/positions.py): it runs only on those values.

Dynamo guards a graph on its inputs' shapes, not on their values: Flux's ``img_ids`` for 16x32
tokens and for 32x16 tokens have the same shape, so the second call would reach a graph rewritten
for the first grid. Before each call the position inputs are compared with the values each compiled
variant was specialised on (``torch.equal``: a few hundred elements, one host sync on a GPU); on a
miss the backend compiles a variant for the new values, which the pass reads again (other grids get
theirs, positions that are no grid a dense graph). After ``limit`` variants every further miss
runs the graph without the rewrite.
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable

import torch

logger = logging.getLogger("gridattn_fx")


class PositionGuardedGraph:
    """``compile_for(args)`` compiles a variant for the call's arguments; ``dense(args)`` compiles
    the graph without the rewrite (on demand)."""

    def __init__(self, first: Callable, indices: list[int], example_inputs, compile_for: Callable,
                 dense: Callable, limit: int = 8):
        self.indices = list(indices)
        self.variants = [(self._values(example_inputs), first)]
        self.compile_for = compile_for
        self.dense = dense
        self.limit = limit
        self._dense_fn = None

    def _values(self, args) -> list:
        return [args[i].detach().clone() for i in self.indices]

    def _matches(self, args, values) -> bool:
        return all(isinstance(args[i], torch.Tensor) and args[i].shape == v.shape and args[i].dtype == v.dtype
                   and torch.equal(args[i], v) for i, v in zip(self.indices, values))

    def __call__(self, *args):
        for values, fn in self.variants:
            if self._matches(args, values):
                return fn(*args)
        return self._miss(args)(*args)

    def _miss(self, args) -> Callable:
        names = ", ".join(f"input {i}" for i in self.indices)
        if len(self.variants) < self.limit:
            logger.info("gridattn: new position values at %s: compiling a variant for them", names)
            fn = self.compile_for(args)
            self.variants.append((self._values(args), fn))
            return fn
        if self._dense_fn is None:
            warnings.warn(f"gridattn: {self.limit} variants of one graph were compiled for different position "
                          f"values ({names}); further ones run dense attention", RuntimeWarning, stacklevel=3)
            self._dense_fn = self.dense(args)
        return self._dense_fn

"""A compiled graph whose rewrite relies on facts that Dynamo does not guard: values of position
inputs (layout/positions.py) and layouts handed over from an earlier graph across a graph break
(crossgraph/break_handoff.py). Each call checks them and runs the variant compiled for them.

Dynamo guards a graph on its inputs' shapes, not on their values or on where they came from:
Flux's ``img_ids`` for 16x32 tokens and for 32x16 tokens have the same shape, so the second call
would reach a graph rewritten for the first grid. Before each call the checked inputs are compared
with what each compiled variant was specialised on (position values by ``torch.equal``: a few
hundred elements, one host sync on a GPU; handed-over inputs by a dictionary lookup); on a miss
the backend compiles a variant for the call's inputs, which the pass reads again (another grid gets
its own rewrite, inputs that prove nothing a dense graph). After ``limit`` variants every further
miss runs the graph without the rewrite. After each call the facts of the outputs are recorded for
the graphs that follow (crossgraph/break_handoff.py).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..crossgraph.break_handoff import fact_key, fact_of, record_outputs

logger = logging.getLogger("gridattn_fx")


@dataclass
class RuntimeChecks:
    """What one compiled variant relies on. ``positions``: placeholder index -> the position values
    read; ``handed``: placeholder index -> the key (:func:`fact_key`) of the fact handed over, or
    None; ``outputs``: output index -> fact, recorded after each call."""

    positions: dict[int, torch.Tensor] = field(default_factory=dict)
    handed: dict[int, tuple | None] = field(default_factory=dict)
    outputs: dict[int, object] = field(default_factory=dict)

    def needed(self) -> bool:
        return bool(self.positions or self.handed or self.outputs)

    def hold_for(self, args) -> bool:
        for i, v in self.positions.items():
            a = args[i]
            if not (isinstance(a, torch.Tensor) and a.shape == v.shape and a.dtype == v.dtype and torch.equal(a, v)):
                return False
        return all(fact_key(fact_of(args[i])) == key for i, key in self.handed.items())


class CheckedGraph:
    """``compile_for(args) -> (callable, RuntimeChecks)`` compiles a variant for the call's
    arguments; ``dense(args)`` compiles the graph without the rewrite (on demand)."""

    def __init__(self, first: Callable, checks: RuntimeChecks, compile_for: Callable, dense: Callable,
                 limit: int = 8):
        self.variants = [(checks, first)]
        self.position_inputs = sorted(checks.positions)
        self.handed_inputs = sorted(checks.handed)
        self.compile_for = compile_for
        self.dense = dense
        self.limit = limit
        self._dense_fn = None

    def __call__(self, *args):
        for checks, fn in self.variants:
            if checks.hold_for(args):
                out = fn(*args)
                record_outputs(out, checks.outputs)
                return out
        return self._miss(args)

    def _miss(self, args):
        inputs = ", ".join(f"input {i}" for i in sorted({*self.position_inputs, *self.handed_inputs}))
        if len(self.variants) < self.limit:
            logger.info("gridattn: %s differ from what the compiled graph relies on: compiling a variant", inputs)
            fn, checks = self.compile_for(args)
            # Specialise on every input the first variant checks, so that the variant is found again.
            checks.positions = {i: args[i].detach().clone() for i in self.position_inputs
                                if isinstance(args[i], torch.Tensor)} | checks.positions
            checks.handed = {i: fact_key(fact_of(args[i])) for i in self.handed_inputs} | checks.handed
            self.variants.append((checks, fn))
            out = fn(*args)
            record_outputs(out, checks.outputs)
            return out
        if self._dense_fn is None:
            warnings.warn(f"gridattn: {self.limit} variants of one graph were compiled for different position "
                          f"values or handed-over layouts ({inputs}); further ones run dense attention",
                          RuntimeWarning, stacklevel=3)
            self._dense_fn = self.dense(args)
        return self._dense_fn(*args)

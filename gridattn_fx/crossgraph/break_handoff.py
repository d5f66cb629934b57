"""Layout facts carried across Dynamo's graph breaks, by tensor identity, checked at every call.

A data-dependent op (Lumina 2's ``mask.sum().tolist()``, OmniGen's branch on its inputs, HiDream's
``bincount``) splits a model into several graphs; the attention sites land in a later graph whose
inputs are plain placeholders, cut off from the patch embedding that proves their layout. Between
the graphs the tensors pass through eager Python untouched: the tensor a later graph receives is
the very object an earlier graph returned.

So every compiled graph whose outputs carry facts records them here, per output tensor object
(:func:`record_outputs`, after each call); a graph compiled later seeds its placeholders with the
facts of the example inputs it is compiled for (:func:`handed_facts`), provided the object is alive,
unchanged since (``_version``) and of the recorded shape. Dynamo guards the later graph on shapes,
not on where its inputs came from, so the compiled graph checks at every call that each such input
still carries the same fact (:func:`fact_of`); the backend runs another variant when one does not
(frontends/checked_graph.py).
"""

from __future__ import annotations

import weakref

import torch
import torch.fx as fx

from ..ir.graphs import placeholder_inputs
from ..layout.facts import _positions

# id(tensor) -> (weak reference, _version when recorded, fact); an entry leaves with its tensor
_recorded: dict[int, tuple] = {}


def _forget(ref: weakref.ref, key: int) -> None:
    """The tensor ``ref`` pointed to is gone: drop its entry (unless a newer one replaced it)."""
    if _recorded.get(key, (None,))[0] is ref:
        del _recorded[key]


def record_outputs(outputs, facts: dict[int, object]) -> None:
    """After a call: remember the fact of each output tensor at the positions ``facts`` names."""
    for index, fact in facts.items():
        t = outputs[index] if index < len(outputs) else None
        if isinstance(t, torch.Tensor):
            record_tensor(t, fact)


def record_tensor(t: torch.Tensor, fact) -> None:
    """Remember ``fact`` for this very tensor object until it is written to or freed (also what
    frontends/group_sharding.py states about the shard it hands the model)."""
    key = id(t)
    _recorded[key] = (weakref.ref(t, lambda ref, key=key: _forget(ref, key)), t._version, fact)


def fact_of(t) -> object | None:
    """The fact recorded for this very tensor object, if it has not been written to since."""
    if not isinstance(t, torch.Tensor):
        return None
    entry = _recorded.get(id(t))
    if entry is None:
        return None
    ref, version, fact = entry
    return fact if ref() is t and t._version == version else None


def handed_facts(gm: fx.GraphModule, example_inputs) -> dict[fx.Node, object]:
    """Facts for the placeholders of ``gm`` whose example input an earlier graph returned."""
    seeds = {}
    for node, value in placeholder_inputs(gm, example_inputs):
        fact = fact_of(value)
        traced = node.meta.get("example_value")
        # Sizes of one graph's ShapeEnv mean nothing in another's: static sizes on both sides only.
        if (fact is not None and isinstance(traced, torch.Tensor) and traced.dim() == value.dim()
                and all(isinstance(s, int) for s in traced.shape) and _static_sizes(fact)):
            seeds[node] = fact
    return seeds


def _static_sizes(fact) -> bool:
    sizes = [getattr(fact, "prefix", 0), getattr(fact, "suffix", 0),
             *getattr(fact, "image_shape", ()), *getattr(fact, "sizes", ()),
             *(size for size, _ in getattr(fact, "lead", ()))]
    return all(isinstance(s, int) for s in sizes)


def fact_key(fact) -> tuple | None:
    """What a compiled variant relies on in a fact: its positions, image axes and image identity."""
    return None if fact is None else (_positions(fact), fact.batch, fact.image)


def output_facts(gm: fx.GraphModule, facts: dict[fx.Node, object]) -> dict[int, object]:
    """The facts of ``gm``'s outputs by their position in its (flat) output tuple."""
    out = gm.graph.output_node().args[0]
    if not isinstance(out, (tuple, list)):
        return {}
    return {i: facts[n] for i, n in enumerate(out) if isinstance(n, fx.Node) and facts.get(n) is not None}

"""``gridattn_fx.context_parallel``: diffusers' context parallelism, made traceable in one graph.

diffusers' ``model.enable_parallelism(config=ContextParallelConfig(...))`` installs hooks that split
the token sequence into one contiguous chunk per rank and gather it back; attention runs through
Ulysses' all-to-all (or ring attention). The pass follows the chunk and the all-to-all as
layout-carrying ops (layout/collectives.py), so every site it rewrites in one process it rewrites
here too, provided Dynamo captures the forward as one graph. Two things in diffusers 0.42 prevent
that on a fresh model:

* the split hooks read the module's forward signature with ``inspect.signature`` on their first
  call, which Dynamo cannot trace: it skips the whole model forward (eager, for any backend), and
  the patch embedding that proves the layout never reaches a graph. This call reads the signatures
  once, eagerly, as the hooks would.
* ``enable_parallelism`` picks ``rank % torch.accelerator.device_count()``, which divides by zero
  on a machine without an accelerator (gloo on CPU): one device is stood in for that call only.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn as nn


def context_parallel(model: nn.Module, config, *, cp_plan=None) -> nn.Module:
    """``model.enable_parallelism(config=config, cp_plan=cp_plan)`` (diffusers), then readies its
    hooks for one-graph capture. Returns ``model``. Compile afterwards as usual:
    ``torch.compile(model, backend="gridattn", options=..., dynamic=False)``."""
    if not hasattr(model, "enable_parallelism"):
        raise TypeError(f"context_parallel() takes a diffusers model (ModelMixin); got {type(model).__name__}")
    with _stand_in_device_count():
        model.enable_parallelism(config=config, cp_plan=cp_plan)
    primed = _prime_split_hooks(model)
    if primed == 0:
        raise RuntimeError("enable_parallelism installed no context-parallel split hook on this model: "
                           "nothing to ready (does its class define _cp_plan?)")
    return model


@contextlib.contextmanager
def _stand_in_device_count():
    if torch.accelerator.is_available():
        yield
        return
    real = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = real


def _prime_split_hooks(model: nn.Module) -> int:
    """Fill each split hook's parameter-index cache the way its first call would; returns how many."""
    from diffusers.hooks.context_parallel import ContextParallelSplitHook

    count = 0
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}).values():
            if not isinstance(hook, ContextParallelSplitHook):
                continue
            metadata = hook.module_forward_metadata
            if metadata.cached_parameter_indices is None:
                names = list(inspect.signature(metadata._cls.forward).parameters)[1:]  # without self
                metadata.cached_parameter_indices = {name: i for i, name in enumerate(names)}
            count += 1
    return count

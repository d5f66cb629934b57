"""Whether the module being compiled is in training mode, as the backend sees it.

Shuffle distributing applies only to ``model.train()``. A Dynamo graph does not carry
``module.training`` (a model that never reads it, e.g. one without dropout, leaves no trace of it),
and toggling ``model.eval()`` does not by itself make Dynamo recompile. So the backend reads the
flag from the module whose frame Dynamo is compiling and adds a guard on it: switching between
``train()`` and ``eval()`` then recompiles (once per mode, both graphs stay cached) and inference
never runs a shuffled graph.

This uses Dynamo internals (the current instruction translator, guard sources). Where they are
unavailable, or the compiled callable is not a module's method, the mode is unknown and the
caller falls back to straightforward distributing, saying so.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("gridattn_fx")


def compiled_module_training() -> tuple[bool | None, str]:
    """(training flag of the module Dynamo is compiling, how it was found); (None, why) if unknown.

    Must be called from inside a Dynamo backend call. On success a guard on ``<module>.training``
    has been installed, so the compiled graph is only reused in the same mode.
    """
    try:
        from torch._dynamo.guards import GuardBuilder
        from torch._dynamo.source import AttrSource, LocalSource
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        if tx is None:
            return None, "not called by Dynamo"
        root = tx.output.root_tx
        name = _module_local(root.f_code, root.f_locals)
        if name is None:
            return None, "the compiled frame has no nn.Module argument"
        module = root.f_locals[name]
        tx.output.guards.add(AttrSource(LocalSource(name), "training").make_guard(GuardBuilder.CONSTANT_MATCH))
        return bool(module.training), f"{type(module).__name__}.training (local {name!r})"
    except Exception as err:  # internals moved: an unknown mode, never a broken compile
        logger.debug("could not read the compiled module's training flag", exc_info=True)
        return None, f"Dynamo internals unavailable ({type(err).__name__})"


def _module_local(code, f_locals) -> str | None:
    """The frame's module argument: ``self`` if it is one, else the first module argument."""
    if isinstance(f_locals.get("self"), torch.nn.Module):
        return "self"
    for name in code.co_varnames[: code.co_argcount]:
        if isinstance(f_locals.get(name), torch.nn.Module):
            return name
    return None

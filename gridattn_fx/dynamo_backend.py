"""The ``gridattn`` torch.compile backend: rewrite the Dynamo graph, then hand it to inductor."""

from __future__ import annotations

import logging
import warnings

import torch.fx as fx

from .config import GridAttnConfig
from .passes.pipeline import run_pass
from .report import Report, record

logger = logging.getLogger("gridattn_fx")
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def apply_pass(gm: fx.GraphModule, example_inputs, config: GridAttnConfig) -> tuple[fx.GraphModule, Report]:
    """The pass with the backend's safety net: on failure, the original graph and a report saying so."""
    try:
        new_gm, report = run_pass(gm, example_inputs, config)
    except Exception as err:
        if config.strict:
            raise
        report = Report(failure=f"{type(err).__name__}: {err}", implementation=config.implementation)
        logger.exception("gridattn pass failed; compiling the original graph")
        _warn_once(f"gridattn: the rewrite pass failed ({report.failure}); the graph runs unmodified")
        new_gm = gm
    record(report)
    return new_gm, report


def backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """``torch.compile(model, backend="gridattn", options={...})``.

    Our options configure the pass (see :class:`GridAttnConfig`); inductor options and ``mode``
    are passed on to inductor unchanged.
    """
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    config, inductor_options = GridAttnConfig.from_options(options)
    patches = dict(list_mode_options(mode)) if mode else {}
    patches.update(inductor_options)
    new_gm, report = apply_pass(gm, example_inputs, config)
    if new_gm is gm:
        return compile_fx(gm, example_inputs, config_patches=patches or None)
    try:
        return compile_fx(new_gm, example_inputs, config_patches=patches or None)
    except Exception as err:
        if config.strict:
            raise
        report.failure = f"inductor failed on the rewritten graph: {type(err).__name__}: {err}"
        logger.exception("inductor failed on the rewritten graph; compiling the original graph")
        _warn_once(f"gridattn: {report.failure}; the graph runs unmodified")
        return compile_fx(gm, example_inputs, config_patches=patches or None)

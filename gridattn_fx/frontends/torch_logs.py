"""The report and the rewritten graph under torch's own logging, the way inductor's graphs appear:
``TORCH_LOGS`` names (registered by the top-level module gridattn_fx_torch_logs.py) and
structured-trace artifacts (``TORCH_TRACE=<dir>``, shown by tlparse)."""

from __future__ import annotations

import logging

import torch._logging
import torch.fx as fx


def _names_module():
    """The top-level gridattn_fx_torch_logs module; from the source tree next to this package when
    the installed metadata predates it (an editable install made before it existed)."""
    try:
        import gridattn_fx_torch_logs

        return gridattn_fx_torch_logs
    except ImportError:
        import importlib.util
        import os

        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gridattn_fx_torch_logs.py")
        spec = importlib.util.spec_from_file_location("gridattn_fx_torch_logs", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


_names = _names_module()
GRAPH_ARTIFACT, REPORT_ARTIFACT, register = _names.GRAPH_ARTIFACT, _names.REPORT_ARTIFACT, _names.register

# Also when the torch.backends entry point did not run (an environment where the package's
# metadata is older than this module): TORCH_LOGS cannot use the names then, set_logs() can.
register()

report_log: logging.Logger = torch._logging.getArtifactLogger("gridattn_fx", REPORT_ARTIFACT)
graph_log: logging.Logger = torch._logging.getArtifactLogger("gridattn_fx", GRAPH_ARTIFACT)


def publish(gm: fx.GraphModule, report) -> None:
    """Log the rewritten graph (debug, ``gridattn_graph``) and put the report and the graph into
    the structured trace as artifacts named ``gridattn_report`` / ``gridattn_rewritten_graph``."""
    graph_log.debug("gridattn rewritten graph:\n%s", _LazyGraph(gm))
    torch._logging.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": "gridattn_report", "encoding": "string"},
        payload_fn=lambda: str(report),
    )
    torch._logging.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": "gridattn_rewritten_graph", "encoding": "string"},
        payload_fn=lambda: _readable(gm),
    )


def _readable(gm: fx.GraphModule) -> str:
    return gm.print_readable(print_output=False, include_stride=True, include_device=True)


class _LazyGraph:
    """Formats the graph only when a handler really emits the record."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm

    def __str__(self) -> str:
        return _readable(self.gm)

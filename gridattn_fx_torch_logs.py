"""Registers gridattn-fx's names with torch's logging (``TORCH_LOGS``), before torch parses it.

torch parses ``TORCH_LOGS`` once, at the end of ``import torch``, and rejects names it does not
know. Right before that it loads the ``torch.backends`` entry points, so that plugins can register
their log names first (see the comment above ``_logging._init_logs()`` in torch's ``__init__``).
pyproject.toml points that entry point here. This is a top-level module, not part of the
``gridattn_fx`` package, so that every ``import torch`` does not import the whole package; it
imports nothing but ``torch._logging``.

    TORCH_LOGS="+gridattn"          the gridattn_fx logger at DEBUG: reports and rewritten graphs
    TORCH_LOGS="gridattn"           at INFO: the reports
    TORCH_LOGS="gridattn_report"    only the reports;  TORCH_LOGS="gridattn_graph": only the graphs
"""

LOG_ALIAS = "gridattn"            # the gridattn_fx logger
REPORT_ARTIFACT = "gridattn_report"
GRAPH_ARTIFACT = "gridattn_graph"


def register() -> None:
    """Idempotent; never raises (a failure here would make ``import torch`` fail)."""
    try:
        from torch._logging._internal import log_registry, register_artifact, register_log

        if not log_registry.is_log(LOG_ALIAS):
            register_log(LOG_ALIAS, ["gridattn_fx"])
        if not log_registry.is_artifact(REPORT_ARTIFACT):
            register_artifact(REPORT_ARTIFACT, "gridattn-fx rewrite report: every attention site's decision",
                              visible=True)
        if not log_registry.is_artifact(GRAPH_ARTIFACT):
            register_artifact(GRAPH_ARTIFACT, "the FX graph after the gridattn rewrite", visible=True)
    except Exception:  # an unknown torch layout: TORCH_LOGS="+gridattn_fx" (a module name) still works
        pass

"""The graph breaks Dynamo met before a graph reached the backend, for that graph's report.

Code Dynamo could not capture runs eagerly, and no backend ever sees the attention in it (Mochi's
attention processor breaks at a data-dependent ``nonzero``). The backend cannot count those calls
(``python -m gridattn_fx coverage`` does, with a profiler), but it can name the breaks and the
Dynamo setting that would capture them, which Dynamo's own hint gives.
"""

from __future__ import annotations

import re

import torch

# Dynamo's hint for a break that one of its options would capture
CAPTURE_SETTING = re.compile(r"torch\._dynamo\.config\.(\w+)\s*=\s*True")

# reason -> how often Dynamo had counted it when the last graph reached the backend
_seen: dict[str, int] = {}


def describe(reason) -> str:
    """A break reason's first line, with its hint if it has one."""
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    hint = next((line for line in lines if line.startswith("Hint:")), "")
    return lines[0] + (f" ({hint})" if hint else "") if lines else ""


def _described(reasons) -> list[str]:
    """The distinct descriptions of ``reasons``, in order."""
    return list(dict.fromkeys(text for text in map(describe, reasons) if text))


def all_graph_breaks() -> list[str]:
    """Every break Dynamo counted since its counters were last cleared (``torch._dynamo.reset()``)."""
    return _described(torch._dynamo.utils.counters["graph_break"])


def new_graph_breaks() -> list[str]:
    """The breaks counted since the previous call (a count that went down was cleared: new again)."""
    counted = dict(torch._dynamo.utils.counters["graph_break"])
    new = [reason for reason, n in counted.items() if n != _seen.get(reason, 0)]
    _seen.clear()
    _seen.update(counted)
    return _described(new)


def capture_settings(breaks: list[str]) -> list[str]:
    """The ``torch._dynamo.config`` options the breaks' hints name."""
    return sorted({m.group(1) for b in breaks for m in CAPTURE_SETTING.finditer(b)})

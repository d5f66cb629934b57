"""Why a site stays dense, as data: a kind from one enum, plus a detail sentence for humans.

The report prints the detail; code that needs to know *why* (the backend's warning about symbolic
sizes, the report command's totals, tests) reads the kind. No code parses a reason string.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class SkipKind(enum.Enum):
    """Each kind's value is how the report command's totals name it."""

    SCORES_WRITTEN = "attention scores written in place (not an exact site)"
    UNREADABLE = "attention the pattern reader cannot read exactly"
    STRIDE_ONE = "stride 1"
    CAUSAL = "causal attention"
    NO_QUERY_LAYOUT = "query tokens have no proven image layout"
    NO_KEY_LAYOUT = "key tokens have no image layout (cross-attention to text/prompts)"
    CROSS_IMAGE = "queries and keys from different images"
    NOT_SELECTED = "left out by include/exclude"
    UNKNOWN_SIZES = "sizes without a known value"
    LENGTH_MISMATCH = "sequence lengths not provably those of the layouts"
    SYMBOLIC = "symbolic (dynamic) sizes"
    RANK_MISMATCH = "query and key images differ in rank"
    TOO_FEW_TOKENS = "fewer image tokens than min_image_tokens"
    STRIDE_TOO_LARGE = "stride larger than an image axis"
    DEGENERATE = "one image key per group"
    GROUPING = "the grouping does not apply to this site"
    SHAPES = "unsupported ranks or mask shape"
    RELPOS_MISMATCH = "relative-position bias on another grid"
    REGION_DISAGREEMENT = "modules sharing one graph are decided differently"
    REPLACEMENT_FAILED = "replacement failed its check"
    PASS_FAILED = "the rewrite pass failed"


@dataclass(frozen=True)
class Skip:
    """A site left dense: ``kind`` for code, ``detail`` for the report.

    ``lost_at``: for the two layout kinds, the op at which the image layout was lost (None when no
    spatial source reaches the site at all). ``warning``: a sentence the pipeline also raises as a
    warning, once per graph (an option that can never apply would otherwise do nothing silently).
    """

    kind: SkipKind
    detail: str
    lost_at: str | None = None
    warning: str | None = None

    def __str__(self) -> str:
        return self.detail

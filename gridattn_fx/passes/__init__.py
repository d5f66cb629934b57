"""Graph passes: layout inference, the rewrite policy, the grid rewrite, and the pipeline tying them."""

from ..layout.analysis import LayoutAnalysis
from .pipeline import run_pass

__all__ = ["LayoutAnalysis", "run_pass"]

"""Layout analysis: prove, from a graph's own dataflow, which tensor axes are images."""

from .analysis import LayoutAnalysis

__all__ = ["LayoutAnalysis"]

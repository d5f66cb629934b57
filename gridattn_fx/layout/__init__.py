"""Layout analysis: prove, from a graph's own dataflow, which tensor axes are images.

``facts`` (what is known about a tensor's axes), ``analysis`` (the forward pass over a graph, one
transfer function per kind of the op catalogue), ``reshape`` (the axis algebra of reshapes,
permutes, indexing, broadcasting), ``mutation`` (writes and aliases that break a proof).
"""

from .analysis import LayoutAnalysis

__all__ = ["LayoutAnalysis"]

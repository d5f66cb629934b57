"""The pass on one graph: the pipeline (find, prove, decide, rewrite, re-check), the policy's rules,
the inlining of a site's replacement, and the regroup motion."""

from .pipeline import run_pass

__all__ = ["run_pass"]

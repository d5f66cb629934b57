"""gridattn-fx benchmarks: ``python -m benchmarks --help`` (results and commands: benchmarks/RESULTS.md)."""

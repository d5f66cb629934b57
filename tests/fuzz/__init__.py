"""Differential fuzzer for the gridattn pass: see README.md next to this file.

``generator`` builds small random models from a seeded spec and knows the true token layout of
every attention site; ``check`` runs the pass on them and compares with the oracle.
"""

import os
import sys

# oracle.py is a plain module in tests/ (not a package): make it importable when this package is
# used outside pytest (``python -m tests.fuzz``); conftest.py does the same under pytest.
_TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

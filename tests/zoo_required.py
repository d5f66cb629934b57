"""What a zoo test does when its model library is missing: fail, saying how to install it.

The README's install command (scripts/install.sh, also run by .ci/run) installs the whole zoo, so
a missing library means a broken install, not a reason to skip. GRIDATTN_SKIP_ZOO=1 (which also
makes scripts/install_zoo.sh install nothing) asks for a run without the zoo: those tests skip.
"""

import os

import pytest


def missing_library(library: str) -> None:
    if os.environ.get("GRIDATTN_SKIP_ZOO", "0") == "1":
        pytest.skip(f"{library} is not installed and GRIDATTN_SKIP_ZOO=1")
    pytest.fail(f"{library} is not installed: run 'bash scripts/install.sh' "
                "(or set GRIDATTN_SKIP_ZOO=1 to skip the model-zoo tests)", pytrace=False)

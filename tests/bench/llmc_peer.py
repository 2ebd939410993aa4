"""Run llm-compressor (the peer) in its own venv, for the benchmark scripts beside this file.

llm-compressor pins other transformers / compressed-tensors versions than q, so it lives in
its own venv (``--llmc-python``, default ``$LLMC_PYTHON`` or ``.bench-venv/bin/python``;
``pip install llmcompressor`` there). Each run is a fresh subprocess given a JSON spec:

    {"model": DIR, "out": DIR, "windows": JSON-or-null,
     "recipe": [{"kind": "smoothquant" | "rtn" | "gptq", "kwargs": {...}}, ...]}

``rtn`` is ``QuantizationModifier`` (round to nearest, what q does), ``gptq`` is
``GPTQModifier``. ``windows`` is a JSON list of token-id lists (the calibration windows q
made, so both tools see the same tokens); null for data-free recipes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

CHILD = r"""
import json, sys
spec = json.load(open(sys.argv[1]))
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
kinds = {"smoothquant": SmoothQuantModifier, "rtn": QuantizationModifier, "gptq": GPTQModifier}
recipe = [kinds[m["kind"]](**m["kwargs"]) for m in spec["recipe"]]
data = {}
if spec.get("windows"):
    from datasets import Dataset
    ids = json.load(open(spec["windows"]))
    data = dict(dataset=Dataset.from_dict({"input_ids": ids,
                                           "attention_mask": [[1] * len(r) for r in ids]}),
                num_calibration_samples=len(ids), max_seq_length=len(ids[0]))
oneshot(model=spec["model"], recipe=recipe, output_dir=spec["out"], **data)
print("VmHWM_KiB", open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
"""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


class PeerFailed(RuntimeError):
    """The child exited non-zero; the message is the last exception line of its log."""


def default_python() -> str:
    return os.environ.get("LLMC_PYTHON", ".bench-venv/bin/python")


def run_child(cmd: list[str], log: Path) -> tuple[float, str]:
    """Run ``cmd``; (wall seconds, stdout). The whole output goes to ``log``."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        errors = [ln for ln in proc.stderr.splitlines() if "Error: " in ln]
        reason = errors[-1] if errors else f"exit {proc.returncode}"
        raise PeerFailed(f"{cmd[0]} failed ({reason[:300]}); see {log}")
    return wall, proc.stdout


def value(stdout: str, key: str) -> float:
    """The number after ``key`` on the first stdout line that starts with it."""
    line = next(ln for ln in stdout.splitlines() if ln.startswith(key + " "))
    return float(line.split()[1])


def llmc_quantize(python: str, model: Path, out: Path, recipe: list[dict],
                  windows: Path | None, log: Path) -> dict:
    """Quantize ``model`` into ``out`` with llm-compressor; wall time and peak RSS.

    Tokenizer files oneshot did not write are copied from ``model`` so q can load ``out``.
    """
    spec = out.with_suffix(".spec.json")
    spec.write_text(json.dumps({"model": str(model), "out": str(out), "recipe": recipe,
                                "windows": str(windows) if windows else None}))
    if out.exists():
        shutil.rmtree(out)
    wall, stdout = run_child([python, "-c", CHILD, str(spec)], log)
    for name in TOKENIZER_FILES:
        if (model / name).is_file() and not (out / name).exists():
            shutil.copy2(model / name, out / name)
    return {"wall_s": wall, "peak_rss_mib": value(stdout, "VmHWM_KiB") / 1024}

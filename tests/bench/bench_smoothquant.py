#!/usr/bin/env python3
"""Benchmark SmoothQuant calibration + int8 W8A8: q against llm-compressor, on CPU.

Not a pytest test (tests/bench/conftest.py keeps pytest away). Run it with q's venv:

    python tests/bench/bench_smoothquant.py --samples 16 --seqlen 128 --ppl

What it does:

1. Makes the calibration windows once with ``q.calibdata.load_calibration`` (``--calib``,
   default Botchan) and saves them, so both tools see the same tokens.
2. Runs each tool in a fresh subprocess, one at a time:
   q     ``q.quantize(MODEL, "smoothquant", OUT, calib=..., calib_samples=N,
         calib_seqlen=L)`` (compressed-tensors int8 W8A8, alpha 0.5)
   llmc  llm-compressor ``oneshot`` with ``[SmoothQuantModifier(smoothing_strength=0.5),
         QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]`` on
         the same windows (a ``datasets.Dataset`` of input_ids), in its own venv
         (--llmc-python, default $LLMC_PYTHON or .bench-venv/bin/python)
   llmc-gptq  the same with ``GPTQModifier`` instead of ``QuantizationModifier`` (the recipe
         of llm-compressor's ``examples/quantization_w8a8_int8``; more work than q does)
   Wall time is measured around the child (interpreter start, imports and writing the
   output included); peak RSS is the child's own VmHWM.
3. With --ppl, runs both outputs in q's native engine (int8 weights, dynamic per-token
   int8 activations) on the Lee corpus, 8 x 256 tokens, so the two results can be compared.
4. Prints a markdown table (and writes WORKDIR/results.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from llmc_peer import default_python, llmc_quantize, run_child, value

Q_CHILD = r"""
import sys, warnings, q
warnings.simplefilter("ignore")
model, calib, n, length, alpha, out = sys.argv[1:7]
q.quantize(model, "smoothquant", out, calib=calib, calib_samples=int(n),
           calib_seqlen=int(length), args={"alpha": float(alpha)}, overwrite=True,
           progress=False)
print("VmHWM_KiB", open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
"""

PPL_CHILD = r"""
import sys, torch
from q.evaluate import perplexity
from transformers import AutoTokenizer
from q.textdata import real_text
path, tokenizer = sys.argv[1:3]
ids = AutoTokenizer.from_pretrained(tokenizer)(real_text("lee")).input_ids
ids = torch.tensor(ids[: 8 * 256]).view(8, 256)
print("PPL", perplexity(path, ids))
"""


def main() -> int:
    import q
    from q.calibdata import load_calibration

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HF model dir (default: q's embedded SmolLM2)")
    parser.add_argument("--calib", default="botchan")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--tools", default="q,llmc")
    parser.add_argument("--ppl", action="store_true", help="perplexity of each output")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/q-bench-smoothquant"))
    parser.add_argument("--llmc-python", default=default_python())
    args = parser.parse_args()
    model = Path(args.model or q.default_model())
    args.workdir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 16 x 128 is below q's "reliable" threshold
        data = load_calibration(model, args.calib, args.samples, args.seqlen)
    windows = args.workdir / "windows.json"
    windows.write_text(json.dumps(data.input_ids.tolist()))
    print(f"model {model}\ncalibration {args.calib}: {args.samples} x {args.seqlen} tokens; "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results = []
    for tool in args.tools.split(","):
        out = args.workdir / f"out-{tool}"
        if tool == "q":
            cmd = [sys.executable, "-c", Q_CHILD, str(model), args.calib, str(args.samples),
                   str(args.seqlen), str(args.alpha), str(out)]
            wall, stdout = run_child(cmd, args.workdir / f"{tool}.log")
            row = {"tool": tool, "wall_s": wall,
                   "peak_rss_mib": value(stdout, "VmHWM_KiB") / 1024}
        else:
            quantizer = "gptq" if tool == "llmc-gptq" else "rtn"
            recipe = [{"kind": "smoothquant", "kwargs": {"smoothing_strength": args.alpha}},
                      {"kind": quantizer, "kwargs": {"targets": "Linear", "scheme": "W8A8",
                                                     "ignore": ["lm_head"]}}]
            row = {"tool": tool, **llmc_quantize(args.llmc_python, model, out, recipe,
                                                 windows, args.workdir / f"{tool}.log")}
        if args.ppl:
            _, ppl_out = run_child([sys.executable, "-c", PPL_CHILD, str(out), str(model)],
                                   args.workdir / f"{tool}-ppl.log")
            row["ppl"] = value(ppl_out, "PPL")
        results.append(row)
        print(row, flush=True)
    base = next((r["wall_s"] for r in results if r["tool"] == "llmc"), None)
    print("\n| tool | wall s | peak RSS MiB | speed-up vs llmc |" + (" ppl (Lee) |" if args.ppl
                                                                      else ""))
    print("|---|---:|---:|---:|" + ("---:|" if args.ppl else ""))
    for r in results:
        speed = f"{base / r['wall_s']:.1f}x" if base else ""
        ppl = f" {r['ppl']:.3f} |" if args.ppl else ""
        print(f"| {r['tool']} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | {speed} |{ppl}")
    (args.workdir / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

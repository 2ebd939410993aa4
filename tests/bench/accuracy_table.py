#!/usr/bin/env python3
"""The accuracy table: every q scheme on SmolLM2, and llm-compressor's output for the same
scheme, all measured by ``q.evaluate`` (what ``q eval OUT --reference MODEL`` runs).

    LLMC_PYTHON=.bench-venv/bin/python python tests/bench/accuracy_table.py

For each case: q quantizes (``q.quantize``, in process); llm-compressor (``oneshot`` in its
own venv, see llmc_peer.py) quantizes the same scheme with round to nearest, like q; then
``q.evaluate(OUT, reference=MODEL)`` runs each output through q's native engine (activation
quantization included) on held-out text (Lee corpus, 8 x 256 tokens): perplexity, mean KL
and top-1 agreement of the next-token distributions against the unquantized model, and the
verdict. Size is the checkpoint's safetensors bytes. Calibrated cases (SmoothQuant, GPTQ)
use the same calibration windows for both tools (``q.calibdata``, Botchan by default).

Prints a markdown table and writes WORKDIR/results.json. ``--only`` picks cases by label
substring; ``--tools q`` skips the peer.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import warnings
from pathlib import Path

from llmc_peer import PeerFailed, default_python, llmc_quantize


def _group(kind: str, strategy: str, bits: int = 8, group: int | None = None) -> dict:
    return {"num_bits": bits, "type": kind, "strategy": strategy, "symmetric": True,
            "dynamic": False, **({"group_size": group} if group else {})}


_TOKEN_FP8 = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
              "dynamic": True}


def _rtn(scheme=None, weights=None, acts=None) -> dict:
    """A QuantizationModifier on every Linear but lm_head (q keeps lm_head too)."""
    kwargs = {"targets": "Linear", "ignore": ["lm_head"]}
    if scheme:
        kwargs["scheme"] = scheme
    else:
        kwargs["config_groups"] = {"group_0": {"targets": ["Linear"], "weights": weights,
                                               "input_activations": acts}}
    return {"kind": "rtn", "kwargs": kwargs}


def _sq(alpha: float) -> dict:
    return {"kind": "smoothquant", "kwargs": {"smoothing_strength": alpha}}


# (label, q scheme, q args, q ragged, calibrated, llm-compressor recipe or None)
CASES = [
    ("fp8-block", "fp8-block", {}, "quantize", False, [_rtn("FP8_BLOCK")]),
    ("fp8-dynamic", "fp8-dynamic", {}, "skip", False, [_rtn("FP8_DYNAMIC")]),
    ("fp8-tensor", "fp8-tensor", {}, "skip", False,
     [_rtn(weights=_group("float", "tensor"), acts=_TOKEN_FP8)]),
    # (llm-compressor's W8A16 preset is group 128, which SmolLM2's 576 columns refuse)
    ("wint8", "wint8", {}, "skip", False, [_rtn(weights=_group("int", "channel"))]),
    ("wint4 per-channel", "wint4", {}, "skip", False,
     [_rtn(weights=_group("int", "channel", bits=4))]),
    ("wint4 g64", "wint4", {"group_size": 64}, "skip", False,
     [_rtn(weights=_group("int", "group", bits=4, group=64))]),
    ("wint4 g128", "wint4", {"group_size": 128}, "quantize", False, [_rtn("W4A16")]),
    ("w8a8-int8 (no smoothing)", "w8a8-int8", {}, "skip", False, [_rtn("W8A8")]),
    ("smoothquant int8", "smoothquant", {}, "skip", True, [_sq(0.5), _rtn("W8A8")]),
    ("smoothquant fp8", "smoothquant", {"quant_dtype": "fp8"}, "skip", True,
     [_sq(0.5), _rtn("FP8_DYNAMIC")]),
]
# llm-compressor's own recommended W4A16 recipe (GPTQ): more than q does; shown for context
GPTQ_CASE = ("wint4 g128, peer GPTQ", None, {}, "skip", True,
             [{"kind": "gptq", "kwargs": {"targets": "Linear", "scheme": "W4A16",
                                          "ignore": ["lm_head"]}}])


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6


def decoded(out: Path) -> dict:
    """Module name -> the QuantizedTensor q's reader makes of ``out``'s tensors."""
    import q
    from q.source import ModelSource

    source = ModelSource(out)
    _, reader = q.detect_format(source)
    return {m: reader.decode(m, {n: source.read(n) for n in names})
            for m, names in reader.quantized_modules().items()}


def weight_sqnr(out: Path, model: Path) -> float:
    """SQNR (dB) of every quantized Linear's dequantized weight against the source weight,
    pooled: a noise-free measure of the rounding itself (not for smoothed weights)."""
    import torch

    from q.source import ModelSource

    original = ModelSource(model)
    signal = noise = 0.0
    for module, qt in decoded(out).items():
        w = original.read(f"{module}.weight").double()
        signal += float(w.square().sum())
        noise += float((qt.dequantize(torch.float64) - w).square().sum())
    return 10 * math.log10(signal / noise)


def evaluate(out: Path, model: Path, args, smoothed: bool) -> dict:
    import q

    report = q.evaluate(out, reference=model, windows=args.windows,
                        window_len=args.window_len, progress=False)
    return {"size_mb": size_mb(out), "weight_sqnr_db": None if smoothed else
            weight_sqnr(out, model), "ppl": report.ppl, "ref_ppl": report.ref_ppl,
            "kl": report.kl_mean, "top1": report.top1_agreement, "verdict": report.verdict,
            "reason": report.reason, "format": report.format}


def main() -> int:
    import q
    from q.calibdata import load_calibration

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HF model dir (default: q's embedded SmolLM2)")
    parser.add_argument("--calib", default="botchan")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window-len", type=int, default=256)
    parser.add_argument("--tools", default="q,llmc")
    parser.add_argument("--gptq", action="store_true", help="add the peer's GPTQ W4A16 row")
    parser.add_argument("--only", help="comma-separated label substrings")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/q-accuracy"))
    parser.add_argument("--llmc-python", default=default_python())
    args = parser.parse_args()
    model = Path(args.model or q.default_model())
    tools = args.tools.split(",")
    args.workdir.mkdir(parents=True, exist_ok=True)
    cases = CASES + ([GPTQ_CASE] if args.gptq else [])
    if args.only:
        cases = [c for c in cases if any(s in c[0] for s in args.only.split(","))]
    windows = args.workdir / "windows.json"
    if any(c[4] for c in cases):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = load_calibration(model, args.calib, args.calib_samples, args.calib_seqlen)
        windows.write_text(json.dumps(data.input_ids.tolist()))
    calib = {"calib": args.calib, "calib_samples": args.calib_samples,
             "calib_seqlen": args.calib_seqlen}
    results = [{"case": "bf16", "tool": "", "size_mb": size_mb(model)}]
    for i, (label, scheme, sargs, ragged, calibrated, recipe) in enumerate(cases):
        for tool in tools:
            out = args.workdir / f"{i}-{tool}"
            if tool == "q" and scheme is not None:
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    q.quantize(model, scheme, out, args=sargs, ragged=ragged, progress=False,
                               **(calib if calibrated else {}))
                took = time.perf_counter() - t0
            elif tool == "llmc" and recipe is not None:
                try:
                    took = llmc_quantize(args.llmc_python, model, out, recipe,
                                         windows if calibrated else None,
                                         args.workdir / f"{i}-llmc.log")["wall_s"]
                except PeerFailed as exc:
                    results.append({"case": label, "tool": tool, "failed": str(exc)})
                    print(json.dumps(results[-1]), flush=True)
                    continue
            else:
                continue
            smoothed = any(step["kind"] == "smoothquant" for step in recipe or ())
            row = {"case": label, "tool": tool, "quantize_s": took,
                   **evaluate(out, model, args, smoothed)}
            results.append(row)
            print(json.dumps(row), flush=True)
            (args.workdir / "results.json").write_text(json.dumps(results, indent=1))
    ref = next((r["ref_ppl"] for r in results if r.get("ref_ppl")), None)
    results[0]["ppl"] = ref
    print(f"\nmodel {model.name}; eval: {args.windows} x {args.window_len} tokens of Lee; "
          f"calibration: {args.calib} {args.calib_samples} x {args.calib_seqlen}\n")
    print("| scheme | tool | size MB | weight SQNR dB | perplexity | vs bf16 | mean KL | "
          "top-1 agree | q eval verdict |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        if r["tool"] == "":
            print(f"| bf16 | | {r['size_mb']:.0f} | | {ref or float('nan'):.3f} | | | | |")
            continue
        if "failed" in r:
            print(f"| {r['case']} | {r['tool']} | | | | | | | refused: {r['failed'][:160]} |")
            continue
        sqnr = "" if r["weight_sqnr_db"] is None else f"{r['weight_sqnr_db']:.2f}"
        print(f"| {r['case']} | {r['tool']} | {r['size_mb']:.0f} | {sqnr} | {r['ppl']:.3f} | "
              f"{100 * (r['ppl'] / r['ref_ppl'] - 1):+.2f}% | {r['kl']:.4f} | "
              f"{100 * r['top1']:.1f}% | {r['verdict']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

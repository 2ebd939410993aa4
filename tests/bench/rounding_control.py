#!/usr/bin/env python3
"""Control for tests/bench/accuracy_table.py: is a q-vs-llm-compressor gap on one scheme in
the numerics, or in which near-tie codes happened to round which way?

    python tests/bench/rounding_control.py                  # wint4 g64, wint4, fp8-dynamic

q and llm-compressor compute the same scales bit for bit (docs/accuracy.md); they differ only
in the division before rounding: q divides in fp32 (``w / s`` exact to 24 bits, then round),
compressed-tensors divides bf16 by bf16 in bf16, so ``w / s`` is first rounded to 8 bits and
values near a rounding boundary can land on the other side. This script quantizes each
scheme twice with q, as shipped and with that one division emulated in bf16 (the scheme's
quantizer is wrapped in-process; nothing else changes), and scores both with ``q.evaluate``
on the same 32 x 256 Lee tokens as the table. Prints the codes that differ, weight SQNR,
perplexity, KL and top-1 agreement per variant.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from accuracy_table import decoded, weight_sqnr

CASES = {"wint4 g64": ("wint4", {"group_size": 64}), "wint4": ("wint4", {}),
         "fp8-dynamic": ("fp8-dynamic", {})}


def bf16_division_int(original):
    """``quantize_int_weight`` with the codes recomputed as compressed-tensors does."""
    def quantize(w, bits, group_size=None, scale_dtype=torch.float32, int_range="full"):
        codes, scale = original(w, bits, group_size, scale_dtype, int_range=int_range)
        n, k = w.shape
        g = group_size or k
        s = scale.to(torch.bfloat16).repeat_interleave(g, dim=1)[:, :k]
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        return (w.to(torch.bfloat16) / s).float().round().clamp(lo, hi).to(torch.int8), scale
    return quantize


def bf16_division_fp8(original):
    def quantize(w, fp8_dtype=torch.float8_e4m3fn, scale_dtype=torch.float32):
        codes, scale = original(w, fp8_dtype, scale_dtype)
        return (w.to(torch.bfloat16) / scale.to(torch.bfloat16)).to(fp8_dtype), scale
    return quantize


def main() -> int:
    import q
    import q.plugins.schemes.fp8 as fp8_scheme
    import q.plugins.schemes.weight_only as wo_scheme

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--text", default="lee", help="evaluation text (q.textdata name or .txt)")
    args = parser.parse_args()
    model = Path(q.default_model())
    print("| scheme | division | codes differing | weight SQNR dB | perplexity | mean KL | "
          "top-1 agree |\n|---|---|---:|---:|---:|---:|---:|", flush=True)
    originals = (wo_scheme.quantize_int_weight, fp8_scheme.quantize_fp8_per_channel)
    with tempfile.TemporaryDirectory(prefix="q-rounding-") as tmp:
        for label in args.cases.split(","):
            scheme, sargs = CASES[label]
            outs = {}
            for variant in ("fp32 (q)", "bf16 (compressed-tensors)"):
                emulate = variant.startswith("bf16")
                wo_scheme.quantize_int_weight = (bf16_division_int(originals[0]) if emulate
                                                 else originals[0])
                fp8_scheme.quantize_fp8_per_channel = (bf16_division_fp8(originals[1])
                                                       if emulate else originals[1])
                out = Path(tmp) / f"{label}-{emulate}".replace(" ", "_")
                q.quantize(model, scheme, out, args=sargs, progress=False)
                outs[variant] = out
                report = q.evaluate(out, reference=model, text=args.text,
                                    windows=args.windows, progress=False)
                differ = _differing(outs) if emulate else 0.0
                print(f"| {label} | {variant} | {100 * differ:.2f}% | "
                      f"{weight_sqnr(out, model):.2f} | {report.ppl:.3f} | "
                      f"{report.kl_mean:.4f} | {100 * report.top1_agreement:.1f}% |", flush=True)
    wo_scheme.quantize_int_weight, fp8_scheme.quantize_fp8_per_channel = originals
    return 0


def _differing(outs: dict) -> float:
    """Share of weight codes that differ between the two checkpoints."""
    first, second = (decoded(out) for out in outs.values())
    same = sum(int((qt.qdata == second[m].qdata).sum()) for m, qt in first.items())
    return 1 - same / sum(qt.qdata.numel() for qt in first.values())


if __name__ == "__main__":
    sys.exit(main())

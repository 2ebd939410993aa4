#!/usr/bin/env python3
"""SmolLM2 perplexity of every SmoothQuant variant q offers, with activation quantization.

Not a pytest test (the CI test, tests/test_smoothquant_smollm2.py, covers int8 alpha 0.5
against plain W8A8). Each case is quantized by ``q.quantize`` and run by q's native engine
(dynamic per-token activations), on the Lee corpus (8 x 256 tokens); calibration uses
Botchan, so calibration and evaluation text never overlap.

    python tests/bench/smoothquant_variants.py [--samples 16] [--seqlen 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch

CASES = [  # (label, scheme, args, calibrated)
    ("w8a8-int8 (no smoothing)", "w8a8-int8", {}, False),
    ("smoothquant int8, alpha 0.5", "smoothquant", {}, True),
    ("smoothquant int8, alpha 0.8", "smoothquant", {"alpha": 0.8}, True),
    ("smoothquant int8, alpha auto", "smoothquant", {"alpha": "auto"}, True),
    ("fp8-dynamic (no smoothing)", "fp8-dynamic", {}, False),
    ("smoothquant fp8, alpha 0.5", "smoothquant", {"quant_dtype": "fp8"}, True),
]


def main() -> None:
    import q
    from q.evaluate import perplexity
    from q.textdata import real_text
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    model = q.default_model()
    ids = AutoTokenizer.from_pretrained(model)(real_text("lee")).input_ids
    ids = torch.tensor(ids[: 8 * 256]).view(8, 256)
    base = perplexity(model, ids)
    print(f"calibration: botchan {args.samples} x {args.seqlen}; eval: lee 8 x 256\n")
    print("| case | perplexity | vs bf16 | quantize s |\n|---|---:|---:|---:|")
    print(f"| bf16 | {base:.3f} | | |", flush=True)
    with tempfile.TemporaryDirectory(prefix="q-sq-variants-") as tmp:
        for i, (label, scheme, sargs, calibrated) in enumerate(CASES):
            calib = dict(calib="botchan", calib_samples=args.samples,
                         calib_seqlen=args.seqlen) if calibrated else {}
            t0 = time.perf_counter()
            out = q.quantize(model, scheme, Path(tmp) / str(i), args=sargs, progress=False,
                             **calib).output
            took = time.perf_counter() - t0
            ppl = perplexity(out, ids)
            print(f"| {label} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% | {took:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()

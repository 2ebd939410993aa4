"""A decode step's projections on CPU, streamed in a model's order: q's C++ GEMVs against
torch's kernels, per scheme, in one run.

    python tests/bench/bench_decode_gemms_cpu.py [--layers 22] [--tokens 1,4,8,32]
        [--kernels wint4,bf16]     (default: all but the dequantizing paths)
        [--model smollm2]          (SmolLM2-135M's shapes, 30 layers, instead of TinyLlama's)

The weights of ``--layers`` layers of a 1.1B Llama (TinyLlama's shapes: q/k/v fused
2560x2048, o 2048x2048, gate/up fused 11264x2048, down 2048x5632; 22 layers are the whole
model, 0.97 G weights) are each a separate tensor and are multiplied in order, so every
weight comes from memory as in a real decode step, and nothing is written between calls
(tune_kernels_cpu.py times one shape at a time instead). Per scheme and token count, the
median of ``--repeat`` passes, ms, and the weight bytes streamed per second:

- int8 W8A8: ``amx`` (``scaled_gemm/amx_int8.cpp``, on CPUs with AMX-INT8 and AMX-BF16)
  and ``gemv`` (``scaled_gemm/int8_gemm.cpp``), scaling included, against ``_int_mm``
  (int32 out, its scaling not timed) and oneDNN's quantized Linear on a weight reordered
  once (``qlinear``: ``onednn.qlinear_prepack`` + ``qlinear_pointwise``, fp32 out, the
  per-token scale not timed; not one of the engine's kernels, see docs/benchmarks.md);
- weight-only int8: ``amx`` (``weight_only_gemm/amx_gemm.cpp``, on CPUs with AMX-BF16) and
  ``gemv`` (``weight_only_gemm/int8_gemv.cpp``) against ``_weight_int8pack_mm`` (dequantizing
  for the call: 630-640 ms at 8-32 tokens in the run docs/benchmarks.md quotes);
- weight-only int4 g64: ``amx`` (``weight_only_gemm/amx_int4.cpp``, on CPUs with AMX-BF16)
  and ``dequantize`` (unpacked to bf16 for the call) against ``_weight_int4pack_mm_for_cpu``;
- bf16: ``amx`` (``dense_gemm/amx_bf16.cpp``, on CPUs with AMX-BF16) against the
  oneDNN-prepacked Linear;
- from 9 tokens, the weight-only layers with the engine's ``woq_activations="int8"``
  (``..., int8 activations``: activations in blocks of 32, ``int8_activations.cpp``; and
  for wint8 ``..., per token``, the W8A8 kernel it ran before) against the same layers'
  exact ``amx`` path.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from q.kernels.act_quant import quantize_activation_cpu
from q.kernels.dense_gemm.cpp_impl import amx_unavailable as amx_bf16_unavailable
from q.kernels.dense_gemm.cpp_impl import bf16_amx, to_amx_bf16_layout
from q.kernels.dense_gemm.torch_impl import PackedLinear
from q.kernels.scaled_gemm.cpp_impl import amx_unavailable as amx_int8_unavailable
from q.kernels.scaled_gemm.cpp_impl import (int8_amx, int8_amx_pairs, int8_gemv,
                                            to_amx_int8_layout, weight_row_sums)
from q.kernels.weight_only_gemm.cpp_impl import (amx_unavailable, int8_weight_amx,
                                                 int8_weight_gemv, to_amx_layout)
from q.kernels.weight_only_gemm.torch_impl import WeightOnlyTorch

SHAPES = {  # (N, K) of one layer's projections, q/k/v and gate/up fused as the engine does
    "tinyllama": [(2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632)],
    "smollm2": [(960, 576), (576, 576), (3072, 576), (576, 1536)],
}


def _int8_layer(codes, scale, group, bits):
    try:
        return WeightOnlyTorch(codes, scale, group, bits, int8_activations=True)
    except ValueError:
        return None


def build(layer: list[tuple[int, int]], layers: int, amx: bool):
    g = torch.Generator().manual_seed(0)
    weights = []
    for n, k in layer * layers:
        codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        scale = torch.rand(n, generator=g) / 100 + 1e-3
        int4_codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
        int4_scale = torch.rand(n, k // 64, generator=g) / 100 + 1e-3
        int4 = WeightOnlyTorch(int4_codes, int4_scale, 64, 4, amx=False)
        int4_amx = WeightOnlyTorch(int4_codes, int4_scale, 64, 4) if amx else None
        # the engine's woq_activations="int8" (9+ tokens); None where it cannot run here
        int4_int8 = _int8_layer(int4_codes, int4_scale, 64, 4) if amx else None
        int8_int8 = _int8_layer(codes, scale[:, None], k, 8) if amx else None
        weights.append({"codes": codes, "scale": scale, "rowsum": weight_row_sums(codes),
                        "qlinear": torch.ops.onednn.qlinear_prepack(codes, None),
                        "zeros": torch.zeros(n, dtype=torch.long),
                        "scale_bf16": scale.bfloat16(), "int4": int4, "int4_amx": int4_amx,
                        "int4_int8": int4_int8, "int8_int8": int8_int8,
                        "amx": to_amx_layout(codes) if amx else None,
                        "amx_int8": to_amx_int8_layout(codes) if amx else None,
                        "bf16": PackedLinear((codes.float() * scale[:, None]).bfloat16(), amx=False),
                        "amx_bf16": to_amx_bf16_layout((codes.float() * scale[:, None])
                                                       .bfloat16()) if amx else None})
    return weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="tinyllama")
    ap.add_argument("--layers", type=int, default=None,
                    help="layers (default: the whole model, 22 or 30)")
    ap.add_argument("--tokens", default="1,4,8,32")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--kernels", default="",
                    help="comma-separated name prefixes to time (default: all), e.g. wint4,bf16")
    args = ap.parse_args()
    layer = SHAPES[args.model]
    args.layers = args.layers or {"tinyllama": 22, "smollm2": 30}[args.model]
    amx_reason = (amx_unavailable(16, 32) or amx_int8_unavailable(16, 64)
                  or amx_bf16_unavailable(16, 32))
    weights = build(layer, args.layers, amx_reason is None)
    gweights = sum(w["codes"].numel() for w in weights) / 1e9
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.layers} "
          f"layers of {args.model}'s projections, {gweights:.2f} G weights\n")
    print("| tokens | kernel | ms per step | GB/s of weights | speed-up over torch's |")
    print("|---:|---|---:|---:|---:|")
    for m in map(int, args.tokens.split(",")):
        g = torch.Generator().manual_seed(m)
        xq = {k: torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
              for _, k in layer}
        xs = torch.rand(m, generator=g) / 100
        xb = {k: torch.randn(m, k, generator=g).bfloat16() for _, k in layer}
        runs = {
            "W8A8 gemv": lambda w: int8_gemv(xq[w["codes"].shape[1]], xs, w["codes"],
                                             w["scale"], torch.bfloat16, w["rowsum"]),
            "W8A8 amx": lambda w: int8_amx(xq[w["codes"].shape[1]], xs, w["amx_int8"],
                                           w["scale"], w["rowsum"], torch.bfloat16),
            "W8A8 _int_mm": lambda w: torch._int_mm(xq[w["codes"].shape[1]], w["codes"].t()),
            "W8A8 qlinear": lambda w: torch.ops.onednn.qlinear_pointwise(
                xq[w["codes"].shape[1]], 1.0, 0, w["qlinear"], w["scale"], w["zeros"], None,
                1.0, 0, torch.float32, "none", [], ""),
            "wint8 gemv": lambda w: int8_weight_gemv(xb[w["codes"].shape[1]], w["codes"],
                                                     w["scale"]),
            "wint8 _weight_int8pack_mm": lambda w: torch.ops.aten._weight_int8pack_mm(
                xb[w["codes"].shape[1]], w["codes"], w["scale_bf16"]),
            "wint8 amx": lambda w: int8_weight_amx(xb[w["codes"].shape[1]], w["amx"],
                                                   w["scale"]),
            "wint4 g64 _weight_int4pack_mm": lambda w: w["int4"].run(
                xb[w["codes"].shape[1]], "int4pack"),
            "wint4 g64 dequantize": lambda w: w["int4"].run(xb[w["codes"].shape[1]],
                                                             "dequantize"),
            "wint4 g64 amx": lambda w: w["int4_amx"].run(xb[w["codes"].shape[1]], "amx"),
            "wint8 amx, int8 activations": lambda w: w["int8_int8"].run(
                xb[w["codes"].shape[1]], "amx"),
            "wint4 g64 amx, int8 activations": lambda w: w["int4_int8"].run(
                xb[w["codes"].shape[1]], "amx"),
            # what woq_activations="int8" ran before blocks of 32: one scale per token, on
            # the W8A8 kernel reading the pair layout (still the path of CPUs with tiles)
            "wint8 amx, int8 activations per token": lambda w: int8_amx_pairs(
                *quantize_activation_cpu(xb[w["codes"].shape[1]], None, torch.int8),
                w["amx"], w["scale"], w["rowsum"], torch.bfloat16),
            "bf16 prepacked": lambda w: w["bf16"](xb[w["codes"].shape[1]]),
            "bf16 amx": lambda w: bf16_amx(xb[w["codes"].shape[1]], w["amx_bf16"], None),
        }
        if amx_reason is not None:
            del runs["wint8 amx"], runs["W8A8 amx"], runs["wint4 g64 amx"], runs["bf16 amx"]
        if m < 9 or any(w["int4_int8"] is None for w in weights):  # int8 only from 9 tokens
            runs.pop("wint4 g64 amx, int8 activations", None)
        if m < 9 or any(w["int8_int8"] is None for w in weights):
            runs.pop("wint8 amx, int8 activations", None)
        if m < 9 or amx_reason is not None:
            runs.pop("wint8 amx, int8 activations per token", None)
        if args.kernels:
            runs = {name: run for name, run in runs.items()
                    if name.startswith(tuple(args.kernels.split(",")))}
        else:  # dequantizing writes a bf16 copy of every weight per pass (0.7-0.8 s): the
            # write-back slowed the kernel timed after it (wint4 amx at M = 1: 48.0 ms
            # after it, 34.8 without it), so it runs only when --kernels names it
            runs = {name: run for name, run in runs.items() if "dequantize" not in name}
        times = {name: [] for name in runs}
        for name, run in runs.items():  # warm-up pass
            for w in weights:
                run(w)
        for _ in range(args.repeat):  # interleaved, so a drift of the machine hits all
            for name, run in runs.items():
                start = time.perf_counter()
                for w in weights:
                    run(w)
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        versus = {"W8A8 gemv": "W8A8 _int_mm", "W8A8 amx": "W8A8 _int_mm",
                  "W8A8 qlinear": "W8A8 _int_mm",
                  "wint8 gemv": "wint8 _weight_int8pack_mm",
                  "wint8 amx": "wint8 _weight_int8pack_mm",
                  "wint4 g64 dequantize": "wint4 g64 _weight_int4pack_mm",
                  "wint4 g64 amx": "wint4 g64 _weight_int4pack_mm",
                  "wint8 amx, int8 activations": "wint8 amx",
                  "wint8 amx, int8 activations per token": "wint8 amx",
                  "wint4 g64 amx, int8 activations": "wint4 g64 amx",
                  "bf16 amx": "bf16 prepacked"}
        for name, t in med.items():
            nbytes = gweights * {"wint4": 0.5, "bf16 ": 2}.get(name[:5], 1)
            ratio = f"{med[versus[name]] / t:.2f}x" if versus.get(name) in med else ""
            print(f"| {m} | {name} | {t * 1e3:.1f} | {nbytes / t:.1f} | {ratio} |")


if __name__ == "__main__":
    with torch.inference_mode():
        main()

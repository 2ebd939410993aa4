"""int8 W8A8 GEMM candidates on CPU at decode and prefill sizes, against bf16, in one run.

It records why oneDNN's quantized Linear is not one of the engine's W8A8 kernels: it needs
the weight reordered into its own layout, a second copy beside the plain int8 weight that
the decode GEMV reads, for a gain at prompt sizes only (docs/benchmarks.md).

    python tests/bench/bench_int8_gemm_cpu.py

- ``gemv``: q's C++ GEMV (``scaled_gemm/int8_gemm.cpp``), what the engine runs for a few
  tokens (scaling included);
- ``int_mm``: what the engine runs above the GEMV's sizes (``torch._int_mm(xq, w.t())``, int32
  out; the per-token and per-channel scaling that follows is not timed);
- ``qlinear``: oneDNN's quantized Linear with the weight prepacked once
  (``torch.ops.onednn.qlinear_prepack`` + ``qlinear_pointwise``: int8 activations with zero
  point 0 and scale 1, per-channel weight scales, fp32 out; the per-token scale is one
  multiply after it, timed);
- ``bf16``: the prepacked bf16 Linear q runs for unquantized layers (the same weight
  dequantized), for reference.

Shapes: the 1.1B Llama's (TinyLlama) four GEMMs of a layer, summed; weights come from
memory (a buffer of twice the last-level cache is read between timed calls, as in
tune_kernels_cpu.py). Each candidate is first checked against the exact int32 product
(relative error printed). Times are medians of ``--repeat`` calls, ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tune_kernels_cpu import EVICT  # the cache-evicting buffer

from q.kernels.dense_gemm.torch_impl import PackedLinear
from q.kernels.scaled_gemm.cpp_impl import int8_gemv, weight_row_sums

SHAPES = [(2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632)]  # (N, K): qkv, o, gate_up, down
MS = [1, 4, 8, 16, 32, 128, 512, 2048]


def timed(fn, repeat: int) -> float:
    fn()
    times = []
    for i in range(repeat):
        EVICT.sum()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    totals = {m: {"gemv": 0.0, "int_mm": 0.0, "qlinear": 0.0, "bf16": 0.0} for m in MS}
    errors = {"int_mm": 0.0, "qlinear": 0.0}
    for n, k in SHAPES:
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        ws = torch.rand(n, generator=g) / 100 + 1e-3
        packed = torch.ops.onednn.qlinear_prepack(w, None)
        zero_points = torch.zeros(n, dtype=torch.long)
        rowsum = weight_row_sums(w)
        dense = PackedLinear((w.float() * ws[:, None]).bfloat16(), amx=False)
        for m in MS:
            xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
            xs = torch.rand(m, 1, generator=g) / 100 + 1e-3
            exact = (xq.double() @ w.double().t()) * xs.double() * ws.double()
            xb = (xq.float() * xs).bfloat16()

            def int_mm():
                return torch._int_mm(xq, w.t())

            def qlinear():
                return torch.ops.onednn.qlinear_pointwise(
                    xq, 1.0, 0, packed, ws, zero_points, None, 1.0, 0, torch.float32, "none",
                    [], "") * xs

            checks = {"int_mm": int_mm().double() * xs.double() * ws.double(),
                      "qlinear": qlinear().double()}
            for name, got in checks.items():
                errors[name] = max(errors[name],
                                   float((got - exact).norm() / exact.norm()))
            def gemv():
                return int8_gemv(xq, xs, w, ws, torch.bfloat16, rowsum)

            for name, fn in (("gemv", gemv), ("int_mm", int_mm), ("qlinear", qlinear),
                             ("bf16", lambda: dense(xb))):
                if name == "gemv" and m > 32:
                    continue  # a few tokens' kernel
                totals[m][name] += timed(fn, args.repeat)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, capability "
          f"{torch.backends.cpu.get_cpu_capability()}; largest relative error against the "
          f"exact product: int_mm {errors['int_mm']:.1e}, qlinear {errors['qlinear']:.1e}\n")
    print("ms per layer (4 GEMMs of TinyLlama-1.1B's shape), weights from memory\n")
    print("| M | gemv | int_mm | qlinear | bf16 prepacked | qlinear speed-up over the "
          "faster of gemv and int_mm |")
    print("|---:|---:|---:|---:|---:|---:|")
    for m, t in totals.items():
        best = min(t["int_mm"], t["gemv"] or float("inf"))
        gemv = f"{t['gemv'] * 1e3:.2f}" if t["gemv"] else "-"
        print(f"| {m} | {gemv} | {t['int_mm'] * 1e3:.2f} | {t['qlinear'] * 1e3:.2f} | "
              f"{t['bf16'] * 1e3:.2f} | {best / t['qlinear']:.2f}x |")


if __name__ == "__main__":
    with torch.inference_mode():
        main()

"""q's small C++ CPU kernels against the torch ops they replace, in the same run.

    python tests/bench/bench_cpu_small_ops.py

Per op, at M = 1 (a decode step of one request), 32 and 2048 rows (a prefill step), bf16:

- per-token int8 activation quantization over 576 features (``q.kernels.act_quant``;
  torch: the reference's ops);
- the W8A8 epilogue, int32 sums -> bf16 scaled per token and channel, N = 3072
  (``q.kernels.scaled_gemm.cpp_impl.int8_epilogue``; torch: float, two products, cast);
- the weight-only int8 dequantization of a 1.1B Llama's gate projection, 5632 x 2048
  (``q.kernels.weight_only_gemm.cpp_impl.dequantize_int8``; torch: convert, scale).

Then the W8A8 projections of a whole SmolLM2-135M decode step (q, k, v, o, gate, up,
down of its 30 layers: 106 MB of int8 weights, so each comes from memory as in a real
step) for M = 1, 2 and 4: q's C++ GEMV against ``_int_mm`` + the C++ epilogue. Last, the
greedy pick of a decode step over SmolLM2's vocabulary (49152 fp32 logits per request):
``argmax(-1)`` against ``max(-1).indices``, which the engine uses (the same token), and
over the bf16 logits the model gives: converted to fp32 first, or not. Times are medians of repeated calls (bench_moe.time_cpu) at torch's thread count.
"""

from __future__ import annotations

import argparse

import torch
from bench_moe import time_cpu  # median ms of repeated calls after a warm-up

from q.kernels.act_quant import cpp_impl as act_cpp
from q.kernels.act_quant.reference import quantize_activation
from q.kernels.scaled_gemm import cpp_impl as int8_cpp
from q.kernels.weight_only_gemm import cpp_impl as dequant_cpp

SMOLLM2_LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
                 (576, 1536)]  # q, k, v, o, gate, up, down: (N, K)


def small_ops(repeat: int) -> None:
    print("| op | M | C++ (ms) | torch ops (ms) | torch / C++ |")
    print("|---|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for m in (1, 32, 2048):
        x = torch.randn(m, 576, generator=g).bfloat16()
        acc = torch.randint(-2**20, 2**20, (m, 3072), generator=g, dtype=torch.int32)
        xs, ws = torch.rand(m, 1, generator=g), torch.rand(1, 3072, generator=g)
        rows = [
            ("int8 activation quantization, 576", lambda: act_cpp.quantize_int8_per_token(x),
             lambda: quantize_activation(x, None, torch.int8)),
            ("W8A8 epilogue, N = 3072", lambda: int8_cpp.int8_epilogue(acc, xs, ws,
                                                                        torch.bfloat16),
             lambda: acc.float().mul_(xs).mul_(ws).to(torch.bfloat16)),
        ]
        for name, cpp, ref in rows:
            a, b = time_cpu(cpp, repeat), time_cpu(ref, repeat)
            print(f"| {name} | {m} | {a:.3f} | {b:.3f} | {b / a:.1f}x |")
    codes = torch.randint(-127, 128, (5632, 2048), generator=g, dtype=torch.int8)
    scale = torch.rand(5632, 1, generator=g).bfloat16()
    a = time_cpu(lambda: dequant_cpp.dequantize_int8(codes, scale, None, 2048), repeat)
    b = time_cpu(lambda: codes.to(torch.bfloat16).mul_(scale), repeat)
    print(f"| int8 weight -> bf16, 5632 x 2048 | - | {a:.3f} | {b:.3f} | {b / a:.1f}x |")


def decode_step_gemms(repeat: int) -> None:
    g = torch.Generator().manual_seed(1)
    shapes = SMOLLM2_LAYER * 30
    weights = [torch.randint(-127, 128, s, generator=g, dtype=torch.int8) for s in shapes]
    scales = [torch.rand(1, n, generator=g) for n, _ in shapes]
    sums = [int8_cpp.weight_row_sums(w) for w in weights]  # the engine keeps them
    mb = sum(n * k for n, k in shapes) / 1e6
    print(f"\nW8A8 projections of one SmolLM2-135M decode step ({mb:.0f} MB of int8 weights)\n")
    print("| M | C++ GEMV (ms) | GB/s | _int_mm + C++ epilogue (ms) | GB/s | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    for m in (1, 2, 4):
        acts = {k: (torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8),
                    torch.rand(m, 1, generator=g)) for k in (576, 1536)}

        def gemv():
            for (n, k), w, s, r in zip(shapes, weights, scales, sums):
                int8_cpp.int8_gemv(*acts[k], w, s, torch.bfloat16, r)

        def int_mm():
            for (n, k), w, s in zip(shapes, weights, scales):
                int8_cpp.int8_epilogue(torch._int_mm(acts[k][0], w.t()), acts[k][1], s,
                                       torch.bfloat16)
        a, b = time_cpu(gemv, max(3, repeat // 10)), time_cpu(int_mm, max(3, repeat // 10))
        print(f"| {m} | {a:.2f} | {mb / a:.1f} | {b:.2f} | {mb / b:.1f} | {b / a:.2f}x |")


def greedy_pick(repeat: int) -> None:
    print("\nGreedy pick over 49152 fp32 logits per request\n")
    print("| requests | argmax (ms) | max(-1).indices (ms) | speed-up |")
    print("|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for rows in (1, 32):
        logits = torch.randn(rows, 49152, generator=g)
        assert torch.equal(logits.argmax(-1), logits.max(-1).indices)
        a = time_cpu(lambda: logits.argmax(-1), repeat)
        b = time_cpu(lambda: logits.max(-1).indices, repeat)
        print(f"| {rows} | {a:.3f} | {b:.3f} | {a / b:.2f}x |")
    # the model's logits are bf16: converting them to fp32 first changes no value (bf16 ->
    # fp32 is exact), so the pick is the same token either way
    print("\nGreedy pick over 49152 bf16 logits per request (what the model gives)\n")
    print("| requests | to fp32, then max(-1).indices (ms) | max(-1).indices in bf16 (ms) "
          "| speed-up |")
    print("|---:|---:|---:|---:|")
    for rows in (1, 32):
        logits = torch.randn(rows, 49152, generator=g).bfloat16()
        assert torch.equal(logits.float().max(-1).indices, logits.max(-1).indices)
        a = time_cpu(lambda: logits.float().max(-1).indices, repeat)
        b = time_cpu(lambda: logits.max(-1).indices, repeat)
        print(f"| {rows} | {a:.3f} | {b:.3f} | {a / b:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=100)
    args = ap.parse_args()
    why = int8_cpp.unavailable_reason()
    if why is not None:
        raise SystemExit(f"the C++ int8 kernels do not build here: {why}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    small_ops(args.repeat)
    decode_step_gemms(args.repeat)
    greedy_pick(args.repeat)


if __name__ == "__main__":
    with torch.inference_mode():
        main()

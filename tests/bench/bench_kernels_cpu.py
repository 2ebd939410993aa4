"""Throughput of each reference quantizer on the CPU (M elements/s).

    python tests/bench/bench_kernels_cpu.py                    # as q runs them: 1 thread
    python tests/bench/bench_kernels_cpu.py --threads 2        # torch intra-op threads
    python tests/bench/bench_kernels_cpu.py --stripe 1000000000  # whole tensor at once

Bf16 weights of Llama-3B shapes, new data each call (not cache-hot). q's pipeline runs one
compute thread per core with torch single-threaded, and stripes of STRIPE_ELEMENTS.
"""

from __future__ import annotations

import argparse
import time

import torch

from q.kernels.fp8_block import quantize_fp8_block
from q.kernels.fp8_rowwise import quantize_fp8_per_channel, quantize_fp8_per_tensor
from q.kernels.int_weight import quantize_int_weight
from q.kernels.packing import pack_int32

OPS = {
    "fp8-block 128x128": lambda w: quantize_fp8_block(w),
    "fp8 per-channel": lambda w: quantize_fp8_per_channel(w, scale_dtype=torch.bfloat16),
    "fp8 per-tensor": lambda w: quantize_fp8_per_tensor(w, scale_dtype=torch.bfloat16),
    "int8 per-channel": lambda w: quantize_int_weight(w, 8, None, torch.bfloat16),
    "int4 group 128": lambda w: quantize_int_weight(w, 4, 128, torch.bfloat16),
    "int4 pack": lambda w: pack_int32(torch.zeros(w.shape, dtype=torch.int8), 4),
}


def main() -> None:
    import q.kernels.numerics as numerics

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--stripe", type=int, default=numerics.STRIPE_ELEMENTS,
                    help="elements per stripe (default: q's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    numerics.STRIPE_ELEMENTS = args.stripe
    print(f"threads={args.threads} stripe={args.stripe}")
    weights = [torch.randn(8192, 3072).bfloat16() for _ in range(4)]
    numel = sum(w.numel() for w in weights)
    print("| op | M elements/s | bf16 MB/s |\n|---|---:|---:|")
    for name, op in OPS.items():
        op(weights[0])
        start = time.perf_counter()
        for w in weights:
            op(w)
        rate = numel / (time.perf_counter() - start)
        print(f"| {name} | {rate / 1e6:.0f} | {2 * rate / 1e6:.0f} |")


if __name__ == "__main__":
    main()

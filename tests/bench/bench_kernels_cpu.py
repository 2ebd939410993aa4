"""Throughput of each reference quantizer on one CPU thread (M elements/s).

    python tests/bench/bench_kernels_cpu.py

Bf16 weights of Llama-3B shapes, new data each call (not cache-hot), torch single-threaded
as in q's pipeline (one compute thread per core).
"""

from __future__ import annotations

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
    torch.set_num_threads(1)
    weights = [torch.randn(8192, 3072).bfloat16() for _ in range(4)]
    numel = sum(w.numel() for w in weights)
    print("| op | M elements/s (1 thread) | bf16 MB/s |\n|---|---:|---:|")
    for name, op in OPS.items():
        op(weights[0])
        start = time.perf_counter()
        for w in weights:
            op(w)
        rate = numel / (time.perf_counter() - start)
        print(f"| {name} | {rate / 1e6:.0f} | {2 * rate / 1e6:.0f} |")


if __name__ == "__main__":
    main()

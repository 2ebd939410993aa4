"""The bf16 arithmetic peak of this CPU and the rate it streams memory, to read the other
benches' GEMM and attention rates against: a register-only loop of AVX-512 BF16
``vdpbf16ps`` (``cpu_peak.cpp``, built with q's kernel build), 12 independent accumulators
per thread, GFLOP/s counting a multiply and an add per product; and ``torch.sum`` over a
512 MB bf16 tensor (far larger than the caches), GB/s read. Each at 1 thread and at torch's
thread count, the best of three.

    python tests/bench/cpu_peak.py [--seconds 1]
"""

from __future__ import annotations

import argparse
import ctypes
import time
from pathlib import Path

import torch

from q.kernels import cpp_build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="about how long each run takes")
    args = ap.parse_args()
    lib, why = cpp_build.bind(Path(__file__).with_name("cpu_peak.cpp"), q_bf16_peak="lip")
    if lib is None:
        raise SystemExit(f"cannot build the peak loop: {why}")
    flops = ctypes.c_double()
    if lib.q_bf16_peak(1000, 1, ctypes.byref(flops)):
        raise SystemExit("this CPU (or compiler) has no AVX-512 BF16: no vdpbf16ps peak")
    for threads in sorted({1, torch.get_num_threads()}):
        iterations = 1 << 20
        while True:  # grow the loop until a run takes the asked time
            start = time.perf_counter()
            lib.q_bf16_peak(iterations, threads, ctypes.byref(flops))
            elapsed = time.perf_counter() - start
            if elapsed >= args.seconds:
                break
            iterations *= 2
        best = flops.value / elapsed
        for _ in range(2):  # best of three
            start = time.perf_counter()
            lib.q_bf16_peak(iterations, threads, ctypes.byref(flops))
            best = max(best, flops.value / (time.perf_counter() - start))
        print(f"{threads} thread{'s' if threads > 1 else ''}: {best / 1e9:.0f} GFLOP/s bf16 "
              "(vdpbf16ps)")
    stream = torch.ones(1 << 28, dtype=torch.bfloat16)  # 512 MB
    every = torch.get_num_threads()
    for threads in sorted({1, every}):
        torch.set_num_threads(threads)
        stream.sum()
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            stream.sum()
            seconds.append(time.perf_counter() - start)
        print(f"{threads} thread{'s' if threads > 1 else ''}: "
              f"{stream.numel() * 2 / min(seconds) / 1e9:.1f} GB/s read (torch.sum, 512 MB)")
    torch.set_num_threads(every)


if __name__ == "__main__":
    main()

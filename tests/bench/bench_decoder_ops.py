"""The decoder layer's C++ elementwise ops (q.kernels.decoder_ops) against the torch ops
transformers runs for them (their reference), on CPU, in the same run.

    python tests/bench/bench_decoder_ops.py

Shapes: SmolLM2-135M (hidden 576, 9 / 3 heads of 64, MLP 1536) and TinyLlama-1.1B (2048,
32 / 4, 5632), at
1 and 32 rows (decode) and 2048 (a prefill step). Times are the best of 3
medians of repeated calls after a warm-up, at torch's thread count, in ms; the rotary
embedding includes the KV-cache write on the C++ side (transformers does that write in two
more indexed copies, not timed here); SiLU x up reads gate and up from one fused gate/up
output, as the engine's MLP does.
"""

from __future__ import annotations

import statistics
import time

import torch

from q.kernels.decoder_ops import cpp_impl, reference

SHAPES = {"SmolLM2-135M": (576, 9, 3, 64, 1536), "TinyLlama-1.1B": (2048, 32, 4, 64, 5632)}


def best_ms(fn, calls: int) -> float:
    for _ in range(3):
        fn()
    runs = []
    for _ in range(3):
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        runs.append(statistics.median(times))
    return min(runs) * 1e3


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bfloat16\n")
    print("| model shape | rows | op | torch ms | C++ ms | speed-up |")
    print("|---|---:|---|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for name, (hidden, heads, kv_heads, dim, mlp) in SHAPES.items():
        for rows in (1, 32, 2048):
            calls = 200 if rows < 2048 else 20
            x = torch.randn(rows, hidden, generator=g).bfloat16()
            res = torch.randn(rows, hidden, generator=g).bfloat16()
            w = torch.randn(hidden, generator=g).bfloat16()
            qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=g).bfloat16()
            q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], 1)
            angles = torch.rand(rows, dim // 2, generator=g) * 6
            cos, sin = (torch.cat([angles, angles], 1).cos().bfloat16(),
                        torch.cat([angles, angles], 1).sin().bfloat16())
            blocks = -(-rows // 64) + 1
            k_cache = torch.zeros(blocks, kv_heads, dim, 64, dtype=torch.bfloat16)
            v_cache = torch.zeros(blocks, 64, kv_heads, dim, dtype=torch.bfloat16)
            slots = torch.arange(64, 64 + rows)
            gate, up = (torch.randn(rows, 2 * mlp, generator=g) * 3).bfloat16().split(mlp, 1)
            cases = [
                ("RMSNorm", lambda: reference.rms_norm(x, w, 1e-5),
                 lambda: cpp_impl.rms_norm(x, w, 1e-5)),
                ("add + RMSNorm", lambda: reference.rms_norm(x, w, 1e-5, residual=res),
                 lambda: cpp_impl.rms_norm(x, w, 1e-5, residual=res)),
                ("rotary (+ cache write)", lambda: reference.rotary(q, k, cos, sin, dim),
                 lambda: cpp_impl.rotary_cache(q, k, v, cos, sin, dim, k_cache, v_cache,
                                               slots)),
                ("SiLU x up", lambda: reference.silu_mul(gate, up),
                 lambda: cpp_impl.silu_mul(gate, up)),
            ]
            for op, ref, fast in cases:
                t_ref, t_fast = best_ms(ref, calls), best_ms(fast, calls)
                print(f"| {name} | {rows} | {op} | {t_ref:.3f} | {t_fast:.3f} | "
                      f"{t_ref / t_fast:.2f}x |")


if __name__ == "__main__":
    with torch.inference_mode():
        main()

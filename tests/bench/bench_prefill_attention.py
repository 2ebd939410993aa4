"""Prompt attention of one engine layer on CPU: the C++ prefill kernel over the KV-cache
blocks against what the engine ran before it, transformers' SDPA function once per prompt
over the prompt's own keys (causal, grouped-query heads through ``enable_gqa``), same run.

    python tests/bench/bench_prefill_attention.py [--prompts 8] [--lengths 256,1024]

A step of ``--prompts`` prompts of each length, all starting at position 0 (the CPU engine
issue's workload: 8 prompts of 256 tokens fill a 2048-token step), on SmolLM2-135M (9 query
/ 3 KV heads of 64) and TinyLlama-1.1B (32 / 4 of 64) shapes, in bf16. Times are medians
of ``--repeat`` calls, the two paths alternated in ``--rounds`` rounds (this VM's speed
drifts); GFLOP/s counts the causal half (4 * heads * dim * L * (L + 1) / 2 per prompt). The
error is the largest absolute difference from the fp32 reference.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_moe import time_cpu  # median ms of repeated calls after a warm-up

from q.kernels.paged_attention import cpp_impl, reference
from q.plugins.engines.native.kv_cache import BLOCK_SIZE

SHAPES = {"SmolLM2-135M": (9, 3, 64), "TinyLlama-1.1B": (32, 4, 64)}


def step(prompts: int, length: int, heads: int, kv_heads: int, dim: int, seed: int = 0):
    """q rows and the prompts' keys/values both as the cache holds them (scattered
    blocks) and as SDPA takes them ([1, heads, L, dim] per prompt)."""
    g = torch.Generator().manual_seed(seed)
    nblk = -(-length // BLOCK_SIZE)
    blocks = 2 * prompts * nblk + 1
    k_cache = torch.zeros(blocks, kv_heads, dim, BLOCK_SIZE, dtype=torch.bfloat16)
    v_cache = torch.zeros(blocks, kv_heads, BLOCK_SIZE, dim, dtype=torch.bfloat16)
    tables = torch.randperm(blocks - 1, generator=g)[:prompts * nblk].view(prompts, nblk) + 1
    q = torch.randn(prompts * length, heads, dim, generator=g).bfloat16()
    keys = torch.randn(prompts, kv_heads, length, dim, generator=g).bfloat16()
    values = torch.randn(prompts, kv_heads, length, dim, generator=g).bfloat16()
    pos = torch.arange(length)
    for b in range(prompts):
        blk, off = tables[b][pos // BLOCK_SIZE], pos % BLOCK_SIZE
        k_cache[blk, :, :, off] = keys[b].transpose(0, 1)
        v_cache[blk, :, off] = values[b].transpose(0, 1)
    spans = torch.tensor([[b * length, length, 0] for b in range(prompts)])
    return q, keys, values, k_cache, v_cache, tables, spans


def sdpa_per_prompt(q, keys, values, length, scale):
    """What the engine did before: transformers' SDPA function on each prompt."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Module:  # what sdpa_attention_forward reads from the attention layer
        is_causal = True
        num_key_value_groups = q.shape[1] // keys.shape[1]

    out = torch.empty_like(q)
    for b in range(keys.shape[0]):
        rows = slice(b * length, (b + 1) * length)
        query = q[rows].transpose(0, 1)[None]
        out[rows] = sdpa_attention_forward(Module(), query, keys[b:b + 1], values[b:b + 1],
                                           None, scaling=scale)[0][0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--lengths", default="256,1024")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    why = cpp_impl.unavailable_reason(torch.bfloat16)
    if why:
        raise SystemExit(f"the C++ kernel is unavailable: {why}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16, "
          f"{args.prompts} prompts per step\n")
    print("| model shape | prompt tokens | SDPA per prompt ms | C++ prefill ms | speed-up | "
          "GFLOP/s SDPA / C++ | max abs err SDPA / C++ |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (heads, kv_heads, dim) in SHAPES.items():
        for length in map(int, args.lengths.split(",")):
            q, keys, values, k_cache, v_cache, tables, spans = step(
                args.prompts, length, heads, kv_heads, dim)
            scale = dim ** -0.5
            run_sdpa = lambda: sdpa_per_prompt(q, keys, values, length, scale)  # noqa: E731
            run_cpp = lambda: cpp_impl.paged_prefill(q, k_cache, v_cache, tables,  # noqa
                                                     spans, scale)
            ref = reference.paged_prefill(q, k_cache, v_cache, tables, spans, scale)
            err_sdpa = (run_sdpa().float() - ref).abs().max().item()
            err_cpp = (run_cpp().float() - ref).abs().max().item()
            t_sdpa, t_cpp = [], []
            for _ in range(args.rounds):
                t_sdpa.append(time_cpu(run_sdpa, args.repeat))
                t_cpp.append(time_cpu(run_cpp, args.repeat))
            a, b = statistics.median(t_sdpa), statistics.median(t_cpp)
            gflop = args.prompts * 4 * heads * dim * length * (length + 1) / 2 / 1e9
            print(f"| {name} | {args.prompts} x {length} | {a:.2f} | {b:.2f} | {a / b:.2f}x | "
                  f"{gflop / a * 1e3:.0f} / {gflop / b * 1e3:.0f} | "
                  f"{err_sdpa:.1e} / {err_cpp:.1e} |")


if __name__ == "__main__":
    main()

"""Decode attention of one engine layer on CPU: the C++ paged kernel against the engine's
gather + SDPA path (``attention._paged`` with no kernel), in the same run.

    python tests/bench/bench_paged_attention.py [--layers 30]

Shapes: SmolLM2-135M (9 query / 3 KV heads of 64) and TinyLlama-1.1B (32 / 4 of 64), 1 and
32 sequences, contexts of 320 (the CPU engine issue's workload: 256-token prompts plus 64
new tokens) and 1024 tokens, lengths spread over the last 64 positions, blocks scattered
through a larger cache. Times are medians of 50 calls after a warm-up, at torch's thread
count; the error is the largest absolute difference from the fp32 reference. One layer's
caches repeated stay in the CPU's caches; ``--layers N`` gives each call the next of N
layers' caches in turn (30: SmolLM2's depth), so that keys and values come from memory as
in an engine step; the time is then per layer.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from bench_moe import time_cpu  # median ms of repeated calls after a warm-up

from q.kernels.paged_attention import cpp_impl, reference
from q.plugins.engines.native.attention import PagedBatch, _paged
from q.plugins.engines.native.kv_cache import BLOCK_SIZE

SHAPES = {"SmolLM2-135M": (9, 3, 64), "TinyLlama-1.1B": (32, 4, 64)}


def case(batch, heads, kv_heads, dim, context, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    nblk = -(-context // BLOCK_SIZE)
    blocks = 4 * batch * nblk + 1
    k = torch.randn(blocks, kv_heads, dim, BLOCK_SIZE, generator=g).to(dtype)
    v = torch.randn(blocks, kv_heads, BLOCK_SIZE, dim, generator=g).to(dtype)
    tables = torch.randperm(blocks - 1, generator=g)[:batch * nblk].view(batch, nblk) + 1
    lengths = torch.randint(max(1, context - 63), context + 1, (batch,), generator=g)
    for b, n in enumerate(lengths.tolist()):
        tables[b, -(-n // BLOCK_SIZE):] = 0
    q = torch.randn(batch, heads, dim, generator=g).to(dtype)
    return q, k, v, tables, lengths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--layers", type=int, default=1,
                    help="separate caches the calls cycle through (30: from memory)")
    ap.add_argument("--contexts", default="320,1024")
    ap.add_argument("--batches", default="1,32")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    why = cpp_impl.unavailable_reason(dtype)
    if why:
        raise SystemExit(f"the C++ kernel is unavailable: {why}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}\n")
    print("| model shape | sequences | context | gather + SDPA ms | C++ kernel ms | speed-up "
          "| max abs err SDPA / C++ |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (heads, kv_heads, dim) in SHAPES.items():
        for batch in map(int, args.batches.split(",")):
            for context in map(int, args.contexts.split(",")):
                layers = [case(batch, heads, kv_heads, dim, context, dtype, seed)
                          for seed in range(args.layers)]
                q, k, v, tables, lengths = layers[0]
                scale = dim ** -0.5
                turn = itertools.count(1)  # the first layer's caches check the errors

                def cycled(fn):  # fn(q, k, v) over the next layer's cache each call
                    def run():
                        lq, lk, lv, _, _ = layers[next(turn) % len(layers)]
                        return fn(lq, lk, lv)
                    return run

                batch_info = PagedBatch(rows=None, blocks=tables,
                                        query_pos=(lengths - 1)[:, None], query_index=None,
                                        unpad_index=None, block_size=BLOCK_SIZE)
                # every layer shares the first one's tables and lengths (same shapes)
                run_sdpa = lambda q, k, v: _paged(batch_info, k, v, q, None, scale, None)  # noqa
                run_cpp = lambda q, k, v: cpp_impl.paged_decode(q, k, v, tables, lengths,  # noqa
                                                                scale)
                ref = reference.paged_decode(q, k, v, tables, lengths, scale)
                err_sdpa = (run_sdpa(q, k, v).float() - ref).abs().max().item()
                err_cpp = (run_cpp(q, k, v) - ref).abs().max().item()
                sdpa, cpp = cycled(run_sdpa), cycled(run_cpp)
                t_sdpa, t_cpp = time_cpu(sdpa, 50), time_cpu(cpp, 50)
                print(f"| {name} | {batch} | {context} | {t_sdpa:.3f} | {t_cpp:.3f} | "
                      f"{t_sdpa / t_cpp:.2f}x | {err_sdpa:.1e} / {err_cpp:.1e} |")


if __name__ == "__main__":
    main()

"""Attention over the engine's paged KV cache, each sequence against its own cache blocks,
read where they lie: decode (one new query token per sequence) and prefill (a prompt or a
prompt chunk per sequence, causal).

``reference.paged_decode`` / ``reference.paged_prefill`` are the oracles (plain torch, one
sequence at a time); ``cpp_impl`` has the CPU kernels, a small C++ file compiled on first
use (the engine falls back to SDPA where it cannot be built). Decode replaces gather +
SDPA because SDPA's CPU kernels are GEMM-shaped: with one query row per sequence (a few per
KV head) they spend more than the arithmetic costs, and the gather copies every key and
value once more (tests/bench/bench_paged_attention.py). Prefill replaces transformers' SDPA
per prompt in bf16: torch's CPU flash kernel runs 64-wide heads at 58-94 GFLOP/s on a
2-core AVX-512 CPU, the kernel's bf16 pairs at 174-252 (tests/bench/bench_prefill_attention.py).
"""

from . import reference

__all__ = ["reference"]

"""Decode attention over the engine's paged KV cache: each sequence's one new query token
against its own cache blocks, read where they lie.

``reference.paged_decode`` is the oracle (plain torch, one sequence at a time);
``cpp_impl.paged_decode`` is the CPU kernel, a small C++ file compiled on first use (the
engine falls back to gathering blocks for SDPA where it cannot be built). It replaces
gather + SDPA for decode steps because SDPA's CPU kernels are GEMM-shaped: with one query
row per sequence (a few per KV head) they spend more than the arithmetic costs, and the
gather copies every key and value once more (tests/bench/bench_paged_attention.py).
"""

from . import reference

__all__ = ["reference"]

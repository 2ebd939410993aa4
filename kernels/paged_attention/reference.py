"""Attention over a paged KV cache, in plain torch (fp32): the oracle of ``cpp_impl``.

One query token per sequence (``q [B, H, D]``) attends over the keys at positions
``[0, lengths[b])`` of its sequence (the last ``window`` of them when a sliding window is
given), which live in the cache blocks ``tables[b]``: position ``p`` in slot ``p % bs`` of
block ``tables[b][p // bs]``. Caches are one layer's ``[blocks, kvH, D, bs]`` keys
(positions innermost) and ``[blocks, kvH, bs, DV]`` values; query head ``h`` reads KV head
``h // (H // kvH)``.
Gemma 2's soft-capping applies ``tanh(s / cap) * cap`` to the scaled scores.
"""

from __future__ import annotations

import torch


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 tables: torch.Tensor, lengths: torch.Tensor, scale: float,
                 window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """-> fp32 ``[B, H, DV]``, one sequence at a time."""
    batch, heads, _ = q.shape
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[3]
    group = heads // kv_heads
    out = torch.zeros(batch, heads, v_cache.shape[-1], dtype=torch.float32)
    for b in range(batch):
        length = int(lengths[b])
        first = max(0, length - window) if window else 0
        pos = torch.arange(first, length)
        blocks, offsets = tables[b][pos // block_size], pos % block_size
        keys = k_cache[blocks, :, :, offsets].float()  # [n, kvH, D]
        values = v_cache[blocks, :, offsets].float()  # [n, kvH, DV]
        for h in range(heads):
            scores = keys[:, h // group] @ q[b, h].float() * scale
            if softcap:
                scores = torch.tanh(scores / softcap) * softcap
            out[b, h] = scores.softmax(0) @ values[:, h // group]
    return out


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  tables: torch.Tensor, spans: torch.Tensor, scale: float,
                  window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal attention of the query rows ``q [N, H, D]`` of several sequences: sequence
    ``b``'s ``spans[b] = (first row, count, first position)``, so row ``first + i`` is the
    query at position ``first position + i``, which attends as a decode query of length
    ``position + 1`` would -> fp32 ``[N, H, DV]`` (rows no span covers are 0)."""
    out = torch.zeros(q.shape[0], q.shape[1], v_cache.shape[-1], dtype=torch.float32)
    for b, (row, count, pos0) in enumerate(spans.tolist()):
        rows = slice(row, row + count)
        out[rows] = paged_decode(q[rows], k_cache, v_cache, tables[b].expand(count, -1),
                                 torch.arange(pos0 + 1, pos0 + count + 1), scale, window,
                                 softcap)
    return out

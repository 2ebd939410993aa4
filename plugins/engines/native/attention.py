"""Paged attention inside transformers' model classes.

The engine builds each model with ``attn_implementation="q_paged"``: every attention layer
still computes q/k/v, rotary embeddings and q/k norms itself, then calls
:func:`paged_attention` instead of SDPA, with the step's :class:`AttentionBatch` passed
down through the model's ``**kwargs`` as ``q_batch``. That function writes the new keys and
values into the engine's block cache (:mod:`.kv_cache`) and computes attention:

- on a CPU, sequences attend over their cache blocks where they lie, in the C++ kernels
  of :mod:`q.kernels.paged_attention`: one call per layer for a step of decode tokens (one
  query per sequence), and in bf16 one for a step that carries prompts or prompt chunks
  (causal, fp32 scores and softmax; 2.6-3.1x transformers' SDPA on a 2-core AMD EPYC,
  tests/bench/bench_prefill_attention.py; fp32 prompts keep transformers' function, see
  PREFILL_KERNEL_DTYPE);
  :func:`attention_kernels` decides once per load, and logs why when they cannot run;
- elsewhere (or without the kernels) a prompt that starts at position 0 attends over its
  own new keys through the very function transformers would have used (SDPA, or eager for
  models like Gemma 2), so a prompt's logits are the ones transformers computes; every
  other sequence (a decode token, a later chunk of a long prompt) attends over its cache
  blocks, gathered whole into a padded batch once per layer (64-token blocks copy at
  close to memcpy speed), in one SDPA call: no Python loop over requests.

One forward pass carries every scheduled sequence as one row of packed tokens, so a step's
GEMMs see all of its tokens at once. transformers builds no mask for an implementation it
does not know; masks here are the engine's own.
"""

from __future__ import annotations

import functools
import logging
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from q.kernels.decoder_ops.reference import write_cache

log = logging.getLogger("q.engine")

IMPLEMENTATION = "q_paged"
DENSE_ATTR = "_q_dense_attention"  # on the model config: what transformers would have used


@dataclass
class PagedBatch:
    """The sequences of a step that attend over their cache blocks (``B`` of them, ``Np``
    tokens): decode tokens and prompt chunks that do not start at position 0, and with the
    C++ kernels every sequence of the step."""

    rows: torch.Tensor | None  # [Np] their tokens' rows in the packed step (None: all rows)
    blocks: torch.Tensor  # [B, nblk] cache blocks per sequence, padded with block 0
    query_pos: torch.Tensor | None  # [B, maxq] absolute position of each query (-1: padding)
    query_index: torch.Tensor | None  # [B, maxq] index into the Np tokens (Np: padding);
    unpad_index: torch.Tensor | None  # [Np] row of the padded [B * maxq] output per token;
    #                                   both None when every sequence brings one token
    block_size: int
    masks: dict = field(default_factory=dict)  # sliding window (or None) -> [B, 1, maxq, L]
    kernels: object = None  # q.kernels.paged_attention.cpp_impl, or None (SDPA)
    lengths: torch.Tensor | None = None  # [B] keys each one-query sequence sees
    spans: torch.Tensor | None = None  # [B, 3] first row, query count, first position
    #                                    (the prefill kernel's; None: one query each)

    def mask(self, window: int | None) -> torch.Tensor:
        """Which gathered keys each query sees: causal, within its sequence, and within the
        sliding window when there is one. Padded query rows see key 0 (an all-masked row
        would give NaN); their output is dropped."""
        if window not in self.masks:
            keys = torch.arange(self.blocks.shape[1] * self.block_size,
                                device=self.query_pos.device)[None, None, :]
            q = self.query_pos[:, :, None]
            visible = keys <= q
            if window:
                visible &= keys > q - window
            visible |= (q < 0) & (keys == 0)
            self.masks[window] = visible[:, None]
        return self.masks[window]


@dataclass
class AttentionBatch:
    """Where one forward pass reads and writes the KV cache (built once per step)."""

    cache: object  # kv_cache.KVCache
    slot_mapping: torch.Tensor  # [N] flat cache slot of each packed token
    fresh: list[tuple[int, int]]  # (first row, length) of each prompt starting at position 0
    paged: PagedBatch | None



def paged_attention(module, query, key, value, attention_mask=None, *, scaling=None,
                    dropout=0.0, sliding_window=None, softcap=None, q_batch=None, **kwargs):
    """transformers' attention-function signature: ``query [1, H, N, d]``, ``key``/``value``
    ``[1, kvH, N, d]`` for the N packed tokens -> (``[1, N, H, d]``, None)."""
    if q_batch is None:  # a plain full-sequence forward (no engine step): no cache
        return dense_attention(module, query, key, value, scaling, sliding_window, softcap,
                               dropout), None
    b = q_batch
    k_cache, v_cache = b.cache.layer(module.layer_idx)
    write_cache(key[0].transpose(0, 1), value[0].transpose(0, 1), k_cache, v_cache,
                b.slot_mapping)
    return attend(module, query, key, value, b, scaling=scaling, sliding_window=sliding_window,
                  softcap=softcap, dropout=dropout), None


def attend(module, query, key, value, b: AttentionBatch, *, scaling=None, sliding_window=None,
           softcap=None, dropout=0.0) -> torch.Tensor:
    """Attention of the step's tokens once their keys and values are in the cache: ``query
    [1, H, N, d]``, ``key``/``value`` ``[1, kvH, N, d]`` (what fresh prompts attend over)
    -> ``[1, N, H, dv]``."""
    k_cache, v_cache = b.cache.layer(module.layer_idx)
    heads, n = query.shape[1], query.shape[2]
    value_dim = value.shape[3]
    if not b.fresh:  # decode-only and continued chunks: one paged call for the whole step
        out = _paged(b.paged, k_cache, v_cache, query[0].transpose(0, 1), sliding_window,
                     scaling, softcap)
        return out.unsqueeze(0).to(query.dtype)
    out = query.new_empty(n, heads, value_dim)
    for start, length in b.fresh:
        span = slice(start, start + length)
        out[span] = dense_attention(module, query[:, :, span], key[:, :, span],
                                    value[:, :, span], scaling, sliding_window, softcap,
                                    dropout)[0]
    if b.paged is not None:
        rows = b.paged.rows
        q = query[0].transpose(0, 1).index_select(0, rows)
        out[rows] = _paged(b.paged, k_cache, v_cache, q, sliding_window, scaling,
                           softcap).to(out.dtype)
    return out.unsqueeze(0)


def _paged(p: PagedBatch, k_cache, v_cache, q, window, scaling, softcap) -> torch.Tensor:
    """Attention of ``q [Np, H, d]`` over each sequence's gathered cache blocks."""
    batch, nblk = p.blocks.shape
    heads, dim = q.shape[1], q.shape[2]
    scale = dim ** -0.5 if scaling is None else scaling
    if p.kernels is not None:
        if p.spans is None:  # written in the caches' dtype where that is the activations'
            out_dtype = q.dtype if q.dtype == k_cache.dtype else torch.float32
            return p.kernels.paged_decode(q, k_cache, v_cache, p.blocks, p.lengths, scale,
                                          window, softcap, out_dtype)
        return p.kernels.paged_prefill(q, k_cache, v_cache, p.blocks, p.spans, scale, window,
                                       softcap)
    kv_heads, value_dim = v_cache.shape[1], v_cache.shape[-1]
    length = nblk * p.block_size
    index = p.blocks.reshape(-1)
    keys = k_cache.index_select(0, index).view(batch, nblk, kv_heads, dim, p.block_size) \
        .permute(0, 2, 1, 4, 3).reshape(batch, kv_heads, length, dim)
    values = v_cache.index_select(0, index).view(batch, nblk, kv_heads, p.block_size,
                                                 value_dim) \
        .transpose(1, 2).reshape(batch, kv_heads, length, value_dim)
    if p.query_index is None:
        q = q.unsqueeze(2)  # one query per sequence: [B, H, 1, d]
    else:
        q = torch.cat([q, q.new_zeros(1, heads, dim)])[p.query_index].transpose(1, 2)
    maxq = q.shape[2]
    group = heads // kv_heads
    # grouped-query attention without repeating K/V (transformers' pack_gqa): the `group`
    # query heads that share a KV head become `group * maxq` query rows of that head
    q = q.reshape(batch, kv_heads, group * maxq, dim).to(keys.dtype)
    mask = p.mask(window)
    if group > 1 and maxq > 1:  # the mask rows follow the query rows
        mask = mask[:, :, None].expand(batch, 1, group, maxq, length)
        mask = mask.reshape(batch, 1, group * maxq, length)
    out = _softmax_attention(q, keys, values, mask, scaling, softcap)
    out = out.reshape(batch, heads, maxq, value_dim).transpose(1, 2)  # [B, maxq, H, dv]
    if p.query_index is None:
        return out.reshape(batch, heads, value_dim)
    return out.reshape(batch * maxq, heads, value_dim)[p.unpad_index]


def _softmax_attention(q, k, v, mask, scaling, softcap):
    """``q [B, h, m, d]`` over ``k``/``v`` ``[B, h, L, d]`` with a boolean ``mask``."""
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    # Gemma 2's logit soft-capping: tanh before the mask, as transformers' eager path does
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scaling
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)


def dense_attention(module, query, key, value, scaling, window, softcap, dropout=0.0):
    """Causal attention of a sequence over its own keys (``[1, H, L, d]``), computed by the
    attention function transformers would use for this model -> ``[1, L, H, d]``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = getattr(module.config, DENSE_ATTR, "sdpa")
    length = query.shape[2]
    kwargs = {"softcap": softcap} if softcap else {}
    if name == "eager":  # eager relies on the mask for causality: transformers' float mask
        fn = sys.modules[type(module).__module__].eager_attention_forward
        mask = _causal_mask(length, window, query.device)
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min)
    else:
        fn = ALL_ATTENTION_FUNCTIONS[name]
        mask = _causal_mask(length, window, query.device) if window and length > window \
            else None
    out, _ = fn(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    return out


def _causal_mask(length: int, window: int | None, device) -> torch.Tensor:
    pos = torch.arange(length, device=device)
    mask = pos[None, :] <= pos[:, None]
    if window:
        mask &= pos[None, :] > pos[:, None] - window
    return mask[None, None]


# The cache dtype whose prompts the C++ prefill kernel takes. In fp32 a prompt keeps
# transformers' own attention function, so its logits are transformers' bit for bit: the
# fp32 runs are the ones compared with transformers, where a last-bit difference in
# attention can flip a W8A8 layer's activation code (tests/test_engine_smollm2.py).
PREFILL_KERNEL_DTYPE = torch.bfloat16


def attention_kernels(device: torch.device, dtype: torch.dtype, impl: str):
    """The paged-attention kernels this load uses (:mod:`q.kernels.paged_attention.cpp_impl`:
    decode steps and prompts), or None (SDPA), logged once: the C++ kernels on a CPU with
    ``impl="auto"`` where they build."""
    from q.kernels.paged_attention import cpp_impl

    if device.type != "cpu":
        why = "not a CPU"
    elif impl != "auto":
        why = f"impl={impl} keeps torch's own attention"
    else:
        why = cpp_impl.unavailable_reason(dtype)
    if why is None:
        prompts = ("and for prompts" if dtype == PREFILL_KERNEL_DTYPE else
                   "(prompts: transformers' attention function, for its exact logits)")
        log.info("attention: C++ paged kernels reading KV-cache blocks in place, for decode "
                 "steps %s", prompts)
        return cpp_impl
    log.info("attention: SDPA, prompts over their own keys and cache blocks gathered for "
             "the rest (the C++ paged kernels do not run: %s)", why)
    return None


@functools.cache
def register() -> str:
    """Make ``q_paged`` an attention implementation transformers accepts (once)."""
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, paged_attention)
    return IMPLEMENTATION

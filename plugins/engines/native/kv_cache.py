"""The KV cache: allocated once, handed out in fixed-size blocks.

One tensor for keys, ``[layers, blocks, kv_heads, head_dim, block_size]``, and one for
values, ``[layers, blocks, kv_heads, block_size, value_dim]`` (nano-vllm keeps the same
single allocation); values may have their own head size (DeepSeek's MLA: keys 192, values
128). Keys keep positions innermost so that decode attention's scores are multiply-adds
over a block's positions (vLLM's CPU key cache is laid out the same way for the same
reason); values keep the head dimension innermost, as their weighted sum wants. Both keep a
KV head's part of a block contiguous (as vLLM's CPU caches do), so attention, which works
one KV head at a time, streams whole 8 KB runs: decode attention took 4-13% less time than
with each position's heads side by side (``tests/bench/bench_paged_attention.py``,
fourteenth session, docs/benchmarks.md). A sequence owns a list of blocks (its block
table); position ``p`` of the sequence lives in slot ``p % block_size`` of block
``table[p // block_size]``. Blocks are 64 tokens: attention gathers a sequence's blocks
whole, and copying 64-token blocks runs near memcpy speed where 16-token blocks took 8x
longer on a 2-core CPU (32 sequences x 320 tokens, SmolLM2's 3 KV heads).
"""

from __future__ import annotations

import logging
from collections import deque

import torch

from q.errors import OptionError

log = logging.getLogger("q.engine")

BLOCK_SIZE = 64
PADDING_BLOCK = 0  # zeros, never handed out: what gathers read where a sequence has no block
DEFAULT_MEMORY_FRACTION = 0.2  # of the memory available at load, when no size is given


class KVCache:
    def __init__(self, *, layers: int, blocks: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, block_size: int = BLOCK_SIZE,
                 value_dim: int | None = None):
        self.block_size = block_size
        self.num_blocks = blocks
        shape = (layers, blocks, kv_heads, head_dim, block_size)
        # torch.empty: pages are only touched (and only count as resident) once written.
        # Attention gathers whole blocks and masks what a sequence does not own; a masked
        # key still multiplies its value by 0, and 0 * NaN is NaN, so every block is zeroed
        # when handed out (zero_blocks) and block 0, the padding of every gather, is never
        # handed out.
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty((layers, blocks, kv_heads, block_size, value_dim or head_dim),
                                  dtype=dtype, device=device)
        self.zero_blocks([PADDING_BLOCK])

    def zero_blocks(self, blocks: list[int]) -> None:
        if blocks:
            index = torch.tensor(blocks, device=self.keys.device)
            self.keys.index_fill_(1, index, 0)
            self.values.index_fill_(1, index, 0)

    @property
    def tokens(self) -> int:
        """Tokens requests can use (the padding block excluded)."""
        return (self.num_blocks - 1) * self.block_size

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[index], self.values[index]


def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                    value_dim: int | None = None) -> int:
    dims = head_dim + (value_dim or head_dim)
    return layers * kv_heads * dims * torch.empty((), dtype=dtype).element_size()


def cache_geometry(cfg) -> tuple[int, int, int, int]:
    """(layers, kv heads, key head size, value head size) of a transformers config. MLA
    (DeepSeek-V2/V3) caches keys and values expanded from the latent, for every head, as
    transformers' attention receives them: simple, but H x (192 + 128) values per token
    where vLLM caches the 512 + 64 latent."""
    if getattr(cfg, "kv_lora_rank", None):
        key = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        return cfg.num_hidden_layers, cfg.num_attention_heads, key, cfg.v_head_dim
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, head_dim


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def cache_blocks(*, kv_cache_tokens: int | None, kv_cache_memory: float | None,
                 per_token: int, device: torch.device, largest_request: int,
                 block_size: int = BLOCK_SIZE) -> int:
    """How many blocks to allocate: ``kv_cache_tokens`` if given, else ``kv_cache_memory``
    (a fraction of the memory available now, default 0.2), never more than
    ``largest_request`` tokens per running slot could use (the caller passes max_batch x
    context), and at least one request of ``block_size`` tokens."""
    if kv_cache_tokens is not None:
        if kv_cache_tokens < block_size:
            raise OptionError(f"kv_cache_tokens must be at least {block_size} (one block), got "
                              f"{kv_cache_tokens}")
        return -(-kv_cache_tokens // block_size) + 1
    fraction = DEFAULT_MEMORY_FRACTION if kv_cache_memory is None else kv_cache_memory
    if not 0 < fraction <= 0.95:
        raise OptionError(f"kv_cache_memory is a fraction of free memory in (0, 0.95], got "
                          f"{fraction}")
    by_memory = int(available_memory(device) * fraction) // (per_token * block_size)
    needed = -(-largest_request // block_size)
    return max(1, min(by_memory, needed)) + 1  # + the padding block


class BlockAllocator:
    """Free-list of a cache's blocks (all but the padding block); blocks come out zeroed."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.num_blocks = cache.num_blocks - 1
        self._free = deque(b for b in range(cache.num_blocks) if b != PADDING_BLOCK)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV-cache blocks, {len(self._free)} are free")
        blocks = [self._free.popleft() for _ in range(n)]
        self.cache.zero_blocks(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)

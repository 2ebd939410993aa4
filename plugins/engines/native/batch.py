"""The running batch's KV cache: rows left-padded to a common length, joined and left at will.

Each row's real tokens sit at the right end of the cache (positions ``T - len_i .. T``);
the attention mask hides the padding and position ids count real tokens only, so every
row computes what it would compute alone. A request *joins* by concatenating its prefill
cache along the batch dimension (whichever side is shorter is left-padded with zeros), and
*leaves* by index-selecting the remaining rows and trimming columns that are padding in
every row. This is the padded-batch design of Hugging Face TGI's ``CausalLMBatch``
(concatenate / filter), used here on transformers' ``DynamicCache`` tensors directly.
"""

from __future__ import annotations

import torch


def _left_pad(t: torch.Tensor, extra: int) -> torch.Tensor:
    if extra == 0:
        return t
    pad = t.new_zeros((*t.shape[:-2], extra, t.shape[-1]))
    return torch.cat([pad, t], dim=-2)


class PaddedBatch:
    """KV tensors ``[B, heads, T, head_dim]`` per layer plus each row's real length."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return self.keys[0].shape[-2] if self.keys else 0

    def attention_mask(self, new_tokens: int, device) -> torch.Tensor:
        """``[B, T + new]`` with 1 on real positions (the new tokens included)."""
        width = self.width + new_tokens
        cols = torch.arange(width, device=device)
        start = torch.tensor([self.width - n for n in self.lengths], device=device)
        return (cols[None, :] >= start[:, None]).long()

    def position_ids(self, device) -> torch.Tensor:
        return torch.tensor(self.lengths, device=device).unsqueeze(1)

    def as_cache(self):
        """A transformers DynamicCache over these tensors (a forward pass grows it)."""
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=list(zip(self.keys, self.values)))

    def absorb(self, cache, new_tokens: int) -> None:
        """Take the cache a forward pass grew by ``new_tokens`` columns for every row."""
        self.keys = [layer.keys for layer in cache.layers]
        self.values = [layer.values for layer in cache.layers]
        self.lengths = [n + new_tokens for n in self.lengths]

    def join(self, cache, length: int) -> None:
        """Append one request's prefill cache (``[1, heads, length, dim]`` per layer)."""
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        if not self.lengths:
            self.keys, self.values, self.lengths = keys, values, [length]
            return
        width = max(self.width, length)
        self.keys = [torch.cat([_left_pad(a, width - a.shape[-2]), _left_pad(b, width - length)])
                     for a, b in zip(self.keys, keys)]
        self.values = [torch.cat([_left_pad(a, width - a.shape[-2]),
                                  _left_pad(b, width - length)])
                       for a, b in zip(self.values, values)]
        self.lengths.append(length)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order) and drop columns no remaining row uses."""
        if not rows:
            self.keys, self.values, self.lengths = [], [], []
            return
        if rows == list(range(self.size)):
            return
        index = torch.tensor(rows, device=self.keys[0].device)
        self.lengths = [self.lengths[r] for r in rows]
        start = self.width - max(self.lengths)
        self.keys = [k.index_select(0, index)[..., start:, :] for k in self.keys]
        self.values = [v.index_select(0, index)[..., start:, :] for v in self.values]

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
    """One transformers ``DynamicCache`` (``[B, heads, T, head_dim]`` per layer) plus each
    row's real length. The cache object persists across steps and grows in place during
    decode; join and leave rewrite its layer tensors."""

    def __init__(self):
        self.cache = None
        self.lengths: list[int] = []

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return self.cache.layers[0].keys.shape[-2] if self.lengths else 0

    def attention_mask(self, new_tokens: int, device) -> torch.Tensor:
        """``[B, T + new]`` with 1 on real positions (the new tokens included)."""
        width = self.width + new_tokens
        cols = torch.arange(width, device=device)
        start = torch.tensor([self.width - n for n in self.lengths], device=device)
        return (cols[None, :] >= start[:, None]).long()

    def position_ids(self, device) -> torch.Tensor:
        return torch.tensor(self.lengths, device=device).unsqueeze(1)

    def grew(self, new_tokens: int) -> None:
        """A forward pass appended ``new_tokens`` columns to every row of the cache."""
        self.lengths = [n + new_tokens for n in self.lengths]

    def join(self, cache, length: int) -> None:
        """Append one request's prefill cache (``[1, heads, length, dim]`` per layer)."""
        if not self.lengths:
            self.cache, self.lengths = cache, [length]
            return
        width = max(self.width, length)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width - mine.keys.shape[-2]),
                                   _left_pad(theirs.keys, width - length)])
            mine.values = torch.cat([_left_pad(mine.values, width - mine.values.shape[-2]),
                                     _left_pad(theirs.values, width - length)])
        self.lengths.append(length)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order) and drop columns no remaining row uses."""
        if not rows:
            self.cache, self.lengths = None, []
            return
        if rows == list(range(self.size)):
            return
        index = torch.tensor(rows, device=self.cache.layers[0].keys.device)
        width = self.width
        self.lengths = [self.lengths[r] for r in rows]
        start = width - max(self.lengths)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[..., start:, :]
            layer.values = layer.values.index_select(0, index)[..., start:, :]

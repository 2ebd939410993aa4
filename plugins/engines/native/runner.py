"""Turn a scheduled step into one forward pass of the model and its logits.

The step's tokens go in as one packed row (``[1, N]``) with each token's own position, so
rotary embeddings are right per sequence; :class:`AttentionBatch` tells the attention
layers where each token's keys and values go and what each sequence attends over. Logits
are computed only for the last token of each sequence that samples (transformers'
``logits_to_keep`` with indices).
"""

from __future__ import annotations

import torch

from .attention import PREFILL_KERNEL_DTYPE, AttentionBatch, PagedBatch
from .kv_cache import PADDING_BLOCK, KVCache
from .scheduler import Step


class ModelRunner:
    def __init__(self, model, cache: KVCache, device: torch.device, kernels=None,
                 forward=None):
        self.model = model
        self.cache = cache
        self.device = device
        self.kernels = kernels  # see attention.attention_kernels
        # prompts and prompt chunks go to the C++ prefill kernel (see PREFILL_KERNEL_DTYPE)
        self.prompt_kernel = kernels is not None and cache.keys.dtype == PREFILL_KERNEL_DTYPE
        # the engine's own decoder forward (decoder.build) or the model's: same logits
        self.forward = forward or (lambda **kwargs: model(**kwargs).logits[0])

    def prepare(self, step: Step) -> tuple[dict, list]:
        """The model's keyword arguments for ``step``, and the sequences whose logits come
        back (in that order)."""
        bs = self.cache.block_size
        tokens, positions, slots, logit_rows, sampled, fresh, paged = [], [], [], [], [], [], []
        offset = 0
        for seq, start, n in step.work:
            tokens += seq.tokens[start:start + n]
            span = range(start, start + n)
            positions += span
            slots += [seq.blocks[p // bs] * bs + p % bs for p in span]
            # the prefill kernel takes every sequence over its cache blocks, prompts too
            (fresh if start == 0 and not self.prompt_kernel else paged).append(
                (offset, seq, start, n))
            offset += n
            if start + n == seq.num_tokens:
                logit_rows.append(offset - 1)
                sampled.append(seq)
        t = lambda x: torch.tensor(x, device=self.device)  # noqa: E731
        batch = AttentionBatch(cache=self.cache, slot_mapping=t(slots),
                               fresh=[(row, n) for row, _, _, n in fresh],
                               paged=self._paged(paged, every_row=not fresh) if paged else None)
        kwargs = dict(input_ids=t([tokens]), position_ids=t([positions]),
                      logits_to_keep=t(logit_rows), q_batch=batch, use_cache=False)
        return kwargs, sampled

    def _paged(self, work: list, every_row: bool) -> PagedBatch:
        """The sequences that attend over their cache blocks: ``work`` is (first packed row,
        sequence, first position, token count) per sequence."""
        bs = self.cache.block_size
        maxq = max(n for *_, n in work)
        nblk = max(-(-(start + n) // bs) for _, _, start, n in work)
        t = lambda x: torch.tensor(x, device=self.device)  # noqa: E731
        if self.kernels is not None and (maxq == 1 or self.prompt_kernel):
            # the C++ kernels read blocks where they lie: tables and positions are all
            tables = [seq.blocks[:-(-(start + n) // bs)] for _, seq, start, n in work]
            tables = t([b + [PADDING_BLOCK] * (nblk - len(b)) for b in tables])
            rows = None if every_row else t([r for row, *_, n in work
                                             for r in range(row, row + n)])
            if maxq == 1:
                return PagedBatch(rows=rows, blocks=tables, query_pos=None, query_index=None,
                                  unpad_index=None, block_size=bs, kernels=self.kernels,
                                  lengths=t([start + 1 for _, _, start, _ in work]))
            # spans index the whole step's rows: with the prefill kernel every sequence of
            # the step is here (no fresh prompts beside), so every_row holds
            return PagedBatch(rows=None, blocks=tables, query_pos=None, query_index=None,
                              unpad_index=None, block_size=bs, kernels=self.kernels,
                              spans=t([[row, n, start] for row, _, start, n in work]))
        rows, query_pos, query_index, unpad, tables = [], [], [], [], []
        for b, (row, seq, start, n) in enumerate(work):
            query_index.append([*range(len(rows), len(rows) + n), *[-1] * (maxq - n)])
            rows += range(row, row + n)
            query_pos.append([*range(start, start + n), *[-1] * (maxq - n)])
            unpad += range(b * maxq, b * maxq + n)
            used = -(-(start + n) // bs)
            tables.append(seq.blocks[:used] + [PADDING_BLOCK] * (nblk - used))
        index = None
        if maxq > 1:
            index = t(query_index)
            index = index.masked_fill(index < 0, len(rows))
        return PagedBatch(rows=None if every_row else t(rows), blocks=t(tables),
                          query_pos=t(query_pos), query_index=index,
                          unpad_index=None if maxq == 1 else t(unpad), block_size=bs)

    @torch.inference_mode()
    def run(self, step: Step) -> tuple[torch.Tensor, list]:
        """``[len(sampled), vocab]`` logits in the model's dtype and the sequences they
        belong to. Not converted to fp32 here: the greedy pick is the same token either way
        (bf16 -> fp32 is exact) without the copy (SmolLM2's vocabulary on CPU: 0.044
        against 0.057 ms for one row, 0.650 against 0.771 for 32,
        tests/bench/bench_cpu_small_ops.py), and sampling and logprobs convert the rows
        they use."""
        kwargs, sampled = self.prepare(step)
        if not sampled:  # only prompt chunks that do not reach their end: no logits needed
            kwargs["logits_to_keep"] = torch.tensor([0], device=self.device)
        logits = self.forward(**kwargs)
        return (logits if sampled else logits[:0]), sampled

    @torch.inference_mode()
    def all_logits(self, seq) -> torch.Tensor:
        """Logits at every position of ``seq``'s tokens, computed as one prompt."""
        kwargs, _ = self.prepare(Step([(seq, 0, seq.num_tokens)], []))
        kwargs["logits_to_keep"] = 0  # transformers: 0 keeps every position
        return self.forward(**kwargs).float()

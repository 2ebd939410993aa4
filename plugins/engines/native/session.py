"""NativeSession: requests in, tokens out, one scheduled forward pass per ``step``.

``add_request`` and ``abort`` may be called from any thread (the server's event loop);
``step`` runs on one thread and does, in order: admit new requests and drop aborted ones
(their cache blocks free at once), ask the :mod:`.scheduler` for the next pass, run it
(:mod:`.runner`), and turn each sampled token into output (sampling, stop strings, EOS).
Prompt and text handling (chat template, stop strings held back until decided) is shared
with every engine through :mod:`q.generation`.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from q.errors import OptionError
from q.generation import RequestOutput, SamplingParams, StopStringDetector, TokenLogprob
from q.interfaces import Session

from .kv_cache import BlockAllocator, KVCache
from .runner import ModelRunner
from .sampling import make_generator, sample_row, token_logprob
from .scheduler import Scheduler, Sequence


@dataclass
class _RequestState:
    params: SamplingParams
    detector: StopStringDetector
    generator: torch.Generator | None
    logprobs: list[TokenLogprob] = field(default_factory=list)


class NativeSession(Session):
    def __init__(self, model, tokenizer, *, device: torch.device, context_length: int,
                 eos_token_ids: set[int], cache: KVCache, max_batch: int = 32,
                 max_step_tokens: int = 2048, name: str = "model", report=None,
                 kernels=None, forward=None):
        if max_batch < 1 or max_step_tokens < 1:
            raise OptionError(f"max_batch ({max_batch}) and max_step_tokens "
                              f"({max_step_tokens}) must be at least 1")
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.context_length = context_length
        self.eos_token_ids = eos_token_ids
        self.cache = cache
        self.max_batch = max_batch
        self.model_name = name
        self.report = report
        self.scheduler = Scheduler(BlockAllocator(cache), cache.block_size,
                                   max_batch=max_batch, max_step_tokens=max_step_tokens)
        self.runner = ModelRunner(model, cache, device, kernels, forward)
        self._lock = threading.Lock()
        self._inbox: deque[Sequence] = deque()
        self._aborted: set[str] = set()
        self._live: dict[str, Sequence] = {}  # admitted to the scheduler, not finished
        self._ids = itertools.count()

    # --- requests (any thread) ------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise OptionError("the prompt is empty")
        if len(ids) >= self.context_length:
            raise OptionError(
                f"the prompt is {len(ids)} tokens but the model's context is "
                f"{self.context_length} tokens; shorten it to leave room for the answer")
        need = min(len(ids) + params.max_tokens, self.context_length)
        if need > self.cache.tokens:
            raise OptionError(
                f"this request needs {need} tokens of KV cache (prompt {len(ids)} + max_tokens "
                f"{params.max_tokens}) but the cache holds {self.cache.tokens}; lower "
                "max_tokens or load the model with a larger kv_cache_tokens "
                "(--kv-cache-tokens) or kv_cache_memory")
        rid = request_id or f"req-{next(self._ids)}"
        state = _RequestState(params, StopStringDetector(self.tokenizer, params.stop),
                              make_generator(params, self.device))
        seq = Sequence(rid, ids, max_tokens=params.max_tokens, state=state)
        with self._lock:
            self._inbox.append(seq)
        return rid

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborted.add(request_id)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._inbox or self._aborted or self._live)

    @property
    def kv_cache_tokens(self) -> int:
        """Tokens the KV cache holds: no request may need more (prompt + max_tokens)."""
        return self.cache.tokens

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self._inbox)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def prompt_logits(self, ids: list[int]) -> torch.Tensor:
        """``[len(ids), vocab]`` fp32 next-token logits at every position of ``ids``,
        computed the way a prompt is (through the KV cache and paged attention), in one
        pass; for evaluation and tests. Call it between steps, on the engine's thread."""
        if not ids or len(ids) > self.cache.tokens:
            raise OptionError(f"prompt_logits takes 1 to {self.cache.tokens} tokens, got "
                              f"{len(ids)}")
        seq = Sequence("prompt-logits", list(ids), max_tokens=0)
        allocator = self.scheduler.allocator
        if -(-len(ids) // self.cache.block_size) > allocator.num_free:
            raise OptionError("prompt_logits needs free KV-cache blocks: call it while no "
                              "request is running")
        seq.blocks = allocator.allocate(-(-len(ids) // self.cache.block_size))
        try:
            return self.runner.all_logits(seq)
        finally:
            allocator.free(seq.blocks)

    # --- the engine loop (one thread) -------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        self._take_inbox(outputs)
        if not self.scheduler.has_work():
            return outputs
        step = self.scheduler.schedule()
        if not step.work:
            return outputs
        logits, sampled = self.runner.run(step)
        self.scheduler.finished(step)
        tokens = self._sample(logits, sampled)
        for seq, token, row in zip(sampled, tokens, logits):
            out = self._advance(seq, token, row)
            outputs.append(out)
            if out.finished:
                self.scheduler.remove(seq)
                del self._live[seq.id]
        return outputs

    def _take_inbox(self, outputs: list[RequestOutput]) -> None:
        with self._lock:
            new, self._inbox = list(self._inbox), deque()
            aborted, self._aborted = self._aborted, set()
        for seq in new:
            if seq.id in aborted:
                outputs.append(self._finish(seq, "abort", ""))
                continue
            self._live[seq.id] = seq
            self.scheduler.add(seq)
        for rid in aborted:
            seq = self._live.pop(rid, None)
            if seq is not None:
                self.scheduler.remove(seq)
                outputs.append(self._finish(seq, "abort", ""))

    @staticmethod
    def _sample(logits: torch.Tensor, sampled: list[Sequence]) -> list[int]:
        if all(s.state.params.greedy for s in sampled):  # one argmax for the whole batch
            # max(-1).indices is argmax (the first maximum; NaN first): less than half its
            # time over a vocabulary on the Xeon of docs/benchmarks.md's 2026-12-06 section,
            # as long on the later AMD EPYC (tests/bench/bench_cpu_small_ops.py)
            return logits.max(-1).indices.tolist()
        return [sample_row(row, s.state.params, s.state.generator)
                for row, s in zip(logits, sampled)]

    def _advance(self, seq: Sequence, token: int, logits: torch.Tensor) -> RequestOutput:
        state = seq.state
        seq.out_ids.append(token)
        new_logprobs = []
        if state.params.logprobs is not None:
            new_logprobs = [token_logprob(logits, token, state.params.logprobs)]
            state.logprobs.extend(new_logprobs)
        is_eos = token in self.eos_token_ids and not state.params.ignore_eos
        ids = seq.out_ids[:-1] if is_eos else seq.out_ids
        full = seq.num_tokens >= self.context_length
        out_of_tokens = len(seq.out_ids) >= state.params.max_tokens or full
        text, stopped = state.detector.update(ids, final=is_eos or out_of_tokens)
        if stopped or is_eos:
            return self._finish(seq, "stop", text, [token], new_logprobs)
        if out_of_tokens:
            return self._finish(seq, "length", text, [token], new_logprobs)
        return RequestOutput(seq.id, text, [token], prompt_tokens=len(seq.prompt_ids),
                             completion_tokens=len(seq.out_ids), logprobs=new_logprobs)

    @staticmethod
    def _finish(seq: Sequence, reason: str, text: str, tokens=(), logprobs=()):
        return RequestOutput(seq.id, text, list(tokens), finished=True, finish_reason=reason,
                             prompt_tokens=len(seq.prompt_ids),
                             completion_tokens=len(seq.out_ids), logprobs=list(logprobs))

"""NativeSession: a continuous-batching scheduler over one transformers model.

``add_request`` may be called from any thread (the server's event loop); ``step`` runs on
one thread and does, in order: drop aborted requests (their slots free at once), prefill
newly admitted requests one by one (each yields its first token and joins the running
batch), then one batched decode step for every running request. Requests leave the batch
the moment they finish. Prompt and text handling (chat template, EOS, stop strings held
back until decided) is shared with every engine through :class:`q.generation`.
"""

from __future__ import annotations

import inspect
import itertools
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from q.errors import OptionError
from q.generation import RequestOutput, SamplingParams, StopStringDetector, TokenLogprob
from q.interfaces import Session

from .batch import PaddedBatch
from .sampling import make_generator, sample_row, token_logprob


def cache_kwarg(model) -> str:
    """The forward argument that takes a KV cache: transformers 5.2x renamed
    ``past_key_values`` to ``cache``; take whichever this model class has."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class _Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    detector: StopStringDetector
    generator: torch.Generator | None
    out_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


class NativeSession(Session):
    def __init__(self, model, tokenizer, *, device: torch.device, context_length: int,
                 eos_token_ids: set[int], max_batch: int = 32,
                 max_prefill_tokens: int = 8192, name: str = "model", report=None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.context_length = context_length
        self.eos_token_ids = eos_token_ids
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.model_name = name
        self.report = report
        self._lock = threading.Lock()
        self._waiting: deque[_Request] = deque()
        self._aborted: set[str] = set()
        self._running: list[_Request] = []
        self._batch = PaddedBatch()
        self._ids = itertools.count()
        self._cache_kwarg = cache_kwarg(model)

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
        rid = request_id or f"req-{next(self._ids)}"
        req = _Request(rid, ids, params, StopStringDetector(self.tokenizer, params.stop),
                       make_generator(params, self.device))
        with self._lock:
            self._waiting.append(req)
        return rid

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborted.add(request_id)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running or self._aborted)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    # --- the scheduler (one thread) ---------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        newcomers = self._take_inbox(outputs)
        for req in newcomers:
            logits, cache = self._prefill(req.prompt_ids)
            self._batch.join(cache, len(req.prompt_ids))
            self._running.append(req)
            outputs.append(self._advance(req, logits))
        self._drop_finished(outputs)
        if self._running:
            logits = self._decode()
            outputs.extend(self._advance(req, row) for req, row in zip(self._running, logits))
            self._drop_finished(outputs)
        return outputs

    def _take_inbox(self, outputs) -> list[_Request]:
        with self._lock:
            aborted, self._aborted = self._aborted, set()
            kept = deque()
            for req in self._waiting:
                if req.id in aborted:
                    outputs.append(self._finish(req, "abort", ""))
                else:
                    kept.append(req)
            self._waiting = kept
            newcomers, budget = [], self.max_prefill_tokens
            while self._waiting and len(self._running) + len(newcomers) < self.max_batch:
                if newcomers and len(self._waiting[0].prompt_ids) > budget:
                    break
                req = self._waiting.popleft()
                budget -= len(req.prompt_ids)
                newcomers.append(req)
        if aborted:
            rows = [i for i, r in enumerate(self._running) if r.id not in aborted]
            for r in self._running:
                if r.id in aborted:
                    outputs.append(self._finish(r, "abort", ""))
            self._running = [self._running[i] for i in rows]
            self._batch.keep(rows)
        return newcomers

    def _prefill(self, ids: list[int]):
        from transformers import DynamicCache

        cache = DynamicCache()
        input_ids = torch.tensor([ids], device=self.device)
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1,
                         **{self._cache_kwarg: cache})
        return out.logits[0, -1].float(), cache  # the cache object grew in place

    def _decode(self) -> torch.Tensor:
        batch = self._batch
        last = torch.tensor([[r.out_ids[-1]] for r in self._running], device=self.device)
        # no padding (one row, or equal lengths): no mask, the model's own causal path
        padded = len(set(batch.lengths)) > 1
        mask = batch.attention_mask(1, self.device) if padded else None
        out = self.model(input_ids=last, attention_mask=mask,
                         position_ids=batch.position_ids(self.device), use_cache=True,
                         **{self._cache_kwarg: batch.cache})
        batch.grew(1)
        return out.logits[:, -1].float()

    def _advance(self, req: _Request, logits: torch.Tensor) -> RequestOutput:
        token = sample_row(logits, req.params, req.generator)
        req.out_ids.append(token)
        new_logprobs = []
        if req.params.logprobs is not None:
            new_logprobs = [token_logprob(logits, token, req.params.logprobs)]
            req.logprobs.extend(new_logprobs)
        is_eos = token in self.eos_token_ids and not req.params.ignore_eos
        ids = req.out_ids[:-1] if is_eos else req.out_ids
        full = len(req.prompt_ids) + len(req.out_ids) >= self.context_length
        out_of_tokens = len(req.out_ids) >= req.params.max_tokens or full
        text, stopped = req.detector.update(ids, final=is_eos or out_of_tokens)
        if stopped or is_eos:
            return self._finish(req, "stop", text, [token], new_logprobs)
        if out_of_tokens:
            return self._finish(req, "length", text, [token], new_logprobs)
        return RequestOutput(req.id, text, [token], prompt_tokens=len(req.prompt_ids),
                             completion_tokens=len(req.out_ids), logprobs=new_logprobs)

    def _finish(self, req: _Request, reason: str, text: str, tokens=(), logprobs=()):
        return RequestOutput(req.id, text, list(tokens), finished=True, finish_reason=reason,
                             prompt_tokens=len(req.prompt_ids),
                             completion_tokens=len(req.out_ids), logprobs=list(logprobs))

    def _drop_finished(self, outputs: list[RequestOutput]) -> None:
        done = {o.request_id for o in outputs if o.finished}
        if not done:
            return
        rows = [i for i, r in enumerate(self._running) if r.id not in done]
        self._running = [self._running[i] for i in rows]
        self._batch.keep(rows)

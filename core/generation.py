"""What a generation request asks for and what comes back: engine-neutral data.

``SamplingParams`` is validated once, here, with messages that name the bad field (the CLI,
``q.pipeline`` and the server all pass through it). ``RequestOutput`` is one step's news
about one request: the text that became final this step, the new token ids, and, when the
request ends, why (``stop``: EOS or a stop string; ``length``: max_tokens or the context;
``abort``: cancelled).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import OptionError

FINISH_REASONS = ("stop", "length", "abort")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature=0`` is greedy (the default for the CLI and
    ``q.pipeline``; the server passes OpenAI's default of 1.0). ``top_k=0`` and
    ``top_p=1`` turn those filters off. ``seed`` makes sampling reproducible per request.
    ``stop`` strings end the text (they are not included); ``logprobs`` asks for the
    log-probability of each chosen token plus that many top alternatives (0 = chosen only).
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    MAX_LOGPROBS = 20

    def __post_init__(self):
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        object.__setattr__(self, "stop", tuple(stop or ()))
        self._check()

    def _check(self) -> None:
        def bad(field_name, value, why):
            raise OptionError(f"invalid sampling parameter {field_name}={value!r}: {why}")

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) \
                or self.max_tokens < 1:
            bad("max_tokens", self.max_tokens, "must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 100:
            bad("temperature", self.temperature, "must be a number in [0, 100] (0 = greedy)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "must be an integer >= 0 (0 = off)")
        if self.seed is not None and (not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            bad("seed", self.seed, "must be an integer in [0, 2^63)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", self.stop, "stop strings must be non-empty strings")
        if self.logprobs is not None and not 0 <= self.logprobs <= self.MAX_LOGPROBS:
            bad("logprobs", self.logprobs, f"must be between 0 and {self.MAX_LOGPROBS}")

    # below this a temperature is greedy (vLLM's _SAMPLING_EPS): dividing logits by it
    # would overflow fp32 to inf and the distribution to NaN
    GREEDY_BELOW = 1e-5

    @property
    def greedy(self) -> bool:
        return self.temperature < self.GREEDY_BELOW


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """One step's news about one request."""

    request_id: str
    text: str  # newly final text (held-back text that might start a stop string is not here)
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(repr=False)
class Completion:
    """A finished request (what ``generate`` returns); ``str()`` is the text."""

    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return (f"Completion(text={self.text!r}, finish_reason={self.finish_reason!r}, "
                f"prompt_tokens={self.prompt_tokens}, completion_tokens={len(self.token_ids)})")


class StopStringDetector:
    """Incremental detokenization with stop strings that may span tokens.

    Each step decodes only a short window, the tokens since the last complete text plus the
    chunk before them as context (vLLM's prefix/read offsets), so a step costs the same at
    token 10 and token 10,000; re-decoding the whole completion every step was O(n^2). Text
    ending in an incomplete UTF-8 sequence (U+FFFD at the end) is not taken until the next
    token completes it; text ending in a prefix of any stop string is held back until the
    next token decides it. A found stop string truncates the text before it.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.emitted = 0  # characters of final text handed out so far
        self.text = ""  # decoded text of the tokens before read_offset
        self.prefix_offset = 0  # first token of the decoding window (context only)
        self.read_offset = 0  # tokens whose text is in self.text

    def _decode_new(self, token_ids: list[int], final: bool) -> None:
        decode = self.tokenizer.decode
        window = token_ids[self.prefix_offset:]
        prefix = decode(window[:self.read_offset - self.prefix_offset], skip_special_tokens=True)
        full = decode(window, skip_special_tokens=True)
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)

    def update(self, token_ids: list[int], final: bool = False) -> tuple[str, bool]:
        """(newly final text, stop string found) after the completion grew to ``token_ids``."""
        self._decode_new(token_ids, final)
        text = self.text
        hit = self._find_stop(text)
        if hit is not None:
            self.text = text[:hit]
            return self._emit(len(self.text)), True
        if final:
            return self._emit(len(text)), False
        safe = min(len(text), self._start_of_partial_stop(text))
        return self._emit(max(safe, self.emitted)), False

    def _emit(self, upto: int) -> str:
        out = self.text[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        return out

    def _find_stop(self, text: str) -> int | None:
        # search only where a new match can start: from just before the emitted text
        start = max(0, self.emitted - max((len(s) for s in self.stop), default=0))
        hits = [i for s in self.stop if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _start_of_partial_stop(self, text: str) -> int:
        """Index where a suffix of ``text`` that begins some stop string starts."""
        cut = len(text)
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    cut = min(cut, len(text) - n)
                    break
        return cut

"""The contracts plugins implement: Scheme, Format (with its CheckpointReader), Engine.

Behaviour lives on these objects; hooks only register them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pydantic
import torch

from .errors import OptionError
from .generation import Completion, RequestOutput, SamplingParams
from .recipe import QuantRecipe
from .tensor import QuantizedTensor


class Scheme(ABC):
    """A way to quantize Linear weights.

    Attributes:
        name: kebab-case id (``fp8-block``).
        description: one line for ``q plugins``.
        Args: pydantic model of the scheme's options (validated, JSON-safe).
        activations: what the runtime does to activations (``dynamic per-token fp8``...).
        requires_calibration: True for schemes that need data (SmoothQuant).
        default_format: the format ``q quantize`` writes when none is given.
        min_sqnr_db: the weight SQNR this scheme guarantees on Gaussian weights (tests).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Args: ClassVar[type[pydantic.BaseModel]]
    activations: ClassVar[str] = "none (weight-only)"
    requires_calibration: ClassVar[bool] = False
    default_format: ClassVar[str] = "compressed-tensors"
    min_sqnr_db: ClassVar[float] = 20.0

    def validate_args(self, args: dict[str, Any]) -> dict[str, Any]:
        """Validate user options; unknown or bad ones raise OptionError naming the choices."""
        unknown = set(args) - set(self.Args.model_fields)
        if unknown:
            valid = ", ".join(sorted(self.Args.model_fields)) or "(none)"
            raise OptionError(
                f"scheme '{self.name}' does not take {', '.join(sorted(unknown))}; "
                f"its options are: {valid}"
            )
        try:
            return self.Args(**args).model_dump(mode="json")
        except pydantic.ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
            )
            raise OptionError(f"scheme '{self.name}': {problems}") from None

    @abstractmethod
    def storage(self, args: dict[str, Any]) -> dict[str, Any]:
        """How this scheme stores weights and treats activations, as data formats can map.

        Returns ``{"weights": {...}, "input_activations": {...} | None}`` with the keys
        documented on :class:`q.recipe.QuantRecipe` (compressed-tensors' vocabulary).
        """

    def alignment(self, args: dict[str, Any]) -> tuple[int, int]:
        """(rows, cols) a weight must be a multiple of for portable checkpoints."""
        return (1, 1)

    @abstractmethod
    def quantize_weight(
        self, name: str, w: torch.Tensor, args: dict[str, Any], scale_dtype: torch.dtype
    ) -> QuantizedTensor:
        """Quantize one 2-D Linear weight. Must work on meta tensors (for planning)."""


class CheckpointReader(ABC):
    """What a format knows about one quantized checkpoint it detected."""

    recipe: QuantRecipe
    skipped: list[str]

    @abstractmethod
    def quantized_modules(self) -> dict[str, list[str]]:
        """Module name -> the tensor names that together encode its weight."""

    @abstractmethod
    def decode(self, module: str, tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
        """Rebuild the QuantizedTensor of ``module`` from its tensors (keyed by full name)."""


class Format(ABC):
    """An on-disk checkpoint layout (tensor names, dtypes, config keys).

    External names such as ``weight_scale_inv`` exist only inside format plugins.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""

    @abstractmethod
    def supports(self, recipe: QuantRecipe) -> str | None:
        """None if this format can store the recipe, else the reason it cannot.

        Decide from ``recipe.weights`` / ``recipe.input_activations`` (the storage spec),
        never from the scheme's name, so third-party schemes work with every format.
        """

    def scale_dtype(self, recipe: QuantRecipe, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype this format stores scales in for ``recipe``."""
        return torch.float32

    @abstractmethod
    def encode(self, module: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        """Tensors (full names) that store ``qt`` for ``module``. Pure; never mutates."""

    @abstractmethod
    def quantization_config(
        self, recipe: QuantRecipe, skipped: list[str], model_config: dict
    ) -> dict:
        """The ``quantization_config`` entry of config.json."""

    @abstractmethod
    def detect(self, config: dict) -> bool:
        """True if a checkpoint with this config.json is in this format."""

    @abstractmethod
    def open(self, source) -> CheckpointReader:
        """A reader over a ModelSource this format detected."""


class Session(ABC):
    """A loaded model that generates, built for continuous batching.

    Engines implement four methods: ``add_request`` (thread-safe; returns the request id),
    ``step`` (advances every running request by one token and admits waiting ones; returns
    what changed), ``abort`` (thread-safe; the request's slot frees at the next step) and
    ``has_unfinished``. ``generate``, ``stream`` and ``chat`` are built on them here, so
    every engine behaves the same for callers (CLI, ``q.pipeline``, the server).
    """

    tokenizer: Any
    context_length: int
    model_name: str

    @abstractmethod
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str: ...

    @abstractmethod
    def step(self) -> list[RequestOutput]: ...

    @abstractmethod
    def abort(self, request_id: str) -> None: ...

    @abstractmethod
    def has_unfinished(self) -> bool: ...

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The model's chat template applied to ``messages``, ready for a reply."""
        if not messages:
            raise OptionError("messages is empty: send at least one message")
        if not getattr(self.tokenizer, "chat_template", None):
            raise OptionError(f"{self.model_name} has no chat template; send a plain prompt")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        text = self.apply_chat_template(messages)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def generate(self, prompts, params: SamplingParams | None = None,
                 **sampling) -> list[Completion]:
        """Run ``prompts`` (strings or token-id lists) together; results in prompt order."""
        params = params or SamplingParams(**sampling)
        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        ids = [self.add_request(p, params) for p in prompts]
        texts = {i: [] for i in ids}
        done: dict[str, RequestOutput] = {}
        tokens = {i: [] for i in ids}
        logprobs = {i: [] for i in ids}
        while len(done) < len(ids):
            for out in self.step():
                if out.request_id not in texts:
                    continue
                texts[out.request_id].append(out.text)
                tokens[out.request_id].extend(out.token_ids)
                logprobs[out.request_id].extend(out.logprobs)
                if out.finished:
                    done[out.request_id] = out
        return [Completion(p if isinstance(p, str) else "", "".join(texts[i]), tokens[i],
                           done[i].finish_reason, done[i].prompt_tokens, logprobs[i])
                for p, i in zip(prompts, ids)]

    def stream(self, prompt, params: SamplingParams | None = None,
               **sampling) -> Iterator[RequestOutput]:
        """Yield one request's outputs as they come (drives ``step`` itself)."""
        rid = self.add_request(prompt, params or SamplingParams(**sampling))
        finished = False
        try:
            while not finished:
                for out in self.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
        finally:
            if not finished:  # the caller stopped early: free the slot
                self.abort(rid)

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class EngineSupport:
    """Whether an engine runs a checkpoint on one target (a device, a build), and why."""

    target: str
    runs: bool
    reason: str


class Engine(ABC):
    """Runs checkpoints: ``load(path, scheme=None, **options) -> Session``."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    moe: ClassVar[str] = ""  # which MoE models it runs and how; `q plugins` shows it

    def support(self, report: dict) -> list[EngineSupport]:
        """Whether this engine runs the checkpoint ``report`` (from ``q.inspect``) describes,
        per target; ``q inspect`` and ``q quantize`` show it. Empty: the engine does not say."""
        return []

    def score(self, checkpoints: dict[str, str], windows: list[list[int]],
              prompts: list[list[int]], *, max_tokens: int, **options) -> dict[str, dict]:
        """For ``q eval`` on engines that expose no model: per checkpoint name, ``{"top1":
        [[id]], "logprob": [[float]], "greedy": [[id]]}``: the most likely token and the
        log-probability of the real next token at each position of each window after the
        first, and greedy continuations of ``prompts`` (EOS ends one). Not overridden: the
        engine cannot score."""
        raise NotImplementedError

    @abstractmethod
    def load(self, path: str, *, scheme: str | None = None, args: dict | None = None,
             **options) -> Session:
        """A session over the checkpoint at ``path``, or over a bf16 model quantized online
        with ``scheme`` while loading."""

"""``q.pipeline``: load a model into an engine and generate, LMDeploy-pipeline style.

    llm = q.pipeline("OUT")                            # any checkpoint q reads
    llm = q.pipeline("MODEL_DIR", scheme="fp8-block")  # bf16 in, quantized while loading
    print(llm(["Hi, please introduce yourself", "Shanghai is"], max_tokens=64))
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from .generation import Completion, RequestOutput, SamplingParams
from .interfaces import Session


def load_engine(model: str | Path, *, engine: str = "native", scheme: str | None = None,
                args: dict | None = None, **options) -> Session:
    """A generating session from the named engine plugin (``q plugins`` lists them)."""
    from .errors import CheckpointError
    from .plugin_manager import get_registries

    path = Path(model)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{model}: not a model directory (no config.json); give the "
                              "directory `q quantize` wrote or a Hugging Face model directory")
    engine_obj = get_registries().engines.get(engine)
    return engine_obj.load(path, scheme=scheme, args=args, **options)


class Pipeline:
    """Callable wrapper around a Session; ``llm(prompts, **sampling)`` -> completions."""

    def __init__(self, session: Session):
        self.session = session

    def __call__(self, prompts: str | list[str], params: SamplingParams | None = None,
                 **sampling) -> Completion | list[Completion]:
        """Complete one prompt (returns one Completion) or a list (returns a list).

        A prompt may also be a chat: a list of ``{"role", "content"}`` messages, run through
        the model's chat template.
        """
        single = isinstance(prompts, str) or _is_chat(prompts)
        batch = [prompts] if single else list(prompts)
        encoded = [self.session.chat_prompt_ids(p) if _is_chat(p) else p for p in batch]
        results = self.session.generate(encoded, params, **sampling)
        return results[0] if single else results

    def chat(self, messages: list[dict], params: SamplingParams | None = None,
             **sampling) -> Completion:
        return self(messages, params, **sampling)

    def stream(self, prompt, params: SamplingParams | None = None,
               **sampling) -> Iterator[RequestOutput]:
        ids = self.session.chat_prompt_ids(prompt) if _is_chat(prompt) else prompt
        return self.session.stream(ids, params, **sampling)

    def close(self) -> None:
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _is_chat(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)


def pipeline(model: str | Path, *, scheme: str | None = None, engine: str = "native",
             args: dict | None = None, **options) -> Pipeline:
    """Load ``model`` (a checkpoint, or a plain model with ``scheme`` for online
    quantization) into ``engine`` and return a callable :class:`Pipeline`."""
    return Pipeline(load_engine(model, engine=engine, scheme=scheme, args=args, **options))

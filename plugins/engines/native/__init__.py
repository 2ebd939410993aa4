"""The native engine: q.kernels ops (Triton on GPU, torch references on CPU) inside
transformers' model classes, with a continuous-batching session.

``load`` takes any checkpoint q reads (q's own output, DeepSeek-style fp8, llm-compressor /
compressed-tensors FP8 and int W4A16 / W8A16 / W8A8) or a plain model plus ``scheme`` for
online quantization.
"""

from __future__ import annotations

import json
import logging
import time

import q
import torch
from q.interfaces import Engine, EngineSupport

log = logging.getLogger("q.engine")


def _eos_ids(path, tokenizer) -> set[int]:
    ids = set()
    gen = path / "generation_config.json"
    if gen.exists():
        value = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        log.warning("device %s asked for but CUDA is not available; running on the CPU", device)
        return torch.device("cpu")
    return dev


class NativeEngine(Engine):
    name = "native"
    description = "q's own engine: q.kernels (Triton on GPU, torch on CPU), continuous batching"

    def support(self, report):
        from .loader import SUPPORTED_ARCHITECTURES

        model_type = report.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            return [EngineSupport("CPU, CUDA", False, f"no model skeleton for '{model_type}' "
                                  f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")]
        return [EngineSupport("CPU, CUDA", True, "every format and scheme q reads")]

    def load(self, path, *, scheme=None, args=None, ignore=(), ragged="skip", device=None,
             impl="auto", max_batch: int = 32, **options):
        from q.modeling import load_tokenizer

        from .loader import load_model
        from .session import NativeSession

        if options:
            raise q.errors.OptionError(
                f"the native engine does not take {', '.join(sorted(options))}")
        dev = pick_device(device)
        start = time.perf_counter()
        model, source, report = load_model(path, device=dev, scheme=scheme, args=args,
                                           ignore=ignore, ragged=ragged, impl=impl)
        tokenizer = load_tokenizer(source.path)
        context = int(source.config.get("max_position_embeddings") or 2048)
        log.info("loaded %s (%s, %d quantized Linears) on %s in %.1f s", source.path,
                 report.format, len(report.quantized), dev, time.perf_counter() - start)
        return NativeSession(model, tokenizer, device=dev, context_length=context,
                             eos_token_ids=_eos_ids(source.path, tokenizer),
                             max_batch=max_batch, name=source.path.name, report=report)


@q.hookimpl
def register_engines(register):
    register(NativeEngine())

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


def _glibc():
    """glibc's C library (ctypes), or None where the process does not run on it (musl, not
    Linux): the malloc tuning below then leaves the allocator's own policy."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Loading frees many temporaries (unpacked codes, int32 copies for torch's int4 packing)
    that glibc keeps in its heap rather than returning to the OS: on a 1.1B wint4 model the
    process stayed 480 MiB above its live tensors. malloc_trim gives that memory back."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def reuse_freed_memory() -> None:
    """Have glibc keep the memory an engine step frees for the next step. Every step
    allocates its activations again at the same sizes (a 2048-token SmolLM2 step: 12 MB per
    layer for gate/up's output); by default glibc serves such blocks with fresh mmaps and
    returns its heap's top to the OS when a large block is freed, so each step paid the page
    faults of first touch again. A SmolLM2 prefill step of 8 x 256 tokens on a 2-core AMD
    EPYC took 1537 ms with glibc's defaults and 1322 ms with glibc told through the
    environment to keep freed memory (``MALLOC_TRIM_THRESHOLD_=17179869184
    MALLOC_TOP_PAD_=268435456 python tests/bench/profile_engine_cpu.py --prefill --parts``,
    docs/benchmarks.md); with the thresholds set here, 1298-1312 ms against 1404-1647 with
    glibc's defaults, alternated (``profile_engine_cpu.py --prefill --parts`` with and
    without ``--glibc-defaults``). Blocks up to 32 MB (glibc's largest mmap threshold) now
    come from the heap, which is trimmed only above 1 GiB free at its top; the memory a
    loaded model holds is unchanged (this runs after load's malloc_trim), the peak grows by
    at most one step's activations. vLLM's CPU docs preload tcmalloc for the same reason."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


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
    moe = ("Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 (MLA), quantized or not, offline or "
           "online: experts stay quantized, one fused_moe op per layer (torch's CPU kernels "
           "per expert on CPU, the reference on GPU); one device, no expert parallelism")

    def support(self, report):
        from .loader import SUPPORTED_ARCHITECTURES

        model_type = report.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            return [EngineSupport("CPU, CUDA", False, f"no model skeleton for '{model_type}' "
                                  f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")]
        from .loader import MOE_ARCHITECTURES

        what = "every format and scheme q reads"
        if model_type in MOE_ARCHITECTURES:
            what += "; MoE experts stay quantized (fused_moe)"
        return [EngineSupport("CPU, CUDA", True, what)]

    def load(self, path, *, scheme=None, args=None, ignore=(), ragged="skip", device=None,
             impl="auto", dtype="auto", max_batch: int = 32, max_step_tokens: int = 2048,
             kv_cache_tokens: int | None = None, kv_cache_memory: float | None = None,
             woq_activations: str = "bf16", **options):
        """Options: ``dtype`` (compute dtype: auto, bfloat16, float32), ``max_batch``
        (requests running at once), ``max_step_tokens`` (tokens per forward pass: prompt
        chunks plus one per decoding request), ``kv_cache_tokens`` or ``kv_cache_memory``
        (the KV cache's size in tokens, or as a fraction of the memory free at load;
        default 0.2, never more than ``max_batch`` full contexts), ``woq_activations``
        (``bf16``, or ``int8``: weight-only layers multiply steps of 17+ tokens, i.e.
        prompts and large batches, with int8 activations, one scale per token and 32
        values; faster prefill, not exact; docs/engine.md)."""
        from q.modeling import load_tokenizer

        from .attention import attention_kernels
        from .decoder import build as build_forward
        from .kv_cache import KVCache, bytes_per_token, cache_blocks, cache_geometry
        from .loader import load_model
        from .session import NativeSession

        if options:
            raise q.errors.OptionError(
                f"the native engine does not take {', '.join(sorted(options))}")
        if woq_activations not in ("bf16", "int8"):
            raise q.errors.OptionError(f"woq_activations={woq_activations!r}: bf16 or int8")
        dev = pick_device(device)
        start = time.perf_counter()
        model, source, report = load_model(path, device=dev, scheme=scheme, args=args,
                                           ignore=ignore, ragged=ragged, impl=impl,
                                           dtype=dtype, woq_activations=woq_activations)
        release_freed_memory()
        tokenizer = load_tokenizer(source.path)
        context = int(source.config.get("max_position_embeddings") or 2048)
        layers, kv_heads, head_dim, value_dim = cache_geometry(model.config)
        per_token = bytes_per_token(layers, kv_heads, head_dim, report.dtype, value_dim)
        blocks = cache_blocks(kv_cache_tokens=kv_cache_tokens, kv_cache_memory=kv_cache_memory,
                              per_token=per_token, device=dev,
                              largest_request=max_batch * context)
        cache = KVCache(layers=layers, blocks=blocks, kv_heads=kv_heads, head_dim=head_dim,
                        value_dim=value_dim, dtype=report.dtype, device=dev)
        if dev.type == "cpu":
            reuse_freed_memory()
        log.info("loaded %s (%s, %d quantized Linears, %d groups of sibling projections fused, "
                 "%d MoE expert modules, %s compute) on %s in %.1f s; KV cache %d tokens "
                 "(%.0f MiB)", source.path, report.format, len(report.quantized),
                 report.fused, len(report.experts),
                 str(report.dtype).removeprefix("torch."), dev, time.perf_counter() - start,
                 cache.tokens, cache.nbytes / 2**20)
        return NativeSession(model, tokenizer, device=dev, context_length=context,
                             eos_token_ids=_eos_ids(source.path, tokenizer), cache=cache,
                             max_batch=max_batch, max_step_tokens=max_step_tokens,
                             name=source.path.name, report=report,
                             kernels=attention_kernels(dev, report.dtype, impl),
                             forward=build_forward(model, dev, report.dtype, impl))


@q.hookimpl
def register_engines(register):
    register(NativeEngine())

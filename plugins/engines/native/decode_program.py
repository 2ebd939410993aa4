"""Decode steps of a few tokens replayed from calls bound once: the CPU counterpart of the
CUDA graphs GPU engines replay for decode (nano-vllm captures one per batch size).

The decoder forward (decoder.py) runs a decode step of a 22-layer model as some 800 Python
calls: per layer four Linear modules, each through the module, its kernel object and a
ctypes wrapper that checks shapes and layouts and allocates its output, two norms, the
rotary/cache write, attention and the SiLU product, each with its own checks and
allocation. On a 2-core CPU that Python was about a quarter of the main thread's time in a
1-request wint4 step of the 1.1B model (``perf record``, docs/benchmarks.md), time in which
the memory bus the GEMVs stream from sits idle.

A :class:`DecodeProgram` is built once per token count ``m`` (1 to :data:`MAX_TOKENS`, on
first use) for a model and its KV cache. It runs on fixed buffers (the first ``m`` rows of
one set all programs share, :class:`Buffers`) and holds every call of the forward with its
arguments converted once: the norms, the rotary embedding with the cache write, paged
attention (reading q in place from the fused q/k/v output and writing bf16 for o_proj),
SiLU x up, and each GEMM straight to its kernel where the layer can ``bind`` (bf16,
weight-only int8/int4 and int8 W8A8 with its activation quantization, on the strip
kernels; any other layer, fp8 for one, runs its module on the buffer and copies the
product in). A step copies its token embeddings into the first buffer, points the few
arguments that change per step (rotary tables, cache slots, block tables, their width) at
this step's tensors and runs the list. Consecutive kernel calls run as one call to C++
(:mod:`q.kernels.bound_calls`), not one ctypes call each: a step whose GEMMs all bind is a
single call from Python.

Same kernels, same order, same roundings as the forward: the residual add the forward
does in torch before the next layer's norm runs inside that norm's kernel (its residual
variant, which rounds the sum as torch's add does), so the logits are the forward's bit
for bit (tests/test_engine_decode_program.py). Steps with prompt tokens, more than
:data:`MAX_TOKENS` tokens, fp32 activations, q/k norms (Qwen3) or unfused projections keep
the forward.
"""

from __future__ import annotations

import ctypes
import logging
import math

import torch
from torch import nn

log = logging.getLogger("q.engine")

# decode batches up to this size replay: the Python a forward runs per step is the same at
# any size, a share of the step that shrinks as the GEMMs grow; the shared buffers are
# sized for it (a few MB for a 1B model: logits dominate)
MAX_TOKENS = 64


def why_not(forward) -> str | None:
    """Why decode steps of ``forward`` (a decoder.DecoderForward) cannot be replayed (None:
    they can)."""
    if forward.dtype != torch.bfloat16:
        return f"the activations are {forward.dtype}, not bfloat16"
    if type(forward.embed) is not nn.Embedding or forward.embed.max_norm is not None:
        return f"the embedding is not a plain lookup ({type(forward.embed).__name__})"
    first = forward.layers[0]
    shape = lambda layer: (layer.head_dim, layer.heads, layer.kv_heads,  # noqa: E731
                           layer.value_dim, layer.gate_up_widths)
    for layer in forward.layers:
        if layer.qk_norms is not None:
            return "the layers normalize q and k per head"
        if layer.qkv_layer is None or layer.gate_up_layer is None:
            return "q/k/v or gate/up are not fused into one GEMM"
        if shape(layer) != shape(first):  # the buffers are sized once for every layer
            return "the layers differ in heads or widths"
    return None


def replayable(batch, n: int, logits_to_keep) -> bool:
    """Whether a step of ``n`` packed tokens is a decode step a program replays: one token
    per sequence, each attending over its cache blocks in the C++ kernel, every row's logits
    kept (``logits_to_keep`` the rows 0..n-1 in order, as the runner passes them)."""
    paged = batch.paged if batch is not None else None
    return (paged is not None and not batch.fresh and paged.spans is None
            and paged.rows is None and paged.kernels is not None and paged.lengths is not None
            and 1 <= n <= MAX_TOKENS and isinstance(logits_to_keep, torch.Tensor)
            and logits_to_keep.numel() == n and int(logits_to_keep[-1]) == n - 1)


class Buffers:
    """The activations of every decode program of one model: rows for up to ``capacity``
    tokens, each program using the first ``m`` (contiguous views). One set serves all the
    programs, since steps run one at a time; a program's logits are valid until the next
    step. ``scratch(shape, dtype)`` hands out the memory a GEMM's own intermediates
    (W8A8's quantized activations) take: shared too, as the GEMMs run one after another."""

    def __init__(self, forward, capacity: int):
        first = forward.layers[0]
        d, heads, kv_heads = first.head_dim, first.heads, first.kv_heads
        self.widths = (heads * d, kv_heads * d, kv_heads * first.value_dim)
        hidden = forward.embed.weight.shape[1]
        new = lambda *shape: torch.zeros(*shape, dtype=torch.bfloat16)  # noqa: E731
        # two residual streams taking turns (a norm's residual input and its sum output
        # must not alias), the normed rows, each projection's output
        self.x = (new(capacity, hidden), new(capacity, hidden))
        self.h, self.o, self.down = (new(capacity, hidden), new(capacity, hidden),
                                     new(capacity, hidden))
        self.qkv = new(capacity, sum(self.widths))
        self.attn = new(capacity, heads, first.value_dim)
        self.gate_up = new(capacity, sum(first.gate_up_widths))
        self.act = new(capacity, first.gate_up_widths[0])
        self.logits = new(capacity, forward.lm_head.out_features)
        widest = max(hidden, heads * first.value_dim, first.gate_up_widths[0])
        self.arena = {torch.int8: torch.zeros(capacity * widest, dtype=torch.int8),
                      torch.float32: torch.zeros(capacity, dtype=torch.float32)}

    def scratch(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        arena = self.arena.get(dtype)
        numel = math.prod(shape)
        if arena is None or numel > arena.numel():
            raise ValueError(f"a decode program has no scratch for {dtype} {shape}")
        return arena[:numel].view(shape)


class DecodeProgram:
    """One decode step of ``m`` tokens, every call bound to the first ``m`` rows of the
    shared :class:`Buffers`."""

    def __init__(self, forward, m: int, cache, buffers: Buffers, call_runner: bool = True):
        from q.kernels.bound_calls import batch
        from q.kernels.decoder_ops.cpp_impl import (bind_rms_norm, bind_rotary_cache,
                                                    bind_silu_mul)
        from q.kernels.paged_attention.cpp_impl import bind_paged_decode

        self.m, self.threads = m, torch.get_num_threads()
        first = forward.layers[0]
        d, heads = first.head_dim, first.heads
        self.head_dim, self.embedding = d, forward.embed.weight
        self.scratch = buffers.scratch
        rows = lambda t: t[:m]  # noqa: E731
        self.x = tuple(rows(t) for t in buffers.x)
        self.h, self.o, self.down = rows(buffers.h), rows(buffers.o), rows(buffers.down)
        self.qkv, self.attn = rows(buffers.qkv), rows(buffers.attn)
        self.gate_up, self.act = rows(buffers.gate_up), rows(buffers.act)
        self.logits = rows(buffers.logits)
        q, k, v = self.qkv.split(buffers.widths, dim=1)  # views: the kernels read them in place
        # what changes per step: set in place, read by every bound call that names it
        self.cos, self.sin = ctypes.c_void_p(), ctypes.c_void_p()
        self.slots, self.tables, self.lengths = (ctypes.c_void_p(), ctypes.c_void_p(),
                                                 ctypes.c_void_p())
        self.width = ctypes.c_int64()  # blocks per row of the block tables
        self.calls, self.kinds = [], set()
        cur = 0  # which residual buffer holds the stream
        for i, layer in enumerate(forward.layers):
            k_cache, v_cache = cache.layer(layer.index)
            if i == 0:
                self.calls.append(bind_rms_norm(self.x[0], *layer.norm_in, self.h))
            else:  # the forward's `x = x + mlp` here, inside the norm (same rounding)
                self.calls.append(bind_rms_norm(self.down, *layer.norm_in, self.h,
                                                self.x[cur], self.x[1 - cur]))
                cur = 1 - cur
            self._gemm(layer.qkv_layer, self.h, self.qkv)
            self.calls.append(bind_rotary_cache(q, k, v, d, k_cache, v_cache, self.cos,
                                                self.sin, self.slots))
            self.calls.append(bind_paged_decode(
                q.view(m, heads, d), k_cache, v_cache, self.tables, self.lengths, self.width,
                self.attn, d ** -0.5 if layer.scaling is None else layer.scaling,
                layer.window))
            self._gemm(layer.o_proj, self.attn.view(m, -1), self.o)
            self.calls.append(bind_rms_norm(self.o, *layer.norm_post, self.h, self.x[cur],
                                            self.x[1 - cur]))
            cur = 1 - cur
            self._gemm(layer.gate_up_layer, self.h, self.gate_up)
            gate, up = self.gate_up.split(layer.gate_up_widths, dim=1)
            self.calls.append(bind_silu_mul(gate, up, self.act))
            self._gemm(layer.down, self.act, self.down)
        final = forward.norm
        self.calls.append(bind_rms_norm(self.down, final.weight, final.variance_epsilon, self.h,
                                        self.x[cur], self.x[1 - cur]))
        self._gemm(forward.lm_head, self.h, self.logits)
        registers = (self.cos, self.sin, self.slots, self.tables, self.lengths, self.width)
        # runs of bound calls in C++; the modules a layer could not bind between them
        self.steps = batch(self.calls, registers) if call_runner else self.calls

    def _gemm(self, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
        bind = getattr(module, "bind", None)
        call = None if bind is None else bind(x, out, self.scratch)
        if call is None:  # the module itself; a fresh view each step, so that no layer's
            # cache keyed on its input tensor (W8A8's shared quantization) sees a stale one
            call = lambda: out.copy_(module(x.view(x.shape)))  # noqa: E731
            self.kinds.add(f"{type(module).__name__} through its module")
        else:
            self.kinds.add(f"{type(module).__name__} bound")
        self.calls.append(call)

    def run(self, input_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch
            ) -> torch.Tensor:
        """Logits ``[m, vocab]`` (bf16, this program's buffer: valid until its next run)."""
        paged = batch.paged
        tables, lengths, slots = paged.blocks, paged.lengths, batch.slot_mapping
        m = self.m
        # the kernels trust these pointers: a wrong shape here would read out of bounds
        if not (tables.dtype == lengths.dtype == slots.dtype == torch.int64
                and tables.dim() == 2 and tables.shape[0] == m and tables.is_contiguous()
                and lengths.shape == (m,) and lengths.is_contiguous()
                and slots.shape == (m,) and slots.is_contiguous()
                and cos.shape == sin.shape == (m, self.head_dim)
                and cos.dtype == sin.dtype == torch.bfloat16
                and cos.is_contiguous() and sin.is_contiguous()
                and input_ids.shape == (m,)):
            raise ValueError(f"a decode step of {m} tokens needs contiguous int64 block tables "
                             f"[{m}, blocks], lengths and slots [{m}], and bf16 rotary tables "
                             f"[{m}, {self.head_dim}]")
        torch.index_select(self.embedding, 0, input_ids, out=self.x[0])
        self.cos.value, self.sin.value = cos.data_ptr(), sin.data_ptr()
        self.slots.value, self.tables.value = slots.data_ptr(), tables.data_ptr()
        self.lengths.value, self.width.value = lengths.data_ptr(), tables.shape[1]
        for step in self.steps:
            step()
        return self.logits


class DecodePrograms:
    """The programs of one model, per token count, rebuilt when the cache or the thread count
    they were bound to changes."""

    def __init__(self, forward, call_runner: bool = True):
        self.forward = forward
        # False: each bound call from Python through ctypes (the A/B of
        # tests/bench/profile_engine_cpu.py --ab-call-runner)
        self.call_runner = call_runner
        self.programs: dict[int, DecodeProgram] = {}
        self.buffers: Buffers | None = None  # allocated on the first replayed step
        self.where = None  # (cache, its tensors' addresses, threads) the programs are bound to
        self.logged = False

    def get(self, m: int, cache) -> DecodeProgram | None:
        """The program for steps of ``m`` tokens over ``cache``, or None (a cache not in
        bf16: the forward runs)."""
        if cache.keys.dtype != torch.bfloat16 or cache.values.dtype != torch.bfloat16:
            return None
        where = (cache, cache.keys.data_ptr(), cache.values.data_ptr(), torch.get_num_threads())
        if where != self.where:  # the bound pointers and thread counts would be stale
            self.programs, self.where = {}, where
        program = self.programs.get(m)
        if program is None:
            if self.buffers is None:
                self.buffers = Buffers(self.forward, MAX_TOKENS)
            program = self.programs[m] = DecodeProgram(self.forward, m, cache, self.buffers,
                                                       self.call_runner)
            if not self.logged:
                self.logged = True
                log.info("decode steps of 1-%d tokens: replayed from bound calls (GEMMs: %s; "
                         "%s)", MAX_TOKENS, ", ".join(sorted(program.kinds)),
                         _how_calls_run(program, self.call_runner))
        return program


def _how_calls_run(program: DecodeProgram, call_runner: bool) -> str:
    from q.kernels.bound_calls import CallRun, runner_unavailable

    runs = sum(isinstance(step, CallRun) for step in program.steps)
    if runs:
        return (f"{len(program.calls)} calls as {runs} C++ run{'s' * (runs > 1)}, "
                f"{len(program.steps) - runs} from Python")
    if not call_runner:
        return "each call from Python: the call runner is turned off"
    why = runner_unavailable() or "no call has a packed entry"
    return f"each call from Python: the call runner is unavailable ({why})"

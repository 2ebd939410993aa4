"""The engine's own forward of a Llama-style decoder stack, on CPU.

transformers' Llama forward runs about 40 small torch ops per decoder layer beyond its
GEMMs and attention: RMSNorm as six (cast, square, mean, add, rsqrt, two multiplies, cast
back), the rotary embedding as a dozen, SiLU x up as two, the KV-cache write as two indexed
copies, plus the views, transposes and module calls around them. At decode sizes each op's
fixed cost (microseconds) is more than its arithmetic, and they add up to a large share of a
step (tests/bench/profile_engine_cpu.py). This forward runs the same layers with
:mod:`q.kernels.decoder_ops`: per layer one norm, one GEMM for q/k/v, one call that rotates q
and k and writes the cache, attention (:mod:`.attention`), the output projection, one call
for the residual add and the second norm, one GEMM for gate/up, SiLU x up (one C++ pass in
bf16, its SiLU looked up in torch's own; torch's two ops in fp32), the down projection and
the last residual add.

It reads the model's own modules (the projections, already q's fast Linears; the norms'
weights; the rotary module, once per step) and gives the logits transformers' forward gives:
the same ops in the same order and dtype, the rotary embedding and residual adds bit-exact,
RMSNorm summed in torch's order (tests/test_engine_decoder.py compares both forwards).
:func:`build` checks that a model is one it knows (Llama, Mistral, Qwen2, Qwen3 layers:
RMSNorm, rotary over the whole head, a SiLU-gated MLP; not MoE layers) and logs why when
not; the engine then keeps transformers' forward. Plain forwards (``q eval``'s windows,
hooks) still go through transformers.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from . import decode_program
from .attention import attend

log = logging.getLogger("q.engine")

LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer",
          "Qwen3DecoderLayer")
NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def _projection(module: nn.Module, names: tuple[str, ...]):
    """``(call, layer, widths)`` for the sibling projections ``names`` of ``module``:
    ``call`` maps ``h [M, K]`` to a tuple of ``[M, n_i]``, their fused group's single GEMM
    (``layer``, of output ``widths``) split into views where the engine fused them
    (:mod:`.fused`), else one call each (``layer`` None; W8A8 layers share the activation
    quantization)."""
    from .fused import FusedPart

    parts = [getattr(module, n) for n in names]
    group = getattr(parts[0], "group", None)
    if (all(isinstance(p, FusedPart) for p in parts) and all(p.group is group for p in parts)
            and [p.index for p in parts] == list(range(len(names)))
            and len(group.widths) == len(names)):
        layer, widths = group.layer, group.widths
        return (lambda h: layer(h).split(widths, dim=-1)), layer, list(widths)
    return (lambda h: tuple(p(h) for p in parts)), None, [p.out_features for p in parts]


def why_not(model: nn.Module, device: torch.device, dtype: torch.dtype, impl: str):
    """Why this forward cannot run ``model`` (None: it can)."""
    if device.type != "cpu":
        return "not a CPU"
    if impl != "auto":
        return f"impl={impl} keeps transformers' forward"
    from q.kernels.decoder_ops import cpp_impl

    why = cpp_impl.unavailable_reason(dtype)
    if why is not None:
        return f"the C++ decoder ops do not run: {why}"
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) \
            or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} is not a Llama-style stack"
    if inner.embed_tokens.weight.dtype != dtype or inner.norm.weight.dtype != dtype:
        return f"the embedding or final norm is not {dtype}"
    if type(inner.norm).__name__ not in NORMS:
        return f"final norm {type(inner.norm).__name__} is not a known RMSNorm"
    for layer in inner.layers:
        name = type(layer).__name__
        if name not in LAYERS:
            return f"{name} is not one of {', '.join(LAYERS)}"
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        attn = layer.self_attn
        norms += [getattr(attn, n) for n in ("q_norm", "k_norm") if hasattr(attn, n)]
        if any(type(n).__name__ not in NORMS for n in norms):
            return f"{name} has a norm this forward does not know"
        if not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return f"{name}'s attention has no q/k/v/o projections"
        if not all(hasattr(layer.mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            return f"{name}'s MLP is not gate/up/down ({type(layer.mlp).__name__})"
        if any(n.weight.dtype != dtype for n in norms):
            return f"{name}'s norm weights are not {dtype}"
    cfg = model.config
    rotary = inner.rotary_emb
    head_dim = inner.layers[0].self_attn.head_dim
    if getattr(rotary, "inv_freq", None) is None or rotary.inv_freq.numel() * 2 != head_dim:
        return "the rotary embedding does not cover the whole head"
    if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish"):
        return f"hidden_act {cfg.hidden_act} (this forward has SiLU)"
    return None


def build(model: nn.Module, device: torch.device, dtype: torch.dtype, impl: str):
    """The engine's decoder forward for ``model``, or None (transformers' forward), logged."""
    why = why_not(model, device, dtype, impl)
    if why is not None:
        log.info("decoder layers: transformers' forward (%s)", why)
        return None
    log.info("decoder layers: q's forward (one C++ pass each for the norms and for the "
             "rotary embedding with the KV-cache write)")
    return DecoderForward(model)


class _Layer:
    """What one decoder layer's forward needs, looked up once."""

    def __init__(self, layer: nn.Module, config):
        attn, mlp = layer.self_attn, layer.mlp
        self.attn = attn
        self.index = attn.layer_idx
        self.head_dim = attn.head_dim
        self.norm_in = (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        self.norm_post = (layer.post_attention_layernorm.weight,
                          layer.post_attention_layernorm.variance_epsilon)
        self.qk_norms = None
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm of every head before the rotation
            self.qk_norms = (attn.q_norm.weight, attn.k_norm.weight,
                             attn.q_norm.variance_epsilon)
        self.qkv, self.qkv_layer, widths = _projection(attn, ("q_proj", "k_proj", "v_proj"))
        self.heads, self.kv_heads = widths[0] // self.head_dim, widths[1] // self.head_dim
        self.value_dim = widths[2] // max(self.kv_heads, 1)
        self.o_proj = attn.o_proj
        self.window = getattr(attn, "sliding_window", getattr(config, "sliding_window", None))
        self.scaling = attn.scaling
        self.gate_up, self.gate_up_layer, self.gate_up_widths = _projection(
            mlp, ("gate_proj", "up_proj"))
        self.down = mlp.down_proj


class DecoderForward:
    """``(input_ids, position_ids, logits_to_keep, q_batch)`` -> logits, as the model's own
    forward with the engine's attention."""

    def __init__(self, model: nn.Module):
        from q.kernels.decoder_ops import cpp_impl

        self.ops = cpp_impl
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm
        self.lm_head = model.lm_head
        self.layers = [_Layer(layer, model.config)
                       for layer in inner.layers[:model.config.num_hidden_layers]]
        self.dtype = self.embed.weight.dtype
        why = decode_program.why_not(self)
        self.programs = decode_program.DecodePrograms(self) if why is None else None
        if why is not None:
            log.info("decode steps: the decoder forward (not replayed: %s)", why)

    def __call__(self, input_ids, position_ids, logits_to_keep, q_batch, **_):
        ops = self.ops
        n = input_ids.shape[1]
        program = None
        if self.programs is not None and decode_program.replayable(q_batch, n, logits_to_keep):
            program = self.programs.get(n, q_batch.cache)
        if program is not None:
            cos, sin = self.rotary(program.h, position_ids)
            return program.run(input_ids[0], cos[0].contiguous(), sin[0].contiguous(), q_batch)
        x = self.embed(input_ids[0])  # [N, hidden]
        cos, sin = self.rotary(x, position_ids)
        cos, sin = cos[0].contiguous(), sin[0].contiguous()
        for layer in self.layers:
            h = ops.rms_norm(x, *layer.norm_in)
            x, h = self._attention(layer, x, h, cos, sin, q_batch)
            x = x + self._mlp(layer, h)
        if isinstance(logits_to_keep, int):  # transformers' meaning: the last n (0: all)
            rows = x[-logits_to_keep:] if logits_to_keep else x
        else:
            rows = x.index_select(0, logits_to_keep)
        return self.lm_head(ops.rms_norm(rows, self.norm.weight, self.norm.variance_epsilon))

    def _attention(self, layer: _Layer, x, h, cos, sin, batch):
        """The attention half: -> (residual stream after it, its post-attention norm)."""
        ops, d = self.ops, layer.head_dim
        q, k, v = layer.qkv(h)
        n = q.shape[0]
        if layer.qk_norms is not None:
            qw, kw, eps = layer.qk_norms
            q = ops.rms_norm(q.reshape(-1, d), qw, eps).view(n, -1)
            k = ops.rms_norm(k.reshape(-1, d), kw, eps).view(n, -1)
        k_cache, v_cache = batch.cache.layer(layer.index)
        ops.rotary_cache(q, k, v, cos, sin, d, k_cache, v_cache, batch.slot_mapping)
        # attention wants transformers' [1, heads, N, d] views
        out = attend(layer.attn, q.view(1, n, -1, d).transpose(1, 2),
                     k.view(1, n, -1, d).transpose(1, 2),
                     v.view(1, n, k.shape[1] // d, -1).transpose(1, 2), batch,
                     scaling=layer.scaling, sliding_window=layer.window)
        o = layer.o_proj(out.reshape(n, -1))
        normed, x = ops.rms_norm(o, *layer.norm_post, residual=x)
        return x, normed

    def _mlp(self, layer: _Layer, h):
        gate, up = layer.gate_up(h)
        if gate.dtype == torch.bfloat16:  # torch's numbers in one pass (a table of its SiLU)
            return layer.down(self.ops.silu_mul(gate, up))
        return layer.down(F.silu(gate) * up)

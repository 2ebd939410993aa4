"""The reference the native engine is checked against: transformers itself.

transformers runs the *dequantized* checkpoint in fp32. For W8A8 schemes the engine also
quantizes activations, so the reference gets the same fake quantization as a forward
pre-hook on each quantized Linear (quantize with the reference op, dequantize in fp32):
then both compute the same function and logits agree to fp32 rounding.
"""

from __future__ import annotations

import torch

from q.kernels.act_quant.reference import quantize_activation
from q.kernels.numerics import codes_to_float, mul_blocks_


def fake_quant_activation(x: torch.Tensor, acts: dict) -> torch.Tensor:
    fp8 = torch.float8_e5m2 if acts.get("fp8_dtype") == "e5m2" else torch.float8_e4m3fn
    qdtype = torch.int8 if acts["type"] == "int" else fp8
    group = acts.get("group_size") if acts["strategy"] == "group" else None
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_activation(x2, group, qdtype)
    deq = mul_blocks_(codes_to_float(xq), xs, (1, group or x2.shape[1]))
    return deq.view(x.shape).to(x.dtype)


def _fake_quant_experts_forward(acts: dict):
    """transformers' eager experts loop with the engine's activation quantization: the
    tokens before gate/up, the intermediate rows before down (q.kernels.fused_moe)."""
    import torch.nn.functional as F

    def forward(self, hidden_states, top_k_index, top_k_weights):
        x = fake_quant_activation(hidden_states, acts)
        out = torch.zeros_like(hidden_states)
        for e in range(self.gate_up_proj.shape[0]):
            tokens, slot = torch.where(top_k_index == e)
            if tokens.numel() == 0:
                continue
            gate, up = F.linear(x[tokens], self.gate_up_proj[e]).chunk(2, dim=-1)
            h = fake_quant_activation(self.act_fn(gate) * up, acts)
            y = F.linear(h, self.down_proj[e]) * top_k_weights[tokens, slot, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out

    return forward


def transformers_reference(model_dir, quantized_modules=(), acts: dict | None = None,
                           quantized_experts=()):
    """fp32 transformers model of ``model_dir``, activations fake-quantized on the inputs of
    ``quantized_modules`` and inside the MoE experts modules ``quantized_experts``."""
    import types

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # Weights read from safetensors can sit at any offset; MKL's M=1 GEMV rounds differently
    # for a matrix that is not 64-byte aligned (seen on AMD EPYC: 1 ulp, enough to flip an
    # fp8 activation code in decode). Fresh torch allocations are 64-byte aligned, like the
    # engine's dequantized weights, so both sides take the same BLAS path.
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
    if acts is not None:
        for name in quantized_modules:
            model.get_submodule(name).register_forward_pre_hook(
                lambda mod, args: (fake_quant_activation(args[0], acts),))
        for name in quantized_experts:
            experts = model.get_submodule(name)
            experts.forward = types.MethodType(_fake_quant_experts_forward(acts), experts)
    return model


def engine_logits(session, ids: list[int]) -> torch.Tensor:
    """Logits at every position of ``ids``, computed the way the engine runs a prompt
    (paged KV cache and attention)."""
    return session.prompt_logits(ids)


def teacher_forced_agreement(model, prompt_ids: list[int],
                             tokens: list[int]) -> tuple[float, list[float]]:
    """``model`` reads prompt + ``tokens`` (a greedy continuation) in one pass: the share of
    ``tokens`` it ranks first, and per token the gap in log-probability between its first
    choice and the token that was taken."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt_ids + tokens])).logits[0]
    logp = logits[len(prompt_ids) - 1:-1].float().log_softmax(-1)
    taken = logp.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    best = logp.max(-1)
    agree = (best.indices == torch.tensor(tokens)).float().mean().item()
    return agree, (best.values - taken).tolist()


def cache_kwarg(model) -> str:
    """The forward argument that takes a KV cache: transformers 5.2x renamed
    ``past_key_values`` to ``cache``; take whichever this model class has."""
    import inspect

    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def greedy_transformers(model, prompt_ids: list[int], n: int) -> list[int]:
    """``n`` greedy tokens from the transformers model with its own KV cache, not stopping
    at EOS (the engine's ``ignore_eos``: EOS may be generated, it just does not end text).

    A plain loop rather than ``generate``: generate's EOS handling and logits processors
    differ by version, and this states exactly what is compared.
    """
    from transformers import DynamicCache

    kwarg = cache_kwarg(model)
    cache, tokens = DynamicCache(), []
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        for _ in range(n):
            logits = model(input_ids=ids, use_cache=True, **{kwarg: cache}).logits[0, -1]
            tokens.append(int(logits.argmax()))
            ids = torch.tensor([[tokens[-1]]])
    return tokens

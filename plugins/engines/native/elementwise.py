"""RMSNorm runs as one C++ pass (q.kernels.elementwise) instead of six torch ops.

transformers' ``LlamaRMSNorm`` runs twice per layer and step; at decode sizes each of its
ops costs more in dispatch than in arithmetic, and for prompts each is one more pass over
the activations. A module takes the kernel only where its ``forward`` is LlamaRMSNorm's
very code (the families that copy it: Qwen2/3, Mistral, Mixtral, SmolLM3, Phi-3, Granite,
DeepSeek-V3, ...; compared by bytecode, so a family with its own arithmetic, like Gemma's
``1 + weight``, keeps its forward). The module stays in place; an input the kernel cannot
take (a dtype, a layout) runs the module's own forward.
"""

from __future__ import annotations

import logging
import types

import torch
from torch import nn

log = logging.getLogger("q.engine")


def _code(fn) -> tuple:
    c = fn.__code__
    return c.co_code, c.co_consts, c.co_names, c.co_varnames


def _reference_code() -> tuple:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return _code(LlamaRMSNorm.forward)


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    from q.kernels.elementwise import cpp_impl

    out = cpp_impl.rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states) if out is None else out


def install(model: nn.Module, device: torch.device, dtype: torch.dtype, impl: str) -> int:
    """Give the model's Llama-style RMSNorms the C++ forward; the number of modules changed
    (0, logged with the reason, where the kernel does not run)."""
    from q.kernels.elementwise import cpp_impl

    if device.type != "cpu":
        why = "not a CPU"
    elif dtype != torch.bfloat16:
        # bf16 rounding absorbs the kernel's own fp32 sum order (outputs are torch's bits
        # but for rare ties); in fp32 most outputs would move by an ulp, and fp32 is the
        # path that matches transformers to 1e-4 through dynamic activation quantization,
        # whose rounding boundaries an ulp can cross
        why = f"{dtype} compute keeps torch's exact arithmetic"
    elif impl != "auto":
        why = f"impl={impl} keeps transformers' own forwards"
    else:
        why = cpp_impl.unavailable_reason()
    if why is not None:
        log.info("RMSNorm: transformers' torch ops (the C++ kernel does not run: %s)", why)
        return 0
    code = _reference_code()
    changed = 0
    for module in model.modules():
        forward = getattr(type(module), "forward", None)
        if hasattr(forward, "__code__") and _code(forward) == code:
            module.forward = types.MethodType(_rms_norm_forward, module)
            changed += 1
    log.info("RMSNorm: the C++ kernel in %d modules", changed)
    return changed

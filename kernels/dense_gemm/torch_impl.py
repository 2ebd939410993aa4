"""bf16 Linear with the weight prepacked once: q's AMX kernel or oneDNN (see the package
docstring)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .cpp_impl import amx_unavailable, bf16_amx, bind_bf16_amx, to_amx_bf16_layout


@functools.cache
def unavailable_reason() -> str | None:
    """None if this torch build can prepack bf16 Linear weights, else why not."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return "this torch build has no mkldnn._reorder_linear_weight / _linear_pointwise"
    try:  # a tiny probe: some builds list the op but cannot run it on this CPU
        w = torch.ones(16, 16, dtype=torch.bfloat16)
        packed = ops._reorder_linear_weight(w, 1)
        y = ops._linear_pointwise(torch.ones(1, 16, dtype=torch.bfloat16), packed, None,
                                  "none", [], "")
    except RuntimeError as exc:
        return f"oneDNN bf16 prepacking failed here: {exc}".splitlines()[0]
    if not torch.equal(y, F.linear(torch.ones(1, 16, dtype=torch.bfloat16), w)):
        return "oneDNN's prepacked bf16 Linear disagrees with F.linear on this CPU"
    return None


class PackedLinear:
    """``y = x W^T + b`` for bf16 ``x [M, K]`` with ``W`` reordered once, into the kernel's
    own layout (the packed weight replaces the plain one: same bytes): on CPUs with AVX-512
    BF16 and N % 16 == K % 32 == 0, q's strip kernel (``amx_bf16.cpp``, on AMX tiles where
    the CPU has them: 1.07-1.11x oneDNN's prepacked Linear at 1-32 tokens over a 1.1B
    step's weights with AMX, 0.95-1.56x on a 2-core AMD EPYC without,
    ``tests/bench/bench_decode_gemms_cpu.py``); else oneDNN's blocked layout, for
    ``batch_hint`` tokens (any M runs). ``amx=False`` keeps oneDNN (the tuner times it)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 batch_hint: int = 1, amx: bool = True):
        if weight.dtype != torch.bfloat16:
            raise ValueError(f"PackedLinear takes bf16 weights, got {weight.dtype}")
        self.shape = tuple(weight.shape)
        if amx and amx_unavailable(*self.shape) is None:
            self.kernel, self.packed = "amx", to_amx_bf16_layout(weight)
            self.bias = None if bias is None else \
                bias.to(torch.bfloat16).float().contiguous()  # bf16 numbers, added in fp32
            return
        self.kernel = "prepacked"
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_hint)
        self.bias = None if bias is None else bias.to(torch.bfloat16).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "amx":
            y = bf16_amx(x.to(torch.bfloat16).contiguous(), self.packed, self.bias)
            if y is not None:  # every input the kernel refuses was refused at load, but M = 0
                return y
            return torch.empty(0, self.shape[0], dtype=torch.bfloat16)
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.packed,
                                                  self.bias, "none", [], "")

    def bind(self, x: torch.Tensor, out: torch.Tensor, scratch=None):
        """``out = self(x)`` for fixed bf16 buffers ``x [M, K]`` and ``out [M, N]`` as a call
        without arguments (q's strip kernel), or None (oneDNN); ``scratch`` is unused."""
        return bind_bf16_amx(x, self.packed, self.bias, out) if self.kernel == "amx" else None

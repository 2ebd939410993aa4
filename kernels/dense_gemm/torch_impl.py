"""bf16 Linear on oneDNN with the weight prepacked once (see the package docstring)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


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
    """``y = x W^T + b`` for bf16 ``x [M, K]`` with ``W`` reordered once for oneDNN. The
    packed weight replaces the plain one (same bytes). ``batch_hint`` is the M oneDNN picks
    the blocked layout for; any M runs."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 batch_hint: int = 1):
        if weight.dtype != torch.bfloat16:
            raise ValueError(f"PackedLinear takes bf16 weights, got {weight.dtype}")
        self.shape = tuple(weight.shape)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_hint)
        self.bias = None if bias is None else bias.to(torch.bfloat16).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.packed,
                                                  self.bias, "none", [], "")

"""The model's unquantized Linears on CPU in bf16: oneDNN prepacked weights.

``lm_head``, Linears ``--ignore`` kept, the layers of an unquantized model and (via
QuantLinear) fp8 weights dequantized at load are plain bf16 matrices. The engine reorders
each once at load into oneDNN's blocked layout
(:class:`q.kernels.dense_gemm.torch_impl.PackedLinear`) and keeps only that copy: 1.8-2.5x
faster than ``F.linear`` on the plain weight at M <= 4, never slower up to M = 512, on
this project's CPU (``tests/bench/tune_kernels_cpu.py --ops dense_bf16``, table in
docs/benchmarks.md; ``kernels/configs/cpu.json`` holds the choice). The products are the
very numbers ``F.linear`` gives (tests/test_kernels_torch.py checks them equal): speed
only. A tied ``lm_head`` gets its own packed copy: the embedding keeps its table.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from q.kernels.dense_gemm.torch_impl import PackedLinear, unavailable_reason

log = logging.getLogger("q.engine")


class PackedDenseLinear(nn.Module):
    """Drop-in for a bf16 ``nn.Linear``, its weight prepacked for oneDNN."""

    replaces_linear = True  # q eval hooks it as the Linear it stands for

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = None if linear.bias is None else linear.bias.detach()
        self.fast = PackedLinear(linear.weight.detach(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fast(x.reshape(-1, self.in_features))
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def pack_dense_linears(model: nn.Module, device: torch.device, dtype: torch.dtype,
                       impl: str) -> int:
    """Replace every bf16 ``nn.Linear`` of ``model`` on a CPU; returns how many."""
    if device.type != "cpu" or dtype != torch.bfloat16 or impl == "reference":
        return 0
    from q.kernels.configs import cpu_choice

    reason = unavailable_reason()
    if reason is None and cpu_choice("dense_bf16", 1) != "prepacked":
        reason = "kernels/configs/cpu.json measured F.linear faster on this CPU"
    # names only: holding the modules would keep every plain weight alive until the end,
    # doubling the model in memory (measured: 4.5 GiB peak for a 2.1 GiB 1.1B model)
    targets = [name for name, m in model.named_modules()
               if type(m) is nn.Linear and m.weight.dtype == torch.bfloat16]
    if not targets:
        return 0
    if reason is not None:
        log.info("unquantized Linears: F.linear (%s)", reason)
        return 0
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedDenseLinear(getattr(parent, child)))
    log.info("unquantized bf16 Linears (%d, first: %s): oneDNN prepacked weights", len(targets),
             targets[0])
    return len(targets)

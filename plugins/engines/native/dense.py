"""The model's unquantized Linears on CPU in bf16: weights prepacked once.

``lm_head``, Linears ``--ignore`` kept, the layers of an unquantized model and (via
QuantLinear) fp8 weights dequantized at load are plain bf16 matrices. The engine reorders
each once at load (:class:`q.kernels.dense_gemm.torch_impl.PackedLinear`) and keeps only
that copy. On CPUs with AVX-512 BF16, into the B layout of q's strip kernel
(``amx_bf16.cpp``, on AMX tiles where the CPU has them: 1.07-1.11x oneDNN at 1-32 tokens
over a 1.1B step's weights with AMX; without, on a 2-core AMD EPYC, 1.56x at 1 token,
1.18-1.28x at 4-8, 0.95x at 32; its sums in another order than ``F.linear``'s, within bf16
rounding). Elsewhere into oneDNN's blocked layout: 1.8-2.5x faster than ``F.linear`` on
the plain weight at M <= 4, never slower up to M = 512, on an AVX-512 BF16 CPU before the
strip kernel ran there (``tests/bench/tune_kernels_cpu.py --ops dense_bf16``, tables in
docs/benchmarks.md; ``kernels/configs/cpu.json`` holds the choice per class of CPU). The
products are the very numbers ``F.linear`` gives there. A tied ``lm_head``
gets its own packed copy: the embedding keeps its table.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from q.kernels.cpp_build import strip_kernel_name
from q.kernels.dense_gemm.torch_impl import PackedLinear, unavailable_reason

from .fused import install, sibling_groups

log = logging.getLogger("q.engine")
KERNEL_NAMES = {"amx": "q's strip kernel", "prepacked": "oneDNN"}


class PackedDenseLinear(nn.Module):
    """Drop-in for a bf16 ``nn.Linear``, its weight prepacked for oneDNN."""

    replaces_linear = True  # q eval hooks it as the Linear it stands for

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.fast = PackedLinear(weight.detach(), None if bias is None else bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fast(x.reshape(-1, self.in_features))
        return y.view(*x.shape[:-1], self.out_features)

    def bind(self, x: torch.Tensor, out: torch.Tensor, scratch=None):
        """``out = self(x)`` for fixed 2-D buffers as a call without arguments, or None
        (``scratch``: unused, no bf16 kernel needs any)."""
        return self.fast.bind(x, out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def pack_dense_linears(model: nn.Module, device: torch.device, dtype: torch.dtype,
                       impl: str) -> tuple[int, int]:
    """Replace every bf16 ``nn.Linear`` of ``model`` on a CPU, sibling projections fused;
    returns (Linears replaced, fused groups)."""
    if device.type != "cpu" or dtype != torch.bfloat16 or impl == "reference":
        return 0, 0
    from q.kernels.configs import cpu_choice

    reason = unavailable_reason()
    if reason is None and cpu_choice("dense_bf16", 1) != "prepacked":
        reason = "kernels/configs/cpu.json measured F.linear faster on this CPU"
    # names only: holding the modules would keep every plain weight alive until the end,
    # doubling the model in memory (measured: 4.5 GiB peak for a 2.1 GiB 1.1B model)
    targets = [name for name, m in model.named_modules()
               if type(m) is nn.Linear and m.weight.dtype == torch.bfloat16]
    if not targets:
        return 0, 0
    if reason is not None:
        log.info("unquantized Linears: F.linear (%s)", reason)
        return 0, 0
    fused = 0
    for parent, children in sibling_groups(targets):  # q/k/v and gate/up: one GEMM each
        linears = [getattr(model.get_submodule(parent), c) for c in children]
        biases = [m.bias for m in linears]
        bias = None if all(b is None for b in biases) else torch.cat(
            [torch.zeros(m.out_features, dtype=m.weight.dtype) if b is None else b.detach()
             for m, b in zip(linears, biases)])
        widths = [m.out_features for m in linears]
        layer = PackedDenseLinear(torch.cat([m.weight.detach() for m in linears]), bias)
        del linears, biases
        install(model, parent, children, layer, widths, layer.in_features)
        fused += 1
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if type(linear) is nn.Linear:  # not already a fused part
            setattr(parent, child, PackedDenseLinear(linear.weight, linear.bias))
    kernels = sorted({m.fast.kernel for m in model.modules() if isinstance(m, PackedDenseLinear)})
    log.info("unquantized bf16 Linears (%d, first: %s): weights prepacked once (%s); %d groups "
             "of sibling projections fused into one GEMM each", len(targets), targets[0],
             " and ".join(KERNEL_NAMES[k] + (f" ({strip_kernel_name()})" if k == "amx" else "")
                          for k in kernels), fused)
    return len(targets), fused

"""Dense (unquantized) GEMM ``y = x W^T``: the engine's bf16 Linears on CPU.

``torch_impl.PackedLinear`` holds the weight in oneDNN's blocked layout, reordered once
(``torch.ops.mkldnn._reorder_linear_weight``, the prepacking inductor's CPU freezing pass
and vLLM's CPU build use). ``F.linear`` on a plain bf16 weight reorders it on every call,
which at decode sizes costs more than the product (tests/bench/tune_kernels_cpu.py
--dense measures both). The reference is the fp32 product.
"""

from . import reference

__all__ = ["reference"]

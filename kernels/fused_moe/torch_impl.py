"""Fused MoE on torch's CPU kernels: the reference's routing and weighted sum, each expert's
rows through the dense layers' CPU kernels (``q.kernels.<op>.torch_impl``), prepared once.

- int8 / int4 weight-only: one :class:`WeightOnlyTorch` per expert (packed int8 / int4
  GEMMs for few rows, bf16 GEMM on the dequantized weight above the measured crossover).
- int8 W8A8: one :class:`Int8Scaled` per expert (``_int_mm``); the activation codes are
  the ones quantized once per token for all experts.
- fp8 (per channel, per tensor, 128x128 blocks): the codes stay fp8 in memory and an
  expert's weight is dequantized to the compute dtype when rows reach it, then bf16 GEMM.
  Dense fp8 layers dequantize once at load instead (2 bytes per weight); an MoE's experts
  are most of its weights and each step touches only the routed ones, so they stay 1 byte.
- dense: bf16 GEMM per expert.

Preparation frees the stacked reference layout of kinds that no longer need it, so weights
are held once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..packing.reference import unpack_int4_bytes
from ..scaled_gemm.torch_impl import Fp8Dequantized, Int8Scaled
from ..weight_only_gemm.torch_impl import WeightOnlyTorch


def prepare(w, dtype: torch.dtype) -> None:
    """Build ``w.cpu_kernels`` (one per expert) from the reference layout in ``w``."""
    k = w.shape[1]
    if w.kind == "weight-only" and not w.fp8:
        kernels = []
        for e in range(w.num_experts):
            codes = unpack_int4_bytes(w.qdata[e], k) if w.bits == 4 else w.qdata[e]
            zero = None if w.zero_point is None else w.zero_point[e]
            kernels.append(WeightOnlyTorch(codes, w.scale[e], w.group_size, w.bits, zero,
                                           dtype))
        w.qdata = w.scale = w.zero_point = None
    elif w.kind == "scaled" and not w.fp8:
        kernels = [Int8Scaled(w.qdata[e], w.scale[e], dtype) for e in range(w.num_experts)]
        w.qdata = w.scale = None
    else:  # dense, fp8: per expert at call time from the stacked tensors
        if w.kind == "dense":
            w.qdata = w.qdata.to(dtype)
        kernels = [None] * w.num_experts
    w.cpu_kernels = kernels
    w.compute_dtype = dtype


def expert_gemm(w, e: int, x: torch.Tensor, quantized) -> torch.Tensor:
    """Expert ``e``'s rows ``x [n, K]`` -> ``[n, N]`` in the compute dtype."""
    kernel = w.cpu_kernels[e]
    if w.kind == "dense":
        return F.linear(x.to(w.qdata.dtype), w.qdata[e])
    if w.kind == "weight-only" and kernel is not None:
        return kernel(x)
    if w.kind == "scaled" and kernel is not None:
        return kernel(x, quantized)
    block = w.block if w.kind == "block" else (1, w.shape[1])
    if w.kind == "weight-only":  # fp8 weight-only: no activation quantization
        weight = Fp8Dequantized(w.qdata[e], w.scale[e], (1, w.group_size), None, None,
                                w.compute_dtype).weight
        return F.linear(x.to(w.compute_dtype), weight)
    return Fp8Dequantized(w.qdata[e], w.scale[e], block, w.act_group, w.act_dtype,
                          w.compute_dtype)(x, quantized)

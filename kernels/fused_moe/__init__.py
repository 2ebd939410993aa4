"""Fused MoE: every routed (token, expert) pair through its expert's gate/up and down
projections, the weighted sum on the way out.

The algorithm every implementation follows (vLLM's ``fused_moe`` shape, without its
padding to GEMM tiles on CPU):

1. :func:`route` sorts the ``T x top_k`` (token, expert) pairs by expert, stably, and
   counts them: each expert's rows are one contiguous run of the sorted rows, and an expert
   no token chose costs nothing.
2. Activations are quantized once per token before sorting (per token or per token-group:
   a row's codes do not depend on the expert it goes to), the same quantization as the
   dense layers, then gathered into sorted order.
3. One GEMM per projection over all experts: gate and up are one ``[2I, H]`` weight per
   expert, ``act(gate) * up`` between the projections; the down projection's input is
   quantized once for all rows.
4. Each row is multiplied by its routing weight and added into its token's output in fp32.

Weights come as :class:`ExpertWeights`: one projection of every expert stacked, in the
layout the dense ops of ``q.kernels`` take, with the expert index in front. Implementations:
``reference`` (pure torch in fp32, each expert through the dense reference ops: the
oracle), ``torch`` (torch's CPU kernels per expert, prepared once by
:func:`torch_impl.prepare`) and ``triton``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import Impl
from ..dispatch import use_triton
from . import reference, torch_impl
from .reference import route

KINDS = ("dense", "weight-only", "scaled", "block")


@dataclass
class ExpertWeights:
    """One projection (``[N, K]`` per expert) of ``E`` experts.

    ===========  ====================================  ==============================
    kind         qdata                                 scale (zero_point)
    ===========  ====================================  ==============================
    dense        ``[E, N, K]`` floats                  None
    weight-only  ``[E, N, K]`` int8 / fp8 codes, int4  ``[E, N, ceil(K/group_size)]``
                 as ``[E, N, ceil(K/2)]`` bytes        (same shape, or None)
    scaled       ``[E, N, K]`` int8 / fp8 codes        ``[E, N, 1]``
    block        ``[E, N, K]`` fp8 codes               ``[E, ceil(N/bn), ceil(K/bk)]``
    ===========  ====================================  ==============================

    ``act_dtype`` is the dtype activations are quantized to before this projection (None:
    weight-only and dense), per token or, with ``act_group``, per group of columns.
    ``cpu_kernels`` holds per-expert prepared kernels once :func:`torch_impl.prepare` ran.
    """

    kind: str
    qdata: torch.Tensor | None
    scale: torch.Tensor | None
    shape: tuple[int, int]  # (N, K) of one expert
    num_experts: int
    zero_point: torch.Tensor | None = None
    bits: int = 16
    group_size: int = 0
    block: tuple[int, int] = (1, 1)
    act_group: int | None = None
    act_dtype: torch.dtype | None = None
    cpu_kernels: list | None = None
    compute_dtype: torch.dtype | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"expert weight kind {self.kind!r} is not one of {KINDS}")

    @property
    def fp8(self) -> bool:
        return self.qdata is not None and self.qdata.dtype in (torch.float8_e4m3fn,
                                                               torch.float8_e5m2)


def fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              gate_up: ExpertWeights, down: ExpertWeights, *, intermediate: int,
              up_offset: int | None = None, act_fn=torch.nn.functional.silu,
              impl: Impl | str = Impl.auto) -> torch.Tensor:
    """``x [T, H]``, ``topk_ids``/``topk_weights`` ``[T, top_k]`` -> ``[T, H]`` in x's dtype.

    ``gate_up`` holds each expert's gate rows ``[0, intermediate)`` and up rows
    ``[up_offset, up_offset + intermediate)`` (``up_offset`` defaults to ``intermediate``;
    fp8 128x128 blocks pad the gate rows to a whole block)."""
    up_offset = intermediate if up_offset is None else up_offset
    fp8 = gate_up.fp8 or down.fp8
    if use_triton(impl, x.device, "fused_moe", fp8=fp8):
        from .triton_impl import fused_moe as kernel

        return kernel(x, topk_ids, topk_weights, gate_up, down, intermediate, up_offset,
                      act_fn)
    use_cpu = Impl(impl) is not Impl.reference and gate_up.cpu_kernels is not None \
        and down.cpu_kernels is not None
    expert_gemm = torch_impl.expert_gemm if use_cpu else reference.expert_gemm
    return reference.moe(x, topk_ids, topk_weights, gate_up, down, intermediate, up_offset,
                         act_fn, expert_gemm)


__all__ = ["ExpertWeights", "fused_moe", "reference", "route"]

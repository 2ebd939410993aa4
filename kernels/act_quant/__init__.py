"""Dynamic activation quantization: per-token-group fp8, per-token fp8 and int8.

``reference`` is the oracle; ``triton_impl`` runs on GPUs; ``cpp_impl`` is per-token int8
on CPUs (bit-exact to the reference, compiled on first use).
"""

from __future__ import annotations

import torch

from .. import Impl
from ..dispatch import use_triton
from . import reference


def quantize_activation(x: torch.Tensor, group_size: int | None = None,
                        qdtype: torch.dtype = torch.float8_e4m3fn,
                        impl: Impl | str = Impl.auto) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> codes ``[M, K]`` and fp32 scales ``[M, ceil(K / group)]``."""
    if use_triton(impl, x.device, "quantize_activation", fp8=False):
        from .triton_impl import quantize_activation as kernel

        return kernel(x, group_size, qdtype)
    return reference.quantize_activation(x, group_size, qdtype)


def quantize_activation_cpu(x: torch.Tensor, group_size: int | None,
                            qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's codes and scales by the fastest exact CPU path: per-token int8 by the
    C++ kernel (bit-exact, one pass per row) where it builds, anything else by the
    reference."""
    if group_size is None and qdtype == torch.int8:
        from .cpp_impl import quantize_int8_per_token

        out = quantize_int8_per_token(x)
        if out is not None:
            return out
    return reference.quantize_activation(x, group_size, qdtype)


__all__ = ["quantize_activation", "quantize_activation_cpu", "reference"]

"""Dynamic activation quantization: per-token-group fp8, per-token fp8 and int8."""

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


__all__ = ["quantize_activation", "reference"]

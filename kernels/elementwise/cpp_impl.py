"""RMSNorm in C++ (``elementwise.cpp``, built on first use by :mod:`q.kernels.cpp_build`).
:func:`rms_norm` returns None where the kernel cannot take its inputs (no compiler, a dtype
other than float32/bfloat16, mixed dtypes, rows that are not each contiguous), and the
caller runs :mod:`.reference` instead."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from .. import cpp_build

SOURCE = Path(__file__).with_name("elementwise.cpp")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


@functools.cache
def _library():
    lib, why = cpp_build.load(SOURCE)
    if lib is None:
        return None, why
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.q_rms_norm.argtypes = [ctypes.c_int, ptr, i64, ptr, ptr, ptr, ptr, i64, i64,
                               ctypes.c_float, ctypes.c_int]
    lib.q_rms_norm.restype = ctypes.c_int
    return lib, None


def unavailable_reason() -> str | None:
    """Why the kernels cannot run here (None: they can)."""
    return _library()[1]


def _rows(t: torch.Tensor) -> int | None:
    """The row stride of a 2-D view whose rows are each contiguous, else None."""
    if t.dim() != 2 or t.stride(1) != 1 or t.device.type != "cpu":
        return None
    return t.stride(0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None):
    """See :func:`.reference.rms_norm` (any leading shape); None where it cannot run."""
    lib = _library()[0]
    dtype = _DTYPES.get(x.dtype)
    if lib is None or dtype is None or weight.dtype != x.dtype or not weight.is_contiguous():
        return None
    width = x.shape[-1]
    x2 = x.reshape(-1, width) if x.dim() != 2 else x
    stride = _rows(x2)
    if stride is None or weight.numel() != width:
        return None
    rows = x2.shape[0]
    out = torch.empty(x.shape, dtype=x.dtype)
    res_ptr = res_out_ptr = None
    if residual is not None:
        if residual.dtype != x.dtype or not residual.is_contiguous() \
                or residual.numel() != x2.numel():
            return None
        summed = torch.empty(x.shape, dtype=x.dtype)
        res_ptr, res_out_ptr = residual.data_ptr(), summed.data_ptr()
    lib.q_rms_norm(dtype, x2.data_ptr(), stride, res_ptr, res_out_ptr, weight.data_ptr(),
                   out.data_ptr(), rows, width, eps, torch.get_num_threads())
    return out if residual is None else (out, summed)


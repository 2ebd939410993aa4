"""int8 W8A8 pieces in C++ (``int8_gemm.cpp``, built on first use by
:mod:`q.kernels.cpp_build`), bit-exact to the torch ops :class:`.torch_impl.Int8Scaled`
otherwise runs: the epilogue of ``_int_mm`` (int32 sums scaled per token and per channel,
cast) and a GEMV for a few tokens. Each returns None where it cannot run, and the caller
keeps the torch ops."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from .. import cpp_build

SOURCE = Path(__file__).with_name("int8_gemm.cpp")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def unavailable_reason() -> str | None:
    """Why the kernels cannot run here (None: they can)."""
    return cpp_build.load(SOURCE)[1]


@functools.cache
def _library():
    lib, _ = cpp_build.load(SOURCE)
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.q_int8_epilogue.argtypes = [ctypes.c_int] + [ptr] * 4 + [i64] * 2 + [ctypes.c_int]
    lib.q_int8_gemv.argtypes = [ctypes.c_int] + [ptr] * 5 + [i64] * 3 + [ctypes.c_int]
    lib.q_int8_epilogue.restype = lib.q_int8_gemv.restype = ctypes.c_int
    return lib


def _fp32_vector(t: torch.Tensor, n: int) -> bool:
    return t.dtype == torch.float32 and t.numel() == n and t.is_contiguous()


def int8_epilogue(acc: torch.Tensor, xs: torch.Tensor, ws: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor | None:
    """``(acc.float() * xs) * ws`` as ``out_dtype``: ``acc [M, N]`` int32, ``xs [M, 1]`` and
    ``ws [1, N]`` fp32 (contiguous); None where the kernel cannot run."""
    lib = _library()
    dtype = _DTYPES.get(out_dtype)
    m, n = acc.shape
    if (lib is None or dtype is None or acc.dtype != torch.int32 or not acc.is_contiguous()
            or not _fp32_vector(xs, m) or not _fp32_vector(ws, n)):
        return None
    out = torch.empty(m, n, dtype=out_dtype)
    lib.q_int8_epilogue(dtype, acc.data_ptr(), xs.data_ptr(), ws.data_ptr(), out.data_ptr(),
                        m, n, torch.get_num_threads())
    return out


def int8_gemv(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor | None:
    """``int8_epilogue(xq @ wq.T, xs, ws)`` with the weight streamed once (for a few
    tokens): ``xq [M, K]`` and ``wq [N, K]`` int8, contiguous; None where it cannot run."""
    lib = _library()
    dtype = _DTYPES.get(out_dtype)
    m, k = xq.shape
    n = wq.shape[0]
    if (lib is None or dtype is None or xq.dtype != torch.int8 or wq.dtype != torch.int8
            or wq.shape[1] != k or not xq.is_contiguous() or not wq.is_contiguous()
            or not _fp32_vector(xs, m) or not _fp32_vector(ws, n)):
        return None
    out = torch.empty(m, n, dtype=out_dtype)
    lib.q_int8_gemv(dtype, xq.data_ptr(), xs.data_ptr(), wq.data_ptr(), ws.data_ptr(),
                    out.data_ptr(), m, n, k, torch.get_num_threads())
    return out

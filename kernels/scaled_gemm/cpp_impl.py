"""int8 W8A8 pieces in C++ (``int8_gemm.cpp``, built on first use by
:mod:`q.kernels.cpp_build`), bit-exact to the torch ops :class:`.torch_impl.Int8Scaled`
otherwise runs: the epilogue of ``_int_mm`` (int32 sums scaled per token and per channel,
cast) and a GEMV for a few tokens. Each returns None where it cannot run, and the caller
keeps the torch ops."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .. import cpp_build

SOURCE = Path(__file__).with_name("int8_gemm.cpp")


def unavailable_reason() -> str | None:
    """Why the kernels cannot run here (None: they can)."""
    return cpp_build.load(SOURCE)[1]


@functools.cache
def _library():
    return cpp_build.bind(SOURCE, q_int8_epilogue="i pppp ll i",
                          q_int8_gemv="i pppppp lll i")[0]


def _fp32_vector(t: torch.Tensor, n: int) -> bool:
    return t.dtype == torch.float32 and t.numel() == n and t.is_contiguous()


def int8_epilogue(acc: torch.Tensor, xs: torch.Tensor, ws: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor | None:
    """``(acc.float() * xs) * ws`` as ``out_dtype``: ``acc [M, N]`` int32, ``xs [M, 1]`` and
    ``ws [1, N]`` fp32 (contiguous); None where the kernel cannot run."""
    lib = _library()
    dtype = cpp_build.dtype_code(out_dtype)
    m, n = acc.shape
    if (lib is None or dtype is None or acc.dtype != torch.int32 or not acc.is_contiguous()
            or not _fp32_vector(xs, m) or not _fp32_vector(ws, n)):
        return None
    out = torch.empty(m, n, dtype=out_dtype)
    lib.q_int8_epilogue(dtype, acc.data_ptr(), xs.data_ptr(), ws.data_ptr(), out.data_ptr(),
                        m, n, torch.get_num_threads())
    return out


def weight_row_sums(wq: torch.Tensor) -> torch.Tensor:
    """``sum_k wq[n, k]`` in int32: what :func:`int8_gemv` subtracts (see int8_gemm.cpp)."""
    return wq.sum(1, dtype=torch.int32).contiguous()


def int8_gemv(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
              out_dtype: torch.dtype, rowsum: torch.Tensor | None = None
              ) -> torch.Tensor | None:
    """``int8_epilogue(xq @ wq.T, xs, ws)`` with the weight streamed once (for a few
    tokens): ``xq [M, K]`` and ``wq [N, K]`` int8, contiguous; ``rowsum``:
    :func:`weight_row_sums` of ``wq``, kept by callers that call often (computed here
    otherwise). None where it cannot run."""
    lib = _library()
    dtype = cpp_build.dtype_code(out_dtype)
    m, k = xq.shape
    n = wq.shape[0]
    if (lib is None or dtype is None or xq.dtype != torch.int8 or wq.dtype != torch.int8
            or wq.shape[1] != k or not xq.is_contiguous() or not wq.is_contiguous()
            or not _fp32_vector(xs, m) or not _fp32_vector(ws, n)):
        return None
    rowsum = weight_row_sums(wq) if rowsum is None else rowsum
    if rowsum.dtype != torch.int32 or rowsum.numel() != n or not rowsum.is_contiguous():
        return None
    out = torch.empty(m, n, dtype=out_dtype)
    lib.q_int8_gemv(dtype, xq.data_ptr(), xs.data_ptr(), wq.data_ptr(), ws.data_ptr(),
                    rowsum.data_ptr(), out.data_ptr(), m, n, k, torch.get_num_threads())
    return out

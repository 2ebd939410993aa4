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
from ..bound_calls import BoundCall

SOURCE = Path(__file__).with_name("int8_gemm.cpp")


def unavailable_reason() -> str | None:
    """Why the kernels cannot run here (None: they can)."""
    return cpp_build.load(SOURCE)[1]


@functools.cache
def _library():
    return cpp_build.bind(SOURCE, q_int8_epilogue="i pppp ll i",
                          q_int8_gemv="i pppppp lll i")[0]


def _fp32_vector(t: torch.Tensor, n: int) -> bool:
    return cpp_build.plain(t, torch.float32, numel=n)


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


AMX_SOURCE = Path(__file__).with_name("amx_int8.cpp")
AMX_FLAGS = {"avx512_vnni", "avx512_bf16"}  # and AMX-INT8 tiles where the CPU has them


def _probe(lib) -> bool:
    for m in (1, 5):  # both paths (registers, tiles); every sum is exactly 64
        x, xs = torch.ones(m, 64, dtype=torch.int8), torch.ones(m)
        w = torch.ones(16, 64, dtype=torch.int8)
        ws, out = torch.ones(16), torch.empty(m, 16)
        rowsum, amx_w = weight_row_sums(w), to_amx_int8_layout(w)  # alive during the call
        lib.q_int8_amx(0, x.data_ptr(), xs.data_ptr(), amx_w.data_ptr(), ws.data_ptr(),
                       rowsum.data_ptr(), out.data_ptr(), m, 16, 64, 1)
        if not torch.equal(out, torch.full((m, 16), 64.0)):
            return False
    return True


@functools.cache
def _amx():
    return cpp_build.bind_amx(AMX_SOURCE, AMX_FLAGS, "q_amx_int8_init", _probe,
                              q_int8_amx="i pppppp lll i", q_int8_amx_pairs="i pppppp lll i")


def amx_unavailable(n: int, k: int) -> str | None:
    """Why :func:`int8_amx` cannot run an ``[n, k]`` weight here (None: it can)."""
    if n % 16 or k % 64:
        return f"N={n}, K={k}: the AMX kernel takes N % 16 == 0 and K % 64 == 0"
    return _amx()[1]


def to_amx_int8_layout(wq: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` int8 -> ``[N / 16, K / 4, 16, 4]``: per 16 channels, four columns' codes of
    each side by side, the B operand of AMX's int8 tiles (amx_int8.cpp)."""
    n, k = wq.shape
    return wq.reshape(n // 16, 16, k // 4, 4).permute(0, 2, 1, 3).contiguous()


def _int8_arguments(xq, xs, amx_w, ws, rowsum, out) -> tuple | None:
    """``q_int8_amx``'s arguments, each tensor checked, or None where the kernel cannot run
    them (what :func:`int8_amx` and :func:`bind_int8_amx` share)."""
    lib = _amx()[0]
    dtype = cpp_build.dtype_code(out.dtype)
    m, k = xq.shape
    n = amx_w.shape[0] * 16
    if (lib is None or dtype is None or m == 0 or not cpp_build.plain(xq, torch.int8)
            or not cpp_build.plain(amx_w, torch.int8, (n // 16, k // 4, 16, 4))
            or not _fp32_vector(xs, m) or not _fp32_vector(ws, n)
            or not cpp_build.plain(rowsum, torch.int32, numel=n)
            or not cpp_build.plain(out, out.dtype, (m, n)) or amx_unavailable(n, k)):
        return None
    return (dtype, xq.data_ptr(), xs.data_ptr(), amx_w.data_ptr(), ws.data_ptr(),
            rowsum.data_ptr(), out.data_ptr(), m, n, k, torch.get_num_threads())


def int8_amx(xq: torch.Tensor, xs: torch.Tensor, amx_w: torch.Tensor, ws: torch.Tensor,
             rowsum: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor | None:
    """:func:`int8_gemv`'s result (the same bits) for any number of tokens, on AMX tiles or
    AVX-512 registers (``amx_tiles.h``):
    ``amx_w`` from :func:`to_amx_int8_layout`, ``rowsum`` :func:`weight_row_sums` of the
    plain weight. None where it cannot run."""
    out = torch.empty(xq.shape[0], amx_w.shape[0] * 16, dtype=out_dtype)
    args = _int8_arguments(xq, xs, amx_w, ws, rowsum, out)
    return None if args is None or _amx()[0].q_int8_amx(*args) else out


def bind_int8_amx(xq: torch.Tensor, xs: torch.Tensor, amx_w: torch.Tensor, ws: torch.Tensor,
                  rowsum: torch.Tensor, out: torch.Tensor):
    """:func:`int8_amx` from fixed buffers ``xq``/``xs`` into ``out`` ``[M, N]`` (its dtype the
    output's) as a call without arguments (:class:`q.kernels.bound_calls.BoundCall`), or None
    where it cannot run."""
    args = _int8_arguments(xq, xs, amx_w, ws, rowsum, out)
    return None if args is None else BoundCall(_amx()[0], "q_int8_amx", args)


def int8_amx_pairs(xq: torch.Tensor, xs: torch.Tensor, pairs: torch.Tensor, ws: torch.Tensor,
                   rowsum: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor | None:
    """:func:`int8_amx`'s result (the same bits) for 5+ tokens with the weight in the
    weight-only int8 kernel's pair layout ``[N / 16, K / 2, 16, 2]``
    (:func:`q.kernels.weight_only_gemm.cpp_impl.to_amx_layout`), regrouped a strip at a time
    in cache: how weight-only int8 layers run int8 prefill without a second copy of their
    weight. None where it cannot run."""
    lib = _amx()[0]
    dtype = cpp_build.dtype_code(out_dtype)
    m, k = xq.shape
    n = pairs.shape[0] * 16
    if (lib is None or dtype is None or m < 5 or not cpp_build.plain(xq, torch.int8)
            or not cpp_build.plain(pairs, torch.int8, (n // 16, k // 2, 16, 2))
            or not _fp32_vector(xs, m) or not _fp32_vector(ws, n)
            or not cpp_build.plain(rowsum, torch.int32, numel=n) or amx_unavailable(n, k)):
        return None
    out = torch.empty(m, n, dtype=out_dtype)
    failed = lib.q_int8_amx_pairs(dtype, xq.data_ptr(), xs.data_ptr(), pairs.data_ptr(),
                                  ws.data_ptr(), rowsum.data_ptr(), out.data_ptr(), m, n, k,
                                  torch.get_num_threads())
    return None if failed else out

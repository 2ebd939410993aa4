"""Weight-only int4 (from torch's CPU int4pack layout) and int8 weights to bf16 in one pass
(``dequant.cpp``, built on first use by :mod:`q.kernels.cpp_build`): what the weight-only
GEMM does for prompts, above the packed kernels' crossovers. Bit-identical to the torch ops
they replace (tests/test_kernels_torch.py); None where they cannot run, and the caller
keeps those ops."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .. import cpp_build

SOURCE = Path(__file__).with_name("dequant.cpp")
GEMV_SOURCE = Path(__file__).with_name("int8_gemv.cpp")
AMX_SOURCE = Path(__file__).with_name("amx_gemm.cpp")
AMX_FLAGS = {"amx_tile", "amx_bf16", "avx512_bf16"}
TILE = 32  # columns per pass in the kernel: int4 groups are multiples of it


@functools.cache
def _library():
    return cpp_build.bind(SOURCE, q_dequant_int4pack="ppp llll i",
                          q_dequant_int8="pppp lll i")[0]


@functools.cache
def _gemv():
    lib, _ = cpp_build.bind(GEMV_SOURCE, q_int8_weight_gemv="i ppp p lll i")
    return None if lib is None else lib.q_int8_weight_gemv


def gemv_unavailable() -> str | None:
    """Why :func:`int8_weight_gemv` cannot run here (None: it can)."""
    return cpp_build.load(GEMV_SOURCE)[1]


def int8_weight_gemv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor
                     ) -> torch.Tensor | None:
    """``(x @ codes^T) * scale`` in ``x``'s dtype (bf16 or fp32) for a few tokens, the
    weight streamed once (``int8_gemv.cpp``): ``x [M, K]``, ``codes [N, K]`` int8,
    ``scale [N]`` fp32, all contiguous. None where it cannot run."""
    kernel = _gemv()
    dtype = cpp_build.dtype_code(x.dtype)
    m, k = x.shape
    n = codes.shape[0]
    if (kernel is None or dtype is None or codes.dtype != torch.int8 or codes.shape[1] != k
            or scale.dtype != torch.float32 or scale.numel() != n or not x.is_contiguous()
            or not codes.is_contiguous() or not scale.is_contiguous()):
        return None
    out = torch.empty(m, n, dtype=x.dtype)
    kernel(dtype, x.data_ptr(), codes.data_ptr(), scale.data_ptr(), out.data_ptr(), m, n, k,
           torch.get_num_threads())
    return out


@functools.cache
def _amx() -> tuple[object | None, str | None]:
    from ..configs import cpu_flags

    if not AMX_FLAGS <= cpu_flags():
        return None, "this CPU has no AMX-BF16 tiles"
    lib, why = cpp_build.bind(AMX_SOURCE, q_amx_init="", q_wo_int8_amx="pppp lll i")
    if lib is None:
        return None, why
    if lib.q_amx_init() != 0:
        return None, "Linux refused this process the AMX tile state (arch_prctl)"
    x = torch.ones(1, 32, dtype=torch.bfloat16)  # a probe with a known, exact answer
    codes = to_amx_layout(torch.ones(16, 32, dtype=torch.int8))
    scale, out = torch.ones(16), torch.empty(1, 16, dtype=torch.bfloat16)
    lib.q_wo_int8_amx(x.data_ptr(), codes.data_ptr(), scale.data_ptr(), out.data_ptr(), 1, 16,
                      32, 1)
    if not torch.equal(out, torch.full((1, 16), 32.0, dtype=torch.bfloat16)):
        return None, "the AMX kernel's probe gave a wrong sum on this CPU"
    return lib, None


def amx_unavailable(n: int, k: int) -> str | None:
    """Why :func:`int8_weight_amx` cannot run an ``[n, k]`` weight here (None: it can)."""
    if n % 16 or k % 32:
        return f"N={n}, K={k}: the AMX kernel takes N % 16 == 0 and K % 32 == 0"
    return _amx()[1]


def to_amx_layout(codes: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` int8 codes -> ``[N / 16, K / 2, 16, 2]``: per 16 channels, the code pairs
    of each two columns side by side, the B operand of AMX's bf16 tiles (amx_gemm.cpp)."""
    n, k = codes.shape
    return codes.reshape(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def int8_weight_amx(x: torch.Tensor, amx_codes: torch.Tensor, scale: torch.Tensor
                    ) -> torch.Tensor | None:
    """``(x @ codes^T) * scale`` in bf16 on AMX tiles, any number of tokens: ``x [M, K]``
    bf16, ``amx_codes`` from :func:`to_amx_layout`, ``scale [N]`` fp32, all contiguous.
    None where it cannot run."""
    lib = _amx()[0]
    m, k = x.shape
    n = amx_codes.shape[0] * 16
    if (lib is None or x.dtype != torch.bfloat16 or amx_codes.dtype != torch.int8
            or amx_codes.shape[1] * 2 != k or scale.dtype != torch.float32
            or scale.numel() != n or not x.is_contiguous() or not amx_codes.is_contiguous()
            or not scale.is_contiguous() or m == 0):
        return None
    out = torch.empty(m, n, dtype=torch.bfloat16)
    lib.q_wo_int8_amx(x.data_ptr(), amx_codes.data_ptr(), scale.data_ptr(), out.data_ptr(),
                      m, n, k, torch.get_num_threads())
    return out


def dequantize_int4pack(packed: torch.Tensor, scales_and_zeros: torch.Tensor, n: int, k: int,
                        group: int, block: int | None) -> torch.Tensor | None:
    """bf16 ``[n, k]``: ``(q - 8) * s + z`` from torch's packed layout (``block`` rows per
    block, see torch_impl.int4pack_block_n), or None where the kernel cannot run."""
    lib = _library()
    if (lib is None or block is None or n % block or block % 2 or group % TILE or k % group
            or scales_and_zeros.dtype != torch.bfloat16 or not packed.is_contiguous()
            or not scales_and_zeros.is_contiguous()):
        return None
    out = torch.empty(n, k, dtype=torch.bfloat16)
    lib.q_dequant_int4pack(packed.data_ptr(), scales_and_zeros.data_ptr(), out.data_ptr(), n,
                           k, block, group, torch.get_num_threads())
    return out


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                    group: int) -> torch.Tensor | None:
    """bf16 ``[N, K]``: ``(codes - zero) * scale`` with bf16 ``scale``/``zero`` ``[N, K /
    group]`` (a column per group of ``group`` columns), or None where it cannot run."""
    lib = _library()
    n, k = codes.shape
    groups = -(-k // group)
    tables = [scale] if zero is None else [scale, zero]
    if (lib is None or codes.dtype != torch.int8 or not codes.is_contiguous()
            or any(t.dtype != torch.bfloat16 or t.shape != (n, groups)
                   or not t.is_contiguous() for t in tables)):
        return None
    out = torch.empty(n, k, dtype=torch.bfloat16)
    lib.q_dequant_int8(codes.data_ptr(), scale.data_ptr(),
                       None if zero is None else zero.data_ptr(), out.data_ptr(), n, k, group,
                       torch.get_num_threads())
    return out

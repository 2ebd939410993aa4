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
from ..bound_calls import BoundCall

SOURCE = Path(__file__).with_name("dequant.cpp")
GEMV_SOURCE = Path(__file__).with_name("int8_gemv.cpp")
AMX_SOURCE = Path(__file__).with_name("amx_gemm.cpp")
AMX_INT4_SOURCE = Path(__file__).with_name("amx_int4.cpp")
AMX_FLAGS = {"avx512_bf16", "avx512_vnni"}  # and AMX-BF16 tiles where the CPU has them
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


def _probe_int8(lib) -> bool:
    x = torch.ones(1, 32, dtype=torch.bfloat16)  # every sum is exactly 32
    codes = to_amx_layout(torch.ones(16, 32, dtype=torch.int8))
    scale, out = torch.ones(16), torch.empty(1, 16, dtype=torch.bfloat16)
    lib.q_wo_int8_amx(x.data_ptr(), codes.data_ptr(), scale.data_ptr(), out.data_ptr(), 1, 16,
                      32, 1)
    return torch.equal(out, torch.full((1, 16), 32.0, dtype=torch.bfloat16))


@functools.cache
def _amx() -> tuple[object | None, str | None]:
    return cpp_build.bind_amx(AMX_SOURCE, AMX_FLAGS, "q_amx_init", _probe_int8,
                              q_wo_int8_amx="pppp lll i", q_wo_int8_register_tokens="")


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


def _int8_arguments(x, amx_codes, scale, out) -> tuple | None:
    """``q_wo_int8_amx``'s arguments, each tensor checked, or None where the kernel cannot
    run them (what :func:`int8_weight_amx` and :func:`bind_int8_weight_amx` share)."""
    lib = _amx()[0]
    m, k = x.shape
    n = amx_codes.shape[0] * 16
    if (lib is None or m == 0 or not cpp_build.plain(x, torch.bfloat16)
            or not cpp_build.plain(amx_codes, torch.int8, (n // 16, k // 2, 16, 2))
            or not cpp_build.plain(scale, torch.float32, numel=n)
            or not cpp_build.plain(out, torch.bfloat16, (m, n)) or amx_unavailable(n, k)):
        return None
    return (x.data_ptr(), amx_codes.data_ptr(), scale.data_ptr(), out.data_ptr(), m, n, k,
            torch.get_num_threads())


def int8_weight_amx(x: torch.Tensor, amx_codes: torch.Tensor, scale: torch.Tensor
                    ) -> torch.Tensor | None:
    """``(x @ codes^T) * scale`` in bf16 on AMX tiles, any number of tokens: ``x [M, K]``
    bf16, ``amx_codes`` from :func:`to_amx_layout`, ``scale [N]`` fp32, all contiguous.
    None where it cannot run."""
    out = torch.empty(x.shape[0], amx_codes.shape[0] * 16, dtype=torch.bfloat16)
    args = _int8_arguments(x, amx_codes, scale, out)
    return None if args is None or _amx()[0].q_wo_int8_amx(*args) else out


def bind_int8_weight_amx(x: torch.Tensor, amx_codes: torch.Tensor, scale: torch.Tensor,
                         out: torch.Tensor):
    """:func:`int8_weight_amx` from ``x`` into ``out`` ``[M, N]`` bf16 (fixed buffers) as a
    call without arguments (:class:`q.kernels.bound_calls.BoundCall`), or None where it
    cannot run."""
    args = _int8_arguments(x, amx_codes, scale, out)
    return None if args is None else BoundCall(_amx()[0], "q_wo_int8_amx", args)


def _probe_int4(lib) -> bool:
    for m in (1, 9):  # both paths (registers, tiles); codes 1, scale 1, zero 0.5: 32 * 1.5
        x = torch.ones(m, 32, dtype=torch.bfloat16)
        codes = to_amx_int4_layout(torch.ones(16, 32, dtype=torch.int8))
        sz = to_amx_int4_scales(torch.ones(16, 1), torch.full((16, 1), 0.5))
        out = torch.empty(m, 16, dtype=torch.bfloat16)
        lib.q_wo_int4_amx(x.data_ptr(), codes.data_ptr(), sz.data_ptr(), out.data_ptr(), m, 16,
                          32, 32, 1, 1)
        if not torch.equal(out, torch.full((m, 16), 48.0, dtype=torch.bfloat16)):
            return False
    return True


@functools.cache
def _amx_int4() -> tuple[object | None, str | None]:
    return cpp_build.bind_amx(AMX_INT4_SOURCE, AMX_FLAGS, "q_amx_int4_init", _probe_int4,
                              q_wo_int4_amx="pppp llll ii", q_wo_int4_register_tokens="")


def register_tokens(bits: int) -> int | None:
    """The most tokens the strip kernel of ``bits``-bit weights (8 or 4) multiplies on its
    register path (exact integer sums over 16-bit fixed-point activations, so a token's bits
    do not depend on the batch) before it widens strips to bf16: the built kernel's
    kRegisterTokens. None where that kernel is unavailable."""
    if bits not in (4, 8):
        raise ValueError(f"register_tokens: {bits}-bit weights have no strip kernel (4 or 8)")
    lib = (_amx if bits == 8 else _amx_int4)()[0]
    if lib is None:
        return None
    return (lib.q_wo_int8_register_tokens if bits == 8 else lib.q_wo_int4_register_tokens)()


def amx_int4_unavailable(n: int, k: int, group: int) -> str | None:
    """Why :func:`int4_weight_amx` cannot run an ``[n, k]`` weight in groups of ``group``
    here (None: it can)."""
    if n % 16 or group % 32 or k % group:
        return (f"N={n}, K={k}, groups of {group}: the AMX int4 kernel takes N % 16 == 0 and "
                "groups of a multiple of 32 that divide K")
    return _amx_int4()[1]


def to_amx_int4_layout(codes: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` int4 codes (int8, -8..7) -> ``[N / 16, K / 8, 64]`` bytes of ``q = code +
    8``: byte 4c + j of block t holds channel c's q at k = 8t + j (low nibble) and at
    k = 8t + 4 + j (high nibble) (amx_int4.cpp)."""
    n, k = codes.shape
    q = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(n // 16, 16, k // 8, 2, 4)
    low, high = (q[:, :, :, h].permute(0, 2, 1, 3).reshape(n // 16, k // 8, 64)
                 for h in (0, 1))
    return (low | (high << 4)).contiguous()


def from_amx_int4_layout(amx_codes: torch.Tensor) -> torch.Tensor:
    """:func:`to_amx_int4_layout` undone: ``[N, K]`` unsigned ``q`` (uint8, 0..15)."""
    strips, blocks, _ = amx_codes.shape
    halves = torch.stack([amx_codes & 0xF, amx_codes >> 4], dim=2)  # [s, t, h, 64]
    q = halves.reshape(strips, blocks, 2, 16, 4).permute(0, 3, 1, 2, 4)  # [s, c, t, h, j]
    return q.reshape(strips * 16, blocks * 8)


def to_amx_int4_scales(scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """bf16 ``[N / 16, groups, 2, 16]`` from ``scale`` and ``zero`` ``[N, groups]`` (w =
    (q - 8) * scale + zero): per strip and group, its 16 scales then its 16 zeros. Without
    zeros (None) ``[N / 16, groups, 1, 16]``: the scales alone, which a decode step then
    streams at half the bytes (a sixteenth of a byte per weight in groups of 64, against
    half a byte of codes)."""
    n, groups = scale.shape
    parts = torch.stack([scale] if zero is None else [scale, zero]).to(torch.bfloat16)
    return parts.reshape(len(parts), n // 16, 16, groups).permute(1, 3, 0, 2).contiguous()


def _int4_arguments(x, amx_codes, amx_scales, group, out) -> tuple | None:
    """``q_wo_int4_amx``'s arguments, each tensor checked, or None where the kernel cannot
    run them (what :func:`int4_weight_amx` and :func:`bind_int4_weight_amx` share)."""
    lib = _amx_int4()[0]
    m, k = x.shape
    n = amx_codes.shape[0] * 16
    parts = amx_scales.shape[2] if amx_scales.dim() == 4 else 0  # 2: zeros after the scales
    if (lib is None or m == 0 or group <= 0 or not cpp_build.plain(x, torch.bfloat16)
            or not cpp_build.plain(amx_codes, torch.uint8, (n // 16, k // 8, 64))
            or parts not in (1, 2)
            or not cpp_build.plain(amx_scales, torch.bfloat16, (n // 16, k // group, parts, 16))
            or not cpp_build.plain(out, torch.bfloat16, (m, n))
            or amx_int4_unavailable(n, k, group)):
        return None
    return (x.data_ptr(), amx_codes.data_ptr(), amx_scales.data_ptr(), out.data_ptr(), m, n, k,
            group, int(parts == 2), torch.get_num_threads())


def int4_weight_amx(x: torch.Tensor, amx_codes: torch.Tensor, amx_scales: torch.Tensor,
                    group: int) -> torch.Tensor | None:
    """``x @ w^T`` in bf16 on AMX tiles for any number of tokens, ``w = (q - 8) * s + z``:
    ``x [M, K]`` bf16, ``amx_codes`` from :func:`to_amx_int4_layout`, ``amx_scales`` from
    :func:`to_amx_int4_scales` (with zeros or without). None where it cannot run."""
    out = torch.empty(x.shape[0], amx_codes.shape[0] * 16, dtype=torch.bfloat16)
    args = _int4_arguments(x, amx_codes, amx_scales, group, out)
    return None if args is None or _amx_int4()[0].q_wo_int4_amx(*args) else out


def bind_int4_weight_amx(x: torch.Tensor, amx_codes: torch.Tensor, amx_scales: torch.Tensor,
                         group: int, out: torch.Tensor):
    """:func:`int4_weight_amx` from ``x`` into ``out`` ``[M, N]`` bf16 (fixed buffers) as a
    call without arguments (:class:`q.kernels.bound_calls.BoundCall`), or None where it
    cannot run."""
    args = _int4_arguments(x, amx_codes, amx_scales, group, out)
    return None if args is None else BoundCall(_amx_int4()[0], "q_wo_int4_amx", args)


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

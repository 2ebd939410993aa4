"""Weight-only int8 and int4 layers multiplied with int8 activations
(``int8_activations.cpp``; the engine's ``woq_activations="int8"``), on CPUs without AMX
tiles: the activations quantized per token and block of :data:`ACTIVATION_BLOCK` values
(act_quant's reference with that group size), the weights read in the layouts the exact
kernels keep. None where a kernel cannot run; the caller then keeps another path."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .. import cpp_build
from .cpp_impl import AMX_FLAGS, _int4_arguments, amx_int4_unavailable, amx_unavailable

SOURCE = Path(__file__).with_name("int8_activations.cpp")
# activation values per scale (kActGroup in the kernel): llama.cpp's q8_0 block. On SmolLM2
# with int8 weights, per-token scales cost +2.2% perplexity over exact activations, blocks of
# 64 +1.1%, blocks of 32 +0.3% (tests/bench/woq_activation_blocks.py, fake-quantized)
ACTIVATION_BLOCK = 32


@functools.cache
def _library() -> tuple[object | None, str | None]:
    from ..configs import cpu_flags

    if not AMX_FLAGS <= cpu_flags():
        return None, f"this CPU lacks {', '.join(sorted(AMX_FLAGS - cpu_flags()))}"
    lib, why = cpp_build.bind(SOURCE, q_wo_int4_int8="pppp llll ii",
                              q_wo_int8_int8="pppp lll i", q_int8_block_codes="ppp lll i",
                              q_int8_activation_block="")
    if lib is not None and lib.q_int8_activation_block() != ACTIVATION_BLOCK:
        return None, "int8_activations.cpp's block size is not ACTIVATION_BLOCK"
    return lib, why


def unavailable(bits: int, n: int, k: int, group: int | None = None) -> str | None:
    """Why int8 activations cannot run an ``[n, k]`` weight of ``bits`` (8: per channel, in
    the pair layout; 4: groups of ``group`` in the int4 strip layout) here (None: they
    can)."""
    if cpp_build.amx_tiles():
        return ("this CPU's weight-only kernels run on AMX tiles, which this int8-activation "
                "path does not use")
    if bits == 4:
        if group is None or group % ACTIVATION_BLOCK:
            return f"int4 groups of {group}: int8 activations take multiples of 32"
        reason = amx_int4_unavailable(n, k, group)
    else:
        reason = amx_unavailable(n, k)  # K % 32 == 0: whole blocks of 32
    return reason or _library()[1]


def int4_weight_int8(x: torch.Tensor, amx_codes: torch.Tensor, amx_scales: torch.Tensor,
                     group: int) -> torch.Tensor | None:
    """``x @ w^T`` (bf16) for the int4 weight of ``cpp_impl.int4_weight_amx``, ``x`` as int8
    codes per token and block of 32: each block's exact integer sum of ``(q - 8) * xq`` times
    its activation scale, summed per weight group, times the group's scale (plus ``z *
    sum(x)``). None where it cannot run."""
    n, k = amx_codes.shape[0] * 16, x.shape[1]
    out = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
    args = _int4_arguments(x, amx_codes, amx_scales, group, out)
    if args is None or unavailable(4, n, k, group):
        return None
    return None if _library()[0].q_wo_int4_int8(*args) else out


def int8_weight_int8(x: torch.Tensor, pairs: torch.Tensor, scale: torch.Tensor
                     ) -> torch.Tensor | None:
    """``(x @ codes^T) * scale`` (bf16) for int8 per-channel weights in ``cpp_impl``'s pair
    layout (``to_amx_layout``) with fp32 ``scale [N]``, ``x`` as int8 codes per token and
    block of 32: each block's exact integer sum times its activation scale, summed, times
    the channel's scale. None where it cannot run."""
    m, k = x.shape
    n = pairs.shape[0] * 16
    if (m == 0 or not cpp_build.plain(x, torch.bfloat16)
            or not cpp_build.plain(pairs, torch.int8, (n // 16, k // 2, 16, 2))
            or not cpp_build.plain(scale, torch.float32, numel=n) or unavailable(8, n, k)):
        return None
    out = torch.empty(m, n, dtype=torch.bfloat16)
    failed = _library()[0].q_wo_int8_int8(x.data_ptr(), pairs.data_ptr(), scale.data_ptr(),
                                          out.data_ptr(), m, n, k, torch.get_num_threads())
    return None if failed else out


def int8_block_codes(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The activation codes ``[M, K]`` int8 and scales ``[M, K / block]`` fp32 the kernels
    compute (they take blocks of 32), or None where the library is not built: for tests to
    hold them to act_quant's reference bit for bit."""
    lib = _library()[0]
    m, k = x.shape
    if lib is None or not cpp_build.plain(x, torch.bfloat16):
        return None
    codes = torch.empty(m, k, dtype=torch.int8)
    scales = torch.empty(m, k // block, dtype=torch.float32)
    failed = lib.q_int8_block_codes(x.data_ptr(), codes.data_ptr(), scales.data_ptr(), m, k,
                                    block, torch.get_num_threads())
    return None if failed else (codes, scales)

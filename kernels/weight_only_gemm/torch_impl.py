"""Weight-only GEMM on torch's built-in CPU kernels, with bf16 activations.

Prepared once from the codes and scales :func:`reference.weight_only_gemm` takes (int4
codes unpacked, one int8 per value), into the layout each kernel wants, and nothing else:
the weight stays 1 byte (int8) or half a byte (int4) per value in memory.

- int8, per-channel scales, bf16, on CPUs with AMX-BF16 (N % 16 == K % 32 == 0): ``amx``
  (``amx_gemm.cpp``), the only kernel there, every M, the codes kept only in the tiles'
  layout; 2-4.5x ``_weight_int8pack_mm`` at 8-32 tokens with the weights streaming from
  memory (``tests/bench/bench_decode_gemms_cpu.py``). Elsewhere, at M = 1, ``gemv``
  (``int8_gemv.cpp``: 1.2-1.3x ``_weight_int8pack_mm``), then as follows.
- int8, per-channel scales: ``aten._weight_int8pack_mm(x, w [N, K] int8, scales [N])``.
  Its inner loop is a GEMV: from M ~ 32 on, dequantizing the weight to bf16 for the call
  and running bf16 GEMM (``dequantize``) is faster. ``kernels/configs/cpu.json`` holds the
  crossover, measured by ``tests/bench/tune_kernels_cpu.py``. Zero points and int8 groups
  always take ``dequantize``, and so does a K that is not a multiple of 16 (the packed
  kernel silently computes garbage there, see ``INT8PACK_K_MULTIPLE``): folding a zero
  point in as ``- rowsum(x) * zp * s`` after the packed kernel would subtract two rounded
  bf16 numbers.
- int4, groups of 32/64/128/256 dividing K (per channel: the channel's scale repeated over
  groups of the largest such size), N a multiple of 16. On CPUs with AMX-BF16 (bf16): ``amx``
  (``amx_int4.cpp``), the only kernel there, every M, the codes and group scales kept only in
  its layout (half a byte per weight, as torch's). Elsewhere
  ``_convert_weight_to_int4pack_for_cpu`` + ``_weight_int4pack_mm_for_cpu``. Its
  ``scales_and_zeros [K/g, N, 2]`` puts the zero in the float domain, ``w = (q - 8) * s +
  z``: q's codes c (-8..7) give ``q = c + 8``, and a zero point zp gives ``z = -zp * s`` (the
  AMX kernel takes the same s and z). Above the crossover the weight is unpacked from that
  same packed tensor and multiplied by bf16 GEMM; the unpacking is one pass of a small C++
  kernel (:mod:`.cpp_impl`) where it builds, else torch ops (:func:`unpack_int4pack`).

Anything else (ragged int4 groups) has no torch kernel: :func:`unsupported` says why and the
caller keeps the reference.

``int8_activations=True`` (the engine's ``woq_activations="int8"``, IPEX's "lowp mode
INT8"): steps of ``INT8_ACTIVATIONS_FROM[bits]`` tokens or more quantize their activations
to int8 and multiply in int8 (VNNI: twice bf16's products per instruction), the prefill
that is compute-bound in bf16. On CPUs without AMX tiles int8 per-channel weights and int4
groups both run :mod:`.int8_activations` (one activation scale per token and 32 values,
exact integer sums per block, the weight read in this layout); on CPUs with tiles int8
per-channel weights run as int8 W8A8 (``scaled_gemm``'s tile kernel reading this layout, one
activation scale per token) and int4 refuses. Fewer tokens keep the exact register path,
which is bound by memory. Numbers then carry int8 activation rounding (half a step of the
block's max|x| / 127 per value); docs/engine.md has the measured accuracy.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import cpp_build
from ..act_quant import quantize_activation_cpu
from ..configs import cpu_choice
from ..scaled_gemm.cpp_impl import amx_unavailable as int8_amx_unavailable
from ..scaled_gemm.cpp_impl import int8_amx_pairs, weight_row_sums
from . import int8_activations as int8_acts
from .cpp_impl import (amx_int4_unavailable, amx_unavailable, bind_int4_weight_amx,
                       bind_int8_weight_amx, dequantize_int4pack,
                       dequantize_int8, from_amx_int4_layout, gemv_unavailable,
                       int4_weight_amx, int8_weight_amx, int8_weight_gemv, to_amx_int4_layout,
                       to_amx_int4_scales, to_amx_layout)

INT4_GROUPS = (32, 64, 128, 256)
# _weight_int8pack_mm (torch 2.13, AVX-512) reads K in vectors of 16 without checking: any
# other K gives wrong sums or a segfault (K=72, 136 measured), so such weights never use it
INT8PACK_K_MULTIPLE = 16
KERNELS = {8: ("int8pack", "dequantize"), 4: ("int4pack", "dequantize")}
# tokens per call from which int8_activations applies, per bits; fewer take the exact
# register path. From 17 both exact paths leave their register paths for widened bf16
# strips; over a 1.1B step's weights on the AMD EPYC (tests/bench/bench_decode_gemms_cpu.py
# --tokens 9,12,16,17,24,32,256, activations in blocks of 32) the int8 path ran 0.96-1.07x
# the exact one at 9-16 tokens and 1.09x (wint8) / 1.50x (wint4 g64) at 17
INT8_ACTIVATIONS_FROM = {8: 17, 4: 17}


def _int4_group(k: int, group_size: int) -> int | None:
    if group_size >= k:  # per channel
        return next((g for g in reversed(INT4_GROUPS) if k % g == 0), None)
    return group_size if group_size in INT4_GROUPS and k % group_size == 0 else None


def unsupported(bits: int, n: int, k: int, group_size: int) -> str | None:
    """None if a torch kernel runs this weight, else why not."""
    if bits == 8:
        return None
    if bits != 4:
        return f"{bits}-bit weights"
    if _int4_group(k, group_size) is None:
        return (f"int4 groups of {group_size} over K={k}: torch's int4 kernel takes groups "
                "of 32, 64, 128 or 256 that divide K")
    if n % 16:
        return f"N={n} is not a multiple of 16 (torch's int4 packing)"
    return None


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` unsigned codes 0..15 (int32) -> torch's CPU int4 layout."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)


@functools.cache
def int4pack_block_n() -> int | None:
    """Rows per block of torch's CPU int4 layout, found by packing a probe; None if the layout
    is not the one :func:`unpack_int4pack` reads (then int4 stays on the packed kernel).

    torch (2.13, AVX-512) stores ``[N, K]`` as ``[N / B, K, B / 2]`` bytes, B = 64: byte
    ``(b, k, j)`` holds row ``b*B + j`` in its low nibble and row ``b*B + B/2 + j`` in its high
    nibble. The layout is private to torch and B follows the CPU's vector width, so it is
    checked here rather than assumed."""
    n, k = 128, 64
    probe = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0))
    packed = _pack_int4(probe)
    for block in (64, 32, 16):
        try:
            if torch.equal(_unpack(packed, n, k, block), probe.to(torch.uint8)):
                return block
        except RuntimeError:
            continue
    return None


def _unpack(packed: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    b = packed.reshape(n // block, k, block // 2)
    return torch.cat([b & 0xF, b >> 4], dim=2).permute(0, 2, 1).reshape(n, k)


def unpack_int4pack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Unsigned codes ``[N, K]`` (uint8, 0..15) back out of torch's CPU int4 layout."""
    block = int4pack_block_n()
    if block is None or n % block:
        raise ValueError(f"torch's int4 layout cannot be unpacked here (N={n}, block {block})")
    return _unpack(packed, n, k, block)


def _int8_activations_unavailable(bits: int, per_channel: bool, dtype: torch.dtype, n: int,
                                  k: int, group: int | None) -> str | None:
    """Why int8 activations cannot run this weight here (None: they can), with bf16
    compute: int4 groups and int8 per channel on :mod:`.int8_activations`; int8 on CPUs with
    AMX tiles on the W8A8 tile kernel instead (one activation scale per token)."""
    if dtype != torch.bfloat16:
        return f"the compute dtype is {str(dtype).removeprefix('torch.')}, not bfloat16"
    if bits == 4:
        return int8_acts.unavailable(4, n, k, group)
    if not per_channel:
        return "the int8 kernel takes per-channel scales without zero points"
    if cpp_build.amx_tiles():
        return amx_unavailable(n, k) or int8_amx_unavailable(n, k)
    return int8_acts.unavailable(8, n, k)


class WeightOnlyTorch:
    """``y = x @ ((w - zero) * scale)^T`` for ``x [M, K]`` in ``dtype`` (bf16)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, group_size: int, bits: int,
                 zero: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16,
                 amx: bool = True, int8_activations: bool = False):
        """``amx=False`` keeps torch's kernels where the AMX ones would run (benches and
        tests compare the two). ``int8_activations``: see the module docstring; a weight
        it cannot apply to raises ValueError saying why."""
        n, k = codes.shape
        reason = unsupported(bits, n, k, group_size)
        if reason:
            raise ValueError(reason)
        self.bits, self.dtype, self.shape = bits, dtype, (n, k)
        # set only where the check below passed: then the AMX-layout kernel runs every M
        self.int8_activations = int8_activations
        self.row_sums = None  # int8 weights with int8 activations: their row sums (W8A8)
        if bits == 8:
            self.codes = codes.contiguous()
            self.group_size = min(group_size, k)
            self.scale = scale.to(dtype)  # [N, groups]
            self.zero = None if zero is None else zero.to(dtype)
            per_channel = self.group_size == k and zero is None
            if int8_activations:
                reason = _int8_activations_unavailable(8, per_channel, dtype, n, k, None)
                if reason:
                    raise ValueError(f"int8 activations: {reason}")
            if amx and per_channel and dtype == torch.bfloat16 and amx_unavailable(n, k) is None:
                # AMX tiles: one kernel for every M, and the only copy of the weight
                self.kernels = ("amx",)
                self.amx_codes = to_amx_layout(codes)
                self.codes = None
                self.scale_fp32 = scale.float().reshape(n).contiguous()
                if int8_activations and cpp_build.amx_tiles():  # the W8A8 tile kernel's
                    self.row_sums = weight_row_sums(codes)
                return
            packable = per_channel and k % INT8PACK_K_MULTIPLE == 0
            self.kernels = KERNELS[8] if packable else ("dequantize",)
            if per_channel and gemv_unavailable() is None:
                self.kernels = ("gemv", *self.kernels)
                self.scale_fp32 = scale.float().reshape(n).contiguous()
            return
        self.group = _int4_group(k, group_size)
        groups = k // self.group
        s = scale.float().expand(n, groups) if scale.shape[1] == 1 else scale.float()
        z = torch.zeros_like(s) if zero is None else \
            -(zero.float().expand(n, groups) if zero.shape[1] == 1 else zero.float()) * s
        if int8_activations:
            reason = _int8_activations_unavailable(4, True, dtype, n, k, self.group)
            if reason:
                raise ValueError(f"int8 activations: {reason}")
        if amx and dtype == torch.bfloat16 and amx_int4_unavailable(n, k, self.group) is None:
            # AMX tiles: one kernel for every M, the weight kept in its layout only
            self.kernels = ("amx",)
            self.amx_codes = to_amx_int4_layout(codes)
            has_zero = zero is not None and bool(z.to(dtype).ne(0).any())
            self.amx_scales = to_amx_int4_scales(s, z if has_zero else None)
            self.packed = self.scales_and_zeros = None
            return
        self.packed = _pack_int4(codes.to(torch.int32) + 8)
        self.scales_and_zeros = torch.stack([s.t(), z.t()], dim=-1).to(dtype).contiguous()
        block = int4pack_block_n()
        self.kernels = KERNELS[4] if block and n % block == 0 else ("int4pack",)

    @property
    def has_zero(self) -> bool:
        """int4 in the AMX layout: whether its scales carry nonzero zeros beside them."""
        return self.amx_scales.shape[2] == 2

    def plain_codes(self) -> torch.Tensor:
        """int8 codes ``[N, K]`` (a copy where the weight is kept in the AMX layout)."""
        if self.codes is not None:
            return self.codes
        n, k = self.shape
        return self.amx_codes.permute(0, 2, 1, 3).reshape(n, k)

    def dequantized(self) -> torch.Tensor:
        """The weight in ``dtype``. int8: exact codes (and codes - zero points, |.| <= 255,
        which bf16's 8 significant bits hold), then one rounding by the scale. int4: ``(q - 8)
        * s + z`` with the packed kernel's bf16 scales and zeros."""
        n, k = self.shape
        w = None
        if self.bits == 4 and self.packed is None:
            return self.dequantized_torch()  # kept in the AMX layout: never dequantized to run
        if self.bits == 4 and self.dtype == torch.bfloat16:
            w = dequantize_int4pack(self.packed, self.scales_and_zeros, n, k, self.group,
                                    int4pack_block_n())
        elif self.bits == 8 and self.dtype == torch.bfloat16:
            w = dequantize_int8(self.plain_codes(), self.scale, self.zero, self.group_size)
        # the C++ kernels: the same bits in one pass; else (None) the torch ops
        return self.dequantized_torch() if w is None else w

    def dequantized_torch(self) -> torch.Tensor:
        """:meth:`dequantized` in torch ops (the C++ kernel's oracle, and its fallback)."""
        n, k = self.shape
        if self.bits == 4 and self.packed is None:  # the AMX layout [N/16, groups, 2, 16]
            q = from_amx_int4_layout(self.amx_codes)
            parts = self.amx_scales.shape[2]  # scales, then zeros where there are any
            sz = self.amx_scales.permute(2, 0, 3, 1).reshape(parts, n, k // self.group)
            return self._int4(q, sz[0], sz[1] if parts == 2 else torch.zeros_like(sz[0]))
        if self.bits == 4:
            sz = self.scales_and_zeros  # [K/g, N, 2]
            return self._int4(unpack_int4pack(self.packed, n, k), sz[..., 0].t(), sz[..., 1].t())
        w = self.plain_codes().to(self.dtype)

        def per_column(t):
            return t if t.shape[1] == 1 else t.repeat_interleave(self.group_size, 1)[:, :k]

        if self.zero is not None:
            w.sub_(per_column(self.zero))
        return w.mul_(per_column(self.scale))

    def _int4(self, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``(q - 8) * s + z`` in ``dtype`` with its roundings, ``s``/``z [N, groups]``."""
        n, k = self.shape
        w = q.to(self.dtype).sub_(8).view(n, k // self.group, self.group)
        w.mul_(s.unsqueeze(-1)).add_(z.unsqueeze(-1))
        return w.view(n, k)

    def run(self, x: torch.Tensor, kernel: str) -> torch.Tensor:
        """One named kernel (the tuner times each; :meth:`__call__` picks)."""
        x = x.to(self.dtype)
        if kernel not in self.kernels:
            raise ValueError(f"kernel {kernel!r} cannot run this weight; it takes "
                             f"{', '.join(self.kernels)}")
        if kernel == "int4pack":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group,
                                                              self.scales_and_zeros)
        if (kernel == "amx" and self.int8_activations
                and x.shape[0] >= INT8_ACTIVATIONS_FROM[self.bits]):
            if self.bits == 4:
                y = int8_acts.int4_weight_int8(x.contiguous(), self.amx_codes,
                                               self.amx_scales, self.group)
            elif self.row_sums is None:
                y = int8_acts.int8_weight_int8(x.contiguous(), self.amx_codes,
                                               self.scale_fp32)
            else:
                xq, xs = quantize_activation_cpu(x.contiguous(), None, torch.int8)
                y = int8_amx_pairs(xq, xs, self.amx_codes, self.scale_fp32, self.row_sums,
                                   self.dtype)
            if y is not None:
                return y  # else (checked at load, so not expected) the exact path below
        if kernel == "amx" and self.bits == 4:  # inputs the kernel refuses were refused at load
            return int4_weight_amx(x.contiguous(), self.amx_codes, self.amx_scales, self.group)
        if kernel == "amx":
            return int8_weight_amx(x.contiguous(), self.amx_codes, self.scale_fp32)
        if kernel == "gemv":
            y = int8_weight_gemv(x.contiguous(), self.codes, self.scale_fp32)
            if y is not None:
                return y
            kernel = "dequantize"  # an input the GEMV does not take
        if kernel == "int8pack":
            return torch.ops.aten._weight_int8pack_mm(x, self.codes, self.scale[:, 0])
        return F.linear(x, self.dequantized())

    def choose(self, m: int) -> str:
        if len(self.kernels) == 1:
            return self.kernels[0]
        kernel = cpu_choice(f"weight_only_int{self.bits}", m)
        if kernel in self.kernels:
            return kernel
        # a decode-size kernel this weight cannot take (int8pack for a K it misreads, the
        # GEMV without a compiler): the other decode-size kernel, else dequantize
        small = "gemv" if kernel == "int8pack" else "int8pack"
        return small if small in self.kernels else "dequantize"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, self.choose(x.shape[0]))

    def bind(self, x: torch.Tensor, out: torch.Tensor, scratch=None):
        """``out = self(x)`` for fixed bf16 buffers ``x [M, K]`` and ``out [M, N]`` as a call
        without arguments (the AMX-layout kernels: the one choice for every M), or None;
        ``scratch`` is unused (these kernels take bf16 as it comes)."""
        if self.kernels != ("amx",):
            return None
        if self.int8_activations and x.shape[0] >= INT8_ACTIVATIONS_FROM[self.bits]:
            return None  # quantizes its activations per call (run)
        if self.bits == 4:
            return bind_int4_weight_amx(x, self.amx_codes, self.amx_scales, self.group, out)
        return bind_int8_weight_amx(x, self.amx_codes, self.scale_fp32, out)

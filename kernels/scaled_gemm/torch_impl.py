"""W8A8 GEMMs on torch's built-in CPU kernels.

- int8 (:class:`Int8Scaled`): activations quantized per token (the C++ kernel of
  ``act_quant.cpp_impl``, the reference's exact codes), then

  - ``amx`` on CPUs with AMX-INT8 (N % 16 == K % 64 == 0), the only kernel there:
    ``amx_int8.cpp``, the weight kept in the tiles' own layout (its only copy), every M.
    ``_int_mm`` reorders its weight on every call, which kept it at bf16's speed with the
    weights streaming from memory; this is 1.4-1.9x faster at 1-32 tokens
    (``tests/bench/bench_decode_gemms_cpu.py``), with the same bits. On CPUs with AVX-512
    VNNI but no tiles the same kernel and layout run on vector registers, every M too: on
    a 2-core AMD EPYC 1.7-3.8x ``_int_mm`` at 1-32 tokens over a 1.1B step's weights, and
    0.89-0.98x at 128-2048 tokens on SmolLM2's shapes.
  - elsewhere one of three kernels, by M (``kernels/configs/cpu.json``, measured by
    ``tests/bench/tune_kernels_cpu.py``): ``gemv``, ``int_mm``, ``int8pack`` below.
  - ``gemv`` (a few tokens): ``int8_gemm.cpp``, the int8 weight streamed once with exact
    int32 sums (``vpdpbusd``) and the scaling in the same pass. Same bits as ``int_mm``.
  - ``int_mm``: ``torch._int_mm(xq, w^T)`` in int32 (AVX-512 VNNI), scaled by ``xs * ws``
    in fp32. The integer sum is exact, so this is the reference's result up to fp32
    rounding of the two scalings; ``_int_mm`` takes the transposed weight as a view. The
    scaling and cast run as one C++ pass (``int8_gemm.cpp``, the torch ops' bits; those
    ops remain the fallback): at decode sizes such op chains cost more than the GEMM.
  - ``int8pack``: the int8 activation codes go in as bf16 (exact: |code| <= 127) to
    ``_weight_int8pack_mm`` with the weight scales in bf16, and the result is scaled by
    ``xs``. Sums accumulate in fp32 inside the kernel; the bf16 weight scales and the bf16
    product before ``xs`` add two roundings of 2^-9 relative each to the reference's
    result. K must be a multiple of 16 (see ``weight_only_gemm.torch_impl
    .INT8PACK_K_MULTIPLE``). It won M = 2-4 before the GEMV existed; no M picks it now.
- fp8 (:class:`Fp8Dequantized`, per channel, per tensor or in 128x128 blocks): CPUs have no
  fp8 GEMM worth using (``_scaled_mm`` on fp8 ran 7-48x slower than bf16 GEMM on this
  project's CPU, M = 1-256, in the CPU engine issue's measurement), so the weight is dequantized once, when the model loads, into the compute
  dtype: 2 bytes per weight, twice the fp8 checkpoint. Activations are quantized to fp8 and
  back exactly as the reference does, then multiplied by bf16 GEMM: the same math as the
  reference with operands rounded to bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..act_quant import quantize_activation_cpu
from ..act_quant.reference import quantize_activation
from ..configs import cpu_choice
from ..numerics import codes_to_float, mul_blocks_
from ..weight_only_gemm.torch_impl import INT8PACK_K_MULTIPLE
from .cpp_impl import (amx_unavailable, bind_int8_amx, int8_amx, int8_epilogue, int8_gemv,
                       to_amx_int8_layout, weight_row_sums)
from .cpp_impl import unavailable_reason as int8_gemv_unavailable


class Int8Scaled:
    """int8 W8A8: ``wq [N, K]`` int8 codes, ``ws [N, 1]`` or ``[1, 1]`` scales."""

    def __init__(self, wq: torch.Tensor, ws: torch.Tensor, out_dtype: torch.dtype):
        self.ws = ws.float().reshape(1, -1).expand(1, wq.shape[0]).contiguous()
        self.out_dtype = out_dtype
        if amx_unavailable(*wq.shape) is None:
            # the strip layout (AMX tiles or AVX-512): one kernel for every M, and the only
            # copy of the weight
            self.kernels = ("amx",)
            self.amx_w, self.rowsum = to_amx_int8_layout(wq), weight_row_sums(wq)
            self.wq = None
            return
        self.kernels = ("int8pack", "int_mm") if wq.shape[1] % INT8PACK_K_MULTIPLE == 0 \
            else ("int_mm",)
        if int8_gemv_unavailable() is None:
            self.kernels = ("gemv", *self.kernels)
        self.wq = wq.contiguous()
        self.ws_bf16 = self.ws[0].bfloat16()
        self.rowsum = weight_row_sums(self.wq) if "gemv" in self.kernels else None

    def run(self, x: torch.Tensor, kernel: str, quantized=None) -> torch.Tensor:
        """One named kernel (the tuner times each; :meth:`__call__` picks). ``quantized``:
        ``x``'s per-token int8 codes and scales, when the caller has them already."""
        xq, xs = quantized or quantize_activation_cpu(x, None, torch.int8)
        if kernel not in self.kernels:
            raise ValueError(f"kernel {kernel!r} cannot run this weight; it takes "
                             f"{', '.join(self.kernels)}")
        if kernel == "amx":  # every weight the kernel refuses was refused at load
            return int8_amx(xq.contiguous(), xs.float().contiguous(), self.amx_w, self.ws,
                            self.rowsum, self.out_dtype)
        if kernel == "gemv":
            y = int8_gemv(xq, xs, self.wq, self.ws, self.out_dtype, self.rowsum)
            if y is not None:
                return y
            kernel = "int_mm"  # an input the GEMV does not take: same bits from _int_mm
        if kernel == "int8pack":
            y = torch.ops.aten._weight_int8pack_mm(xq.to(torch.bfloat16), self.wq, self.ws_bf16)
            return y.mul_(xs.to(torch.bfloat16)).to(self.out_dtype)
        acc = torch._int_mm(xq, self.wq.t())
        y = int8_epilogue(acc, xs, self.ws, self.out_dtype)  # one C++ pass, same bits
        return y if y is not None else acc.float().mul_(xs).mul_(self.ws).to(self.out_dtype)

    def bind(self, x: torch.Tensor, out: torch.Tensor, scratch=None):
        """``out = self(x)`` for fixed buffers ``x [M, K]`` and ``out [M, N]`` as a call
        without arguments: the per-token quantization into buffers of its own (or from
        ``scratch(shape, dtype)``, memory the caller shares between calls that run one
        after another), then the strip kernel (its only kernel where it runs); None
        elsewhere."""
        from q.kernels.act_quant.cpp_impl import bind_quantize_int8_per_token
        from q.kernels.bound_calls import BoundCalls

        if self.kernels != ("amx",) or out.dtype != self.out_dtype:
            return None
        new = scratch or (lambda shape, dtype: torch.empty(shape, dtype=dtype))  # noqa: E731
        xq, xs = new(tuple(x.shape), torch.int8), new((x.shape[0], 1), torch.float32)
        quantize = bind_quantize_int8_per_token(x, xq, xs)
        gemm = bind_int8_amx(xq, xs, self.amx_w, self.ws, self.rowsum, out)
        if quantize is None or gemm is None:
            return None
        # the bound pointers' tensors live as long as the call
        return BoundCalls((quantize, gemm), keep=(xq, xs))

    def __call__(self, x: torch.Tensor, quantized=None) -> torch.Tensor:
        if self.kernels == ("amx",):  # exact int32 sums, like _int_mm
            return self.run(x, "amx", quantized)
        if self.out_dtype == torch.float32 or self.kernels == ("int_mm",):
            return self.run(x, "int_mm", quantized)  # fp32 asks for accuracy: exact sums
        kernel = cpu_choice("scaled_int8", x.shape[0])
        if kernel not in self.kernels:  # the GEMV without a compiler, int8pack for odd K
            kernel = "int_mm"
        return self.run(x, kernel, quantized)


class Fp8Dequantized:
    """fp8 W8A8 with the weight dequantized at load: ``block`` is the weight's scale block
    (``(1, K)`` per channel, ``(N, K)`` per tensor, ``(128, 128)``), ``act_group`` the
    activation group (None: per token)."""

    def __init__(self, wq: torch.Tensor, ws: torch.Tensor, block: tuple[int, int],
                 act_group: int | None, act_dtype: torch.dtype, out_dtype: torch.dtype,
                 prepack: bool = False):
        self.weight = mul_blocks_(codes_to_float(wq), ws, block).to(out_dtype)
        self.act_group, self.act_dtype, self.out_dtype = act_group, act_dtype, out_dtype
        self.packed = None
        if prepack and out_dtype == torch.bfloat16:  # a weight kept for many calls
            from ..dense_gemm.torch_impl import PackedLinear, unavailable_reason

            if unavailable_reason() is None:
                self.packed, self.weight = PackedLinear(self.weight), None

    def __call__(self, x: torch.Tensor, quantized=None) -> torch.Tensor:
        xq, xs = quantized or quantize_activation(x, self.act_group, self.act_dtype)
        group = self.act_group or x.shape[1]
        a = mul_blocks_(codes_to_float(xq), xs, (1, group)).to(self.out_dtype)
        return self.packed(a) if self.packed is not None else F.linear(a, self.weight)

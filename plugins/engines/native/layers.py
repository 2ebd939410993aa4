"""QuantLinear: a Linear whose weight stays quantized and whose forward calls a q.kernels op.

Which op runs is decided once per layer from the QuantizedTensor and the recipe's
activation spec, and logged once per kind of layer with the reason:

===================================  ========================================================
weights / activations                op
===================================  ========================================================
fp8 blocks / dynamic 1xbk fp8        quantize_activation(group=bk) + fp8_block_gemm
fp8 channel|tensor / token fp8       quantize_activation(per token) + scaled_gemm
int8 channel / token int8            quantize_activation(per token, int8) + scaled_gemm
int4|int8 (any) / none               weight_only_gemm (dequantizes inside the kernel)
fp8 (any) on a GPU without fp8 MMA   weight_only_gemm with fp8 codes (weights stay fp8)
===================================  ========================================================

On CPU every op is its torch reference, computed in fp32. Weights are never expanded to a
float copy that outlives a forward call.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from q.errors import CheckpointError
from q.kernels import Impl
from q.kernels.act_quant import quantize_activation
from q.kernels.block_gemm import fp8_block_gemm
from q.kernels.dispatch import triton_unavailable_reason
from q.kernels.packing.reference import pack_int4_bytes
from q.kernels.scaled_gemm import scaled_gemm
from q.kernels.weight_only_gemm import weight_only_gemm
from q.tensor import QuantizedTensor

log = logging.getLogger("q.engine")

FP8_CODES = (torch.float8_e4m3fn, torch.float8_e5m2)
_logged_kinds: set[str] = set()


def _fp8_act_dtype(acts: dict) -> torch.dtype:
    return torch.float8_e5m2 if acts.get("fp8_dtype") == "e5m2" else torch.float8_e4m3fn


def choose_kind(qt: QuantizedTensor, acts: dict | None, device: torch.device, impl: str) -> str:
    """The op family for this layer: ``block``, ``scaled``, or ``weight-only``."""
    fp8 = qt.qdata.dtype in FP8_CODES
    if acts is None or not acts.get("dynamic", True):
        return "weight-only"
    if fp8 and device.type == "cuda" and Impl(impl) is not Impl.reference \
            and triton_unavailable_reason(device, fp8=True):
        return "weight-only"  # no fp8 MMA on this GPU: dequantize fp8 weights in-kernel
    if qt.granularity == "block" and fp8:
        return "block"
    if qt.granularity in ("channel", "tensor") and qt.zero_point is None:
        return "scaled"
    return "weight-only"


def describe_path(kind: str, qt: QuantizedTensor, acts: dict | None, device, impl) -> str:
    fp8 = qt.qdata.dtype in FP8_CODES
    label = {
        "block": f"fp8 {qt.block_size[0]}x{qt.block_size[1]} blocks, dynamic per-token-group "
                 f"fp8 activations -> fp8_block_gemm",
        "scaled": f"{qt.qdtype} per-{qt.granularity} weights, dynamic per-token "
                  f"{'fp8' if fp8 else 'int8'} activations -> scaled_gemm",
        "weight-only": f"{qt.qdtype} per-{qt.granularity} weights, weight-only -> "
                       "weight_only_gemm",
    }[kind]
    reason = triton_unavailable_reason(device, fp8=(kind != "weight-only" and fp8))
    if Impl(impl) is Impl.reference:
        path = "torch reference (asked for)"
    elif reason is None:
        path = "Triton kernel"
    else:
        path = f"torch reference in fp32 ({reason})"
    if kind == "weight-only" and fp8 and acts is not None:
        path += "; fp8 weights dequantized in the kernel because this GPU has no fp8 MMA"
    return f"{label}: {path}"


class QuantLinear(nn.Module):
    """y = x W^T + b with W held as codes and scales (see the module docstring)."""

    def __init__(self, qt: QuantizedTensor, acts: dict | None, bias: torch.Tensor | None,
                 device: torch.device, impl: str = "auto", name: str = ""):
        super().__init__()
        self.out_features, self.in_features = qt.shape
        self.impl = impl
        self.name = name
        self.kind = choose_kind(qt, acts, device, impl)
        self.bits = qt.bits
        self.act_group: int | None = None
        self.act_dtype = torch.int8
        self.group_size = self.in_features
        self.block = tuple(qt.block_size)
        scale = qt.scale.float()
        zero = None
        if self.kind == "block":
            self.act_group = qt.block_size[1]
            self.act_dtype = _fp8_act_dtype(acts)
            codes = qt.qdata
        elif self.kind == "scaled":
            if qt.qdata.dtype in FP8_CODES:
                self.act_dtype = _fp8_act_dtype(acts)
            elif acts.get("type") != "int":
                raise CheckpointError(f"{name}: int8 weights with {acts.get('type')} "
                                      "activations are not a W8A8 layout q can run")
            codes = qt.qdata
            scale = scale.reshape(-1, 1)
        else:
            codes, scale, zero = self._weight_only_layout(qt, scale)
        self.register_buffer("qdata", codes.to(device), persistent=False)
        self.register_buffer("scale", scale.contiguous().to(device), persistent=False)
        self.register_buffer("zero_point", None if zero is None else zero.to(device),
                             persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(device), requires_grad=False)
        path = describe_path(self.kind, qt, acts, device, impl)
        if path not in _logged_kinds:
            _logged_kinds.add(path)
            log.info("%s (first: %s)", path, name)
        self.path = path

    def _weight_only_layout(self, qt: QuantizedTensor, scale: torch.Tensor):
        """Codes, [N, groups] scales and zero points in the weight_only_gemm layout."""
        n, k = qt.shape
        if qt.granularity == "block":  # 128x128 tiles -> per-row groups of bk columns
            bn, bk = qt.block_size
            scale = scale.repeat_interleave(bn, dim=0)[:n]
            self.group_size = bk
        elif qt.granularity == "tensor":
            scale = scale.reshape(1, 1).expand(n, 1)
        elif qt.granularity == "group":
            self.group_size = qt.block_size[1]
        zero = qt.zero_point
        if zero is not None and qt.granularity == "channel":
            zero = zero.reshape(n, 1)
        codes = pack_int4_bytes(qt.qdata) if qt.bits == 4 else qt.qdata
        return codes, scale.contiguous(), zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        out_dtype = x.dtype
        if self.kind == "block":
            xq, xs = quantize_activation(x2, self.act_group, self.act_dtype, impl=self.impl)
            y = fp8_block_gemm(xq, xs, self.qdata, self.scale, self.block, out_dtype,
                               impl=self.impl)
        elif self.kind == "scaled":
            xq, xs = quantize_activation(x2, None, self.act_dtype, impl=self.impl)
            y = scaled_gemm(xq, xs, self.qdata, self.scale, out_dtype, impl=self.impl)
        else:
            y = weight_only_gemm(x2, self.qdata, self.scale, self.group_size, self.bits,
                                 self.zero_point, out_dtype, impl=self.impl)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"kind={self.kind}, bits={self.bits}")

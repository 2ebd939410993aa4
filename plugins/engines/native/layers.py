"""QuantLinear: a Linear whose weight stays quantized and whose forward calls a q.kernels op.

Which op family runs is decided once per layer from the QuantizedTensor and the recipe's
activation spec:

===================================  ========================================================
weights / activations                op
===================================  ========================================================
fp8 blocks / dynamic 1xbk fp8        quantize_activation(group=bk) + fp8_block_gemm
fp8 channel|tensor / token fp8       quantize_activation(per token) + scaled_gemm
int8 channel / token int8            quantize_activation(per token, int8) + scaled_gemm
int4|int8 (any) / none               weight_only_gemm (dequantizes inside the kernel)
fp8 (any) on a GPU without fp8 MMA   weight_only_gemm with fp8 codes (weights stay fp8)
===================================  ========================================================

and which implementation runs it (:func:`choose_backend`): Triton on a capable GPU, torch's
built-in CPU kernels on a CPU (``q.kernels.<op>.torch_impl``: packed int8/int4 GEMMs,
``_int_mm``, bf16 GEMM), else the pure-torch reference. The choice and its reason are
logged once per kind of layer. ``impl`` forces one; a forced implementation that cannot run
a layer is an error naming the layer.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from q.errors import CheckpointError, IncompatibleError
from q.kernels import Impl
from q.kernels.act_quant import quantize_activation, quantize_activation_cpu
from q.kernels.block_gemm import fp8_block_gemm
from q.kernels.cpp_build import strip_kernel_name
from q.kernels.dispatch import interpreting, triton_unavailable_reason
from q.kernels.packing.reference import pack_int4_bytes
from q.kernels.scaled_gemm import scaled_gemm
from q.kernels.scaled_gemm.torch_impl import Fp8Dequantized, Int8Scaled
from q.kernels.weight_only_gemm import weight_only_gemm
from q.kernels.weight_only_gemm.torch_impl import INT8_ACTIVATIONS_FROM, WeightOnlyTorch
from q.kernels.weight_only_gemm.torch_impl import unsupported as weight_only_unsupported
from q.tensor import QuantizedTensor

log = logging.getLogger("q.engine")

FP8_CODES = (torch.float8_e4m3fn, torch.float8_e5m2)
_logged_kinds: set[str] = set()  # paths logged by the load in progress


def start_path_log() -> None:
    """Each load logs each kind of layer's path once (the first layer of that kind)."""
    _logged_kinds.clear()


class SharedActivationQuant:
    """The q, k and v projections (and gate and up) get the very same input tensor: quantize
    it once per (group, dtype) instead of once per layer. Reuse needs the same tensor object
    passed to a sibling layer (same parent module, e.g. ``model.layers.3.self_attn``): the
    entry holds the input itself, so its memory cannot be reused by another tensor while
    cached, and outside inference mode the version counter also catches in-place writes
    (inference tensors have none; no transformers model writes a projection's input in
    place between sibling projections). One engine thread runs the model."""

    def __init__(self):
        self.entry = None

    def __call__(self, x: torch.Tensor, rows: torch.Tensor, group: int | None,
                 dtype: torch.dtype, parent: str):
        version = None if x.is_inference() else x._version
        key = (parent, version, group, dtype)
        e = self.entry
        if e is not None and e[0] is x and e[1] == key:
            return e[2]
        out = quantize_activation_cpu(rows, group, dtype)
        self.entry = (x, key, out)
        return out


shared_activation_quant = SharedActivationQuant()


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


def _torch_unsupported(kind: str, qt: QuantizedTensor, dtype: torch.dtype) -> str | None:
    """Why torch's CPU kernels cannot run this layer (None: they can)."""
    fp8 = qt.qdata.dtype in FP8_CODES
    if kind == "scaled" and not fp8:
        return None  # _int_mm: int8 x int8 -> int32, any activation dtype
    if dtype != torch.bfloat16:
        return (f"the compute dtype is {str(dtype).removeprefix('torch.')}: torch's packed "
                "CPU kernels are fast with bf16 activations only")
    if kind == "weight-only":
        if fp8:
            return "fp8 weight-only has no torch CPU kernel"
        n, k = qt.shape
        group = k if qt.granularity == "channel" else qt.block_size[1]
        return weight_only_unsupported(qt.bits, n, k, group)
    return None


def choose_backend(kind: str, qt: QuantizedTensor, device: torch.device, impl: str,
                   dtype: torch.dtype, name: str) -> tuple[str, str]:
    """(``triton`` | ``torch`` | ``reference``, why) for one layer."""
    impl = Impl(impl)
    fp8 = kind != "weight-only" and qt.qdata.dtype in FP8_CODES
    if impl is Impl.reference:
        return "reference", "asked for"
    if device.type == "cuda" or impl is Impl.triton or interpreting():
        reason = triton_unavailable_reason(device, fp8=fp8)
        if reason is None and (device.type == "cuda" or interpreting()):
            return "triton", "a device Triton runs on"
        if impl is Impl.triton:
            raise IncompatibleError(f"{name}: --impl triton cannot run this layer: {reason}; "
                                    "use --impl auto")
        if device.type == "cuda":
            return "reference", reason
    reason = _torch_unsupported(kind, qt, dtype)
    if reason is None:
        return "torch", f"torch's CPU kernels, {str(dtype).removeprefix('torch.')} activations"
    if impl is Impl.torch:
        raise IncompatibleError(f"{name}: --impl torch cannot run this layer: {reason}; use "
                                "--impl auto")
    return "reference", reason


OPS = {"block": "fp8_block_gemm", "scaled": "scaled_gemm", "weight-only": "weight_only_gemm"}


def describe_path(kind: str, qt: QuantizedTensor, backend: str, why: str,
                  op: str | None = None) -> str:
    """The log line of a layer's path; ``op`` names the op when it is not the dense one
    (MoE experts: ``fused_moe``, whose fp8 experts stay fp8 on CPU)."""
    fp8 = qt.qdata.dtype in FP8_CODES
    label = {
        "block": f"fp8 {qt.block_size[0]}x{qt.block_size[1]} blocks, dynamic per-token-group "
                 "fp8 activations",
        "scaled": f"{qt.qdtype} per-{qt.granularity} weights, dynamic per-token "
                  f"{'fp8' if fp8 else 'int8'} activations",
        "weight-only": f"{qt.qdtype} per-{qt.granularity} weights, weight-only",
    }[kind]
    path = {"triton": "Triton kernel", "torch": "torch built-in kernels",
            "reference": "torch reference in fp32"}[backend]
    if backend == "torch" and fp8:
        path += (" (fp8 weights dequantized to bf16 at load: 2 bytes per weight)" if op is None
                 else " (fp8 experts stay fp8, dequantized when a step routes to them)")
    return f"{label} -> {op or OPS[kind]}: {path} ({why})"


def reference_layout(qt: QuantizedTensor, kind: str):
    """(codes, scales, zero points, group size) as the reference / Triton ops take them:
    ``scaled``: scales ``[N, 1]``; ``weight-only``: int4 codes packed two per byte, scales
    and zero points ``[N, groups]`` over groups of ``group size`` columns (128x128 tiles
    become per-row groups of 128); ``block``: as stored."""
    n, k = qt.shape
    scale, zero, codes, group = qt.scale.float(), None, qt.qdata, k
    if kind == "scaled":
        scale = scale.reshape(-1, 1)
    elif kind == "weight-only":
        if qt.granularity == "block":
            bn, bk = qt.block_size
            scale, group = scale.repeat_interleave(bn, dim=0)[:n], bk
        elif qt.granularity == "tensor":
            scale = scale.reshape(1, 1).expand(n, 1)
        elif qt.granularity == "group":
            group = qt.block_size[1]
        zero = qt.zero_point
        if zero is not None and qt.granularity == "channel":
            zero = zero.reshape(n, 1)
        codes = pack_int4_bytes(qt.qdata) if qt.bits == 4 else qt.qdata
    return codes, scale.contiguous(), zero, group


class QuantLinear(nn.Module):
    """y = x W^T + b with W held as codes and scales (see the module docstring)."""

    def __init__(self, qt: QuantizedTensor, acts: dict | None, bias: torch.Tensor | None,
                 device: torch.device, impl: str = "auto", name: str = "",
                 dtype: torch.dtype = torch.float32, woq_activations: str = "bf16"):
        """``woq_activations="int8"``: a weight-only layer multiplies steps of 17+ tokens
        with int8 activations (one scale per token and 32 values; WeightOnlyTorch); a
        weight-only layer that cannot raises IncompatibleError naming it."""
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
        if self.kind == "block":
            self.act_group = qt.block_size[1]
            self.act_dtype = _fp8_act_dtype(acts)
        elif self.kind == "scaled":
            if qt.qdata.dtype in FP8_CODES:
                self.act_dtype = _fp8_act_dtype(acts)
            elif acts.get("type") != "int":
                raise CheckpointError(f"{name}: int8 weights with {acts.get('type')} "
                                      "activations are not a W8A8 layout q can run")
        self.backend, why = choose_backend(self.kind, qt, device, impl, dtype, name)
        self.impl = "auto" if self.backend == "torch" else self.backend
        int8_acts = woq_activations == "int8" and self.kind == "weight-only"
        if int8_acts and self.backend != "torch":
            raise IncompatibleError(f"{name}: woq_activations int8 runs on torch's CPU "
                                    f"kernels only; this layer runs the {self.backend} path "
                                    f"({why})")
        try:
            self.fast = self._build_torch(qt, dtype, int8_acts) \
                if self.backend == "torch" else None
        except ValueError as e:  # what int8 activations cannot run
            if not int8_acts:
                raise
            raise IncompatibleError(f"{name}: woq_activations int8 cannot run this layer: "
                                    f"{e}; leave it at bf16") from None
        if getattr(self.fast, "int8_activations", False):
            why += f"; int8 activations from {INT8_ACTIVATIONS_FROM[self.fast.bits]} tokens"
        if self.fast is None:
            self._keep_reference_layout(qt, device)
        kernels = getattr(self.fast, "kernels", None)
        if kernels:  # which of them (q's AMX / C++ kernels or torch's), for the log line
            names = [strip_kernel_name() if k == "amx" else k for k in kernels]
            why += f"; {'kernel' if len(kernels) == 1 else 'kernels by M'}: {', '.join(names)}"
        self.bias = None if bias is None else nn.Parameter(bias.to(device), requires_grad=False)
        path = describe_path(self.kind, qt, self.backend, why)
        if path not in _logged_kinds:
            _logged_kinds.add(path)
            log.info("%s (first: %s)", path, name)
        self.path = path

    def _build_torch(self, qt: QuantizedTensor, dtype: torch.dtype, int8_acts: bool = False):
        if self.kind == "scaled" and qt.qdata.dtype == torch.int8:
            return Int8Scaled(qt.qdata, qt.scale.reshape(-1, 1), dtype)
        if self.kind in ("scaled", "block"):
            block = qt.block_size if self.kind == "block" else \
                ((1, self.in_features) if qt.granularity == "channel" else qt.shape)
            return Fp8Dequantized(qt.qdata, qt.scale, tuple(block), self.act_group,
                                  self.act_dtype, dtype, prepack=True)
        group = self.in_features if qt.granularity == "channel" else qt.block_size[1]
        zero = qt.zero_point
        if zero is not None and qt.granularity == "channel":
            zero = zero.reshape(-1, 1)
        return WeightOnlyTorch(qt.qdata, qt.scale.reshape(qt.shape[0], -1), group, qt.bits,
                               zero, dtype, int8_activations=int8_acts)

    def _keep_reference_layout(self, qt: QuantizedTensor, device: torch.device) -> None:
        """Codes, scales and zero points as the reference / Triton ops take them."""
        codes, scale, zero, self.group_size = reference_layout(qt, self.kind)
        self.register_buffer("qdata", codes.to(device), persistent=False)
        self.register_buffer("scale", scale.to(device), persistent=False)
        self.register_buffer("zero_point", None if zero is None else zero.to(device),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        out_dtype = x.dtype
        if self.fast is not None and self.kind == "weight-only":
            y = self.fast(x2)
        elif self.fast is not None:
            y = self.fast(x2, shared_activation_quant(x, x2, self.act_group, self.act_dtype,
                                                      self.name.rpartition(".")[0]))
        elif self.kind == "block":
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

    def bind(self, x: torch.Tensor, out: torch.Tensor, scratch=None):
        """``out = self(x)`` for fixed 2-D buffers as a call without arguments, straight to
        the kernels (layers without bias on the strip-layout kernels: weight-only, and int8
        W8A8 with its per-token activation quantization into ``scratch(shape, dtype)``
        where given), or None."""
        if self.bias is not None or self.fast is None:
            return None
        if self.kind != "weight-only" and not (
                self.kind == "scaled" and self.act_group is None
                and self.act_dtype == torch.int8):
            return None
        bind = getattr(self.fast, "bind", None)
        return None if bind is None else bind(x, out, scratch)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"kind={self.kind}, bits={self.bits}, backend={self.backend}")

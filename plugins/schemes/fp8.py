"""fp8 schemes: 128x128 blocks (DeepSeek), per-channel (FP8_DYNAMIC), per-tensor.

Numerics live in ``q.kernels.fp8_block`` and ``q.kernels.fp8_rowwise``; this module only
binds options to them and describes the scheme.
"""

from __future__ import annotations

from typing import Literal

import pydantic

import q
from q.interfaces import Scheme
from q.kernels.fp8_block import quantize_fp8_block
from q.kernels.fp8_rowwise import quantize_fp8_per_channel, quantize_fp8_per_tensor
from q.kernels.numerics import FP8_DTYPES
from q.recipe import activation_spec, weight_spec
from q.tensor import QuantizedTensor


class Fp8Args(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    fp8_dtype: Literal["e4m3", "e5m2"] = "e4m3"


class Fp8BlockArgs(Fp8Args):
    block_size: tuple[pydantic.PositiveInt, pydantic.PositiveInt] = (128, 128)


class Fp8BlockScheme(Scheme):
    name = "fp8-block"
    description = "fp8 weights in 128x128 blocks, dynamic 1x128 activation groups (DeepSeek-V3)"
    Args = Fp8BlockArgs
    activations = "dynamic per-token-group (1x128) fp8"
    default_format = "hf-fp8"
    min_sqnr_db = 28.0

    def alignment(self, args):
        return tuple(args["block_size"])

    def storage(self, args):
        block = list(args["block_size"])
        return {"weights": weight_spec("float", 8, "block", block=block,
                                       fp8_dtype=args["fp8_dtype"]),
                "input_activations": activation_spec("float", "group", block[1])}

    def quantize_weight(self, name, w, args, scale_dtype):
        dtype = FP8_DTYPES[args["fp8_dtype"]]
        block = tuple(args["block_size"])
        qdata, scale = quantize_fp8_block(w, block, dtype, scale_dtype)
        return QuantizedTensor(qdata, scale, block, w.dtype)


class _Fp8RowScheme(Scheme):
    """fp8 weights with one scale per output channel or per tensor; dynamic per-token
    activations. Subclasses pick the strategy."""

    Args = Fp8Args
    activations = "dynamic per-token fp8"
    strategy: str

    def storage(self, args):
        return {"weights": weight_spec("float", 8, self.strategy, fp8_dtype=args["fp8_dtype"]),
                "input_activations": activation_spec("float", "token")}

    def quantize_weight(self, name, w, args, scale_dtype):
        dtype = FP8_DTYPES[args["fp8_dtype"]]
        if self.strategy == "channel":
            qdata, scale = quantize_fp8_per_channel(w, dtype, scale_dtype)
            return QuantizedTensor(qdata, scale, (1, w.shape[1]), w.dtype)
        qdata, scale = quantize_fp8_per_tensor(w, dtype, scale_dtype)
        return QuantizedTensor(qdata, scale, tuple(w.shape), w.dtype)


class Fp8DynamicScheme(_Fp8RowScheme):
    name = "fp8-dynamic"
    description = "per-output-channel fp8 weights, dynamic per-token fp8 activations"
    strategy = "channel"
    min_sqnr_db = 28.0


class Fp8TensorScheme(_Fp8RowScheme):
    name = "fp8-tensor"
    description = "one fp8 scale per weight tensor, dynamic per-token activations (vLLM online fp8)"
    strategy = "tensor"
    min_sqnr_db = 25.0


@q.hookimpl
def register_schemes(register):
    register(Fp8BlockScheme(), aliases=("fp8", "blocked-fp8", "block-wise-fp8"))
    register(Fp8DynamicScheme(), aliases=("fp8-channel", "fp8-per-channel"))
    register(Fp8TensorScheme(), aliases=("fp8-per-tensor",))

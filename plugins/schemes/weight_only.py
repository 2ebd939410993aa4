"""Weight-only integer schemes: wint8 and wint4 (W8A16 / W4A16).

Per output channel by default; ``group_size`` for group-wise scales. Activations stay in
the model dtype and weights are dequantized inside the GEMM at run time. Symmetric codes
use the full range by default (compressed-tensors / llm-compressor numerics, amax/7.5 for
int4); ``range=restricted`` reproduces Paddle ``weight_quantize`` (FastDeploy WINT8/WINT4,
amax/7 and ±7). See q.kernels.int_weight.
"""

from __future__ import annotations

from typing import Literal

import pydantic

import q
from q.interfaces import Scheme
from q.kernels.int_weight import quantize_int_weight, quantize_int_weight_asym
from q.recipe import weight_spec
from q.tensor import QuantizedTensor


class WeightOnlyArgs(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    group_size: pydantic.PositiveInt | None = None
    # False: min-max with a zero point per group (compressed-tensors W4A16_ASYM numerics)
    symmetric: bool = True
    # symmetric codes: "full" [-8, 7] with amax/7.5 (compressed-tensors, GPTQ) gives more
    # SQNR than "restricted" [-7, 7] with amax/7 (Paddle / FastDeploy)
    range: Literal["full", "restricted"] = "full"

    @pydantic.model_validator(mode="after")
    def _range_is_symmetric(self):
        if not self.symmetric and self.range != "full":
            raise ValueError("range applies to symmetric codes; drop it with symmetric=false")
        return self


class _WeightOnlyScheme(Scheme):
    bits: int
    Args = WeightOnlyArgs

    def alignment(self, args):
        return (1, args["group_size"] or 1)

    def storage(self, args):
        group = args["group_size"]
        strategy = "group" if group else "channel"
        return {"weights": weight_spec("int", self.bits, strategy, group_size=group,
                                       symmetric=args["symmetric"]),
                "input_activations": None}

    def quantize_weight(self, name, w, args, scale_dtype):
        group = args["group_size"]
        if group is not None and group >= w.shape[1]:
            group = None  # one group spanning the row is per-channel
        block = (1, group or w.shape[1])
        if not args["symmetric"]:
            qdata, scale, zero = quantize_int_weight_asym(w, self.bits, group, scale_dtype)
            return QuantizedTensor(qdata, scale, block, w.dtype, bits=self.bits, zero_point=zero)
        qdata, scale = quantize_int_weight(w, self.bits, group, scale_dtype,
                                           int_range=args["range"])
        return QuantizedTensor(qdata, scale, block, w.dtype, bits=self.bits)


class Wint8Scheme(_WeightOnlyScheme):
    name = "wint8"
    description = "int8 weights (per-channel or --group-size), bf16 activations (W8A16)"
    bits = 8
    min_sqnr_db = 38.0


class Wint4Scheme(_WeightOnlyScheme):
    name = "wint4"
    description = "int4 weights (per-channel or --group-size), bf16 activations (W4A16)"
    bits = 4
    min_sqnr_db = 14.0


@q.hookimpl
def register_schemes(register):
    register(Wint8Scheme(), aliases=("w8a16", "weight-only-int8"))
    register(Wint4Scheme(), aliases=("w4a16", "weight-only-int4"))

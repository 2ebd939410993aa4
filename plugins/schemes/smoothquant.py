"""SmoothQuant W8A8 (calibrated) and plain int8 W8A8 (data-free).

Both store per-output-channel symmetric weights (int8: ``amax / 127``, codes clamped to
+-127, as SmoothQuant's fake quantizer, LMDeploy and Paddle do; fp8: ``amax / 448``) and
quantize activations dynamically per token at run time, so no activation scale is stored.
``smoothquant`` first calibrates (q.calibration: one decoder layer at a time) and folds the
smoothing factors into the norms and the Linears that read them (q.smoothing); the write
pass then quantizes the smoothed weights like any data-free scheme.
"""

from __future__ import annotations

from typing import Literal

import pydantic
import torch

import q
from q.interfaces import Scheme
from q.kernels.act_quant import quantize_activation
from q.kernels.fp8_rowwise import quantize_fp8_per_channel
from q.kernels.int_weight import quantize_int_weight
from q.recipe import activation_spec, weight_spec
from q.smoothing import arch_smoothing, calibrate_smoothing, plan_smoothing
from q.tensor import QuantizedTensor

# LMDeploy spells fp8 as its torch dtype name; accept its spellings too
QUANT_DTYPE_ALIASES = {"float8_e4m3fn": "fp8", "e4m3": "fp8", "fp8-e4m3": "fp8"}


class W8A8Args(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    # accepted so `--quant-dtype int8` reads the same for both schemes
    quant_dtype: Literal["int8"] = "int8"


class SmoothQuantArgs(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    quant_dtype: Literal["int8", "fp8"] = "int8"
    # 0.5 is the paper's and llm-compressor's default; "auto" searches 0..1 per layer pair
    alpha: pydantic.confloat(ge=0.0, le=1.0) | Literal["auto"] = 0.5

    @pydantic.field_validator("quant_dtype", mode="before")
    @classmethod
    def _alias(cls, value):
        return QUANT_DTYPE_ALIASES.get(value, value)


def _is_fp8(args) -> bool:
    return args.get("quant_dtype", "int8") == "fp8"


class _W8A8Scheme(Scheme):
    """Per-channel 8-bit weights, dynamic per-token 8-bit activations."""

    min_sqnr_db = 38.0

    def storage(self, args):
        if _is_fp8(args):
            return {"weights": weight_spec("float", 8, "channel", fp8_dtype="e4m3"),
                    "input_activations": activation_spec("float", "token")}
        return {"weights": weight_spec("int", 8, "channel"),
                "input_activations": activation_spec("int", "token")}

    def quantize_weight(self, name, w, args, scale_dtype):
        if _is_fp8(args):
            qdata, scale = quantize_fp8_per_channel(w, torch.float8_e4m3fn, scale_dtype)
            return QuantizedTensor(qdata, scale, (1, w.shape[1]), w.dtype)
        qdata, scale = quantize_int_weight(w, 8, None, scale_dtype)
        return QuantizedTensor(qdata, scale, (1, w.shape[1]), w.dtype, bits=8)

    def fake_quant(self, args, scale_dtype=torch.float32):
        """(activation, weight) quantize-dequantize functions, for searching alpha."""
        act_dtype = torch.float8_e4m3fn if _is_fp8(args) else torch.int8

        def act(x):
            codes, scales = quantize_activation(x, None, act_dtype, impl="reference")
            return codes.float() * scales

        def weight(w):
            return self.quantize_weight("", w, args, scale_dtype).dequantize(torch.float32)

        return act, weight


class W8A8Int8Scheme(_W8A8Scheme):
    name = "w8a8-int8"
    description = ("int8 per-channel weights, dynamic per-token int8 activations, no "
                   "smoothing (data-free; compressed-tensors W8A8)")
    Args = W8A8Args
    activations = "dynamic per-token int8"


class SmoothQuantScheme(_W8A8Scheme):
    """SmoothQuant (https://arxiv.org/abs/2211.10438) with the paper's statistics."""

    name = "smoothquant"
    description = ("SmoothQuant: calibrated smoothing, then int8 (or fp8) per-channel "
                   "weights with dynamic per-token activations")
    Args = SmoothQuantArgs
    activations = "dynamic per-token int8 (fp8 with quant_dtype=fp8)"
    requires_calibration = True

    def plan_calibration(self, source, recipe, entries):
        """Which tensors calibration will rewrite (raises for unknown architectures)."""
        return plan_smoothing(source, entries, arch_smoothing(source.config, source.path))

    def calibrate(self, transform, source, recipe, data, progress=None) -> dict:
        """Run calibration over ``data`` and fill ``transform``'s factors."""
        act, weight = self.fake_quant(recipe.args, getattr(torch, recipe.scale_dtype))
        return calibrate_smoothing(transform, source, data.input_ids, recipe.args["alpha"],
                                   act, weight, progress=progress)


@q.hookimpl
def register_schemes(register):
    register(SmoothQuantScheme(), aliases=("smooth-quant", "sq"))
    register(W8A8Int8Scheme(), aliases=("w8a8", "int8-w8a8", "w8a8-int"))

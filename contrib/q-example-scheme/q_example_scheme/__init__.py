"""q-example-scheme: the smallest complete third-party q plugin. Copy it to start your own.

It adds one quantization scheme, ``wint8-rowmax-example`` (alias ``example-int8``): symmetric
int8 weights with one scale per output row (per channel), activations left in the model dtype
(W8A16). The numerics are written here in plain torch, so the plugin needs nothing from q
except three public names: ``q.hookimpl``, ``q.interfaces.Scheme`` and
``q.tensor.QuantizedTensor``.

How q finds it: ``pyproject.toml`` declares the entry point
``[project.entry-points."q.plugins"] q-example-scheme = "q_example_scheme"``. q loads that
module and calls its ``register_schemes`` hook; q never imports this package by name.
"""

from __future__ import annotations

import pydantic
import torch

import q
from q.interfaces import Scheme
from q.recipe import weight_spec
from q.tensor import QuantizedTensor

QMAX = 127  # symmetric int8: codes in [-127, 127]; -128 is never produced


class RowmaxArgs(pydantic.BaseModel):
    """The scheme's options. This one takes none.

    ``extra="forbid"`` is required: q reports unknown options as errors instead of
    silently ignoring them. Options must be JSON-safe; they are stored in the output's
    ``q_recipe.json``.
    """

    model_config = pydantic.ConfigDict(extra="forbid")


class RowmaxInt8Scheme(Scheme):
    # kebab-case id; q normalizes names anyway ("WINT8_Rowmax example" finds it too).
    name = "wint8-rowmax-example"
    description = "example plugin: int8 weights, one scale per output row, bf16 activations"
    Args = RowmaxArgs
    activations = "none (weight-only)"
    default_format = "compressed-tensors"  # what `q quantize` writes without --format
    min_sqnr_db = 38.0  # the SQNR this scheme promises on Gaussian weights (see the tests)

    def storage(self, args):
        """What the output looks like, as data: formats map this, never the scheme's name.

        int8, one scale per output channel, activations untouched: compressed-tensors
        writes it as ``pack-quantized`` W8A16, which vLLM and transformers load.
        """
        return {"weights": weight_spec("int", 8, "channel"), "input_activations": None}

    def quantize_weight(self, name, w, args, scale_dtype):
        """``w`` ``[N, K]`` -> int8 codes ``[N, K]`` and scales ``[N, 1]``, ``w ~= codes * scale``.

        ``scale_dtype`` is chosen by the output format (compressed-tensors: the model dtype).
        This runs on meta tensors too (q plans outputs without reading weights), so it uses
        only shape-preserving torch ops and never looks at values in Python.
        """
        # float64 keeps every step exact: a float32 quotient w / scale can round onto a .5
        # tie and then round to the wrong integer. (Costs 8 bytes per element transiently.)
        w64 = w.to(torch.float64)
        amax = w64.abs().amax(dim=1, keepdim=True)  # [N, 1]
        # All-zero rows get scale 1. Test `amax == 0`, not `amax > 0`: a row holding NaN must
        # give a NaN scale, which is how q detects and refuses NaN/Inf weights.
        scale = torch.where(amax == 0, torch.ones_like(amax), amax / QMAX).to(scale_dtype)
        # Divide by the scale as stored, so dequantization uses exactly what we rounded with.
        codes = torch.round(w64 / scale.to(torch.float64))  # round half to even
        codes = codes.clamp_(-QMAX, QMAX).to(torch.int8)
        # block_size (1, K): one scale per block of 1 row x K columns, i.e. per channel.
        return QuantizedTensor(codes, scale, (1, w.shape[1]), w.dtype, bits=8)


@q.hookimpl
def register_schemes(register):
    """q calls this once per registry build. Register instances, not classes.

    A name or alias that another plugin already registered is an error, not an override.
    """
    register(RowmaxInt8Scheme(), aliases=("example-int8",))

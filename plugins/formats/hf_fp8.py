"""``hf-fp8``: HF / DeepSeek fine-grained FP8 (``quant_method: fp8`` + ``weight_block_size``).

On disk, per quantized Linear: ``weight`` (fp8 ``[N, K]``) and ``weight_scale_inv`` (fp32
``[ceil(N/bn), ceil(K/bk)]``, which *multiplies* despite its name). The skip list holds the
full name of every Linear left in bf16, ``lm_head`` always included: the only spelling
vLLM, SGLang, transformers 4.x/5.x and LMDeploy all honour (formats.md 1.3).

The reader also accepts vLLM/AutoFP8 per-tensor checkpoints (``quant_method: fp8`` with no
``weight_block_size`` and a scalar ``weight_scale``).
"""

from __future__ import annotations

import torch

import q
from q.errors import CheckpointError
from q.interfaces import CheckpointReader, Format
from q.kernels.numerics import ceil_div
from q.recipe import QuantRecipe, activation_spec, weight_spec
from q.source import model_dtype, read_recipe_file
from q.tensor import QuantizedTensor

SCALE = "weight_scale_inv"
TENSOR_SCALE = "weight_scale"  # AutoFP8 / vLLM per-tensor naming
FMT_NAMES = {"e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2"}


class HfFp8Format(Format):
    name = "hf-fp8"
    description = "HF/DeepSeek fine-grained FP8: weight + weight_scale_inv, quant_method fp8"

    def supports(self, recipe):
        w = recipe.weights
        if w.get("type") != "float" or w.get("num_bits") != 8 or w.get("strategy") != "block":
            return (
                f"hf-fp8 stores 128x128 block fp8 only, not '{recipe.scheme}' "
                f"({w.get('type')}{w.get('num_bits')} per {w.get('strategy')}); use "
                "--format compressed-tensors (alias vllm)"
            )
        return None

    def encode(self, module, qt):
        return {f"{module}.weight": qt.qdata, f"{module}.{SCALE}": qt.scale.float()}

    def quantization_config(self, recipe, skipped, model_config):
        skip = list(dict.fromkeys([*skipped, "lm_head"]))
        return {
            "quant_method": "fp8",
            "fmt": recipe.weights.get("fp8_dtype", "e4m3"),
            "activation_scheme": "dynamic",
            "weight_block_size": list(recipe.weights.get("block_structure") or (128, 128)),
            "modules_to_not_convert": skip,
        }

    def detect(self, config):
        qcfg = config.get("quantization_config") or {}
        # exactly "fp8": fbgemm_fp8, fp8 from other toolkits etc. store other tensor names
        return isinstance(qcfg, dict) and qcfg.get("quant_method") == "fp8"

    def open(self, source):
        return HfFp8Reader(source)


class HfFp8Reader(CheckpointReader):
    def __init__(self, source):
        self.source = source
        qcfg = source.config["quantization_config"]
        self.block = qcfg.get("weight_block_size")
        if self.block is not None:
            self.block = tuple(int(b) for b in self.block)
        self.skipped = list(qcfg.get("modules_to_not_convert") or qcfg.get("ignored_layers") or [])
        self.orig_dtype = model_dtype(source.config)
        self.modules = {}
        for name in source.names():
            for suffix in (f".{SCALE}", f".{TENSOR_SCALE}"):
                if name.endswith(suffix):
                    module = name[: -len(suffix)]
                    if f"{module}.weight" in source.tensors:
                        self.modules[module] = [f"{module}.weight", name]
        self.recipe = read_recipe_file(source.path) or self._infer_recipe(qcfg)

    def _infer_recipe(self, qcfg):
        fmt = qcfg.get("fmt", "e4m3")
        if fmt not in FMT_NAMES:
            fmt = "e4m3"
        ignore = tuple(self.skipped)
        if self.block is None and any(n.endswith(TENSOR_SCALE) for m in self.modules.values()
                                      for n in m):
            static = qcfg.get("activation_scheme") == "static"
            acts = None if static else activation_spec("float", "token")
            return QuantRecipe("fp8-tensor", {"fp8_dtype": fmt}, ignore=ignore,
                               weights=weight_spec("float", 8, "tensor", fp8_dtype=fmt),
                               input_activations=acts)
        block = list(self.block or (128, 128))
        return QuantRecipe("fp8-block", {"fp8_dtype": fmt, "block_size": block}, ignore=ignore,
                           weights=weight_spec("float", 8, "block", block=block, fp8_dtype=fmt),
                           input_activations=activation_spec("float", "group", block[1]))

    def quantized_modules(self):
        return dict(self.modules)

    def decode(self, module, tensors):
        weight, scale_name = self.modules[module]
        w, scale = tensors[weight], tensors[scale_name]
        if scale_name.endswith(TENSOR_SCALE) and self.block is None:
            if scale.numel() != 1:
                raise CheckpointError(
                    f"{self.source.path}: '{scale_name}' has shape {list(scale.shape)}; "
                    "a per-tensor fp8 scale must hold one value"
                )
            return QuantizedTensor(w, scale.reshape(1, 1).float(), tuple(w.shape), self.orig_dtype)
        block = self.block or (128, 128)
        grid = (ceil_div(w.shape[0], block[0]), ceil_div(w.shape[1], block[1]))
        if tuple(scale.shape) != grid:
            raise CheckpointError(
                f"{self.source.path}: '{scale_name}' has shape {list(scale.shape)} but weight "
                f"{list(w.shape)} with blocks {list(block)} needs {list(grid)}"
            )
        if scale.dtype != torch.float32:
            scale = scale.float()  # bf16 or e8m0 scales widen exactly
        return QuantizedTensor(w, scale, block, self.orig_dtype)


@q.hookimpl
def register_formats(register):
    register(HfFp8Format(), aliases=("fp8", "deepseek", "hf"))

"""``lmdeploy`` (alias ``smooth-quant``): the layout ``lmdeploy lite smooth_quant`` saves,
read by LMDeploy's PyTorch engine (formats.md 3.3).

Per quantized Linear (InternLM/lmdeploy ``lmdeploy/pytorch/nn/linear/w8a8.py``
``W8A8Linear.create_weights``; ``lmdeploy/pytorch/models/q_modules.py`` ``QLinear``):
- ``weight``: int8 (or ``float8_e4m3fn``) ``[N, K]``, per output channel, symmetric;
- ``scale``: float32 ``[N, 1]``; it multiplies (``w ~= weight * scale``).
Norms keep their names and hold the smoothed weights in the model dtype. config.json gets
``{"quant_method": "smooth_quant", "quant_dtype": "int8" | "float8_e4m3fn"}`` (the torch
dtype name, as ``lite/apis/smooth_quant.py`` writes it) plus ``modules_to_not_convert``
when Linears were kept unquantized.

LMDeploy matches that list by reversed substring (``prefix in entry``) against the module
prefixes of *its* model, which fuses q/k/v into ``self_attn.qkv_proj`` and gate/up into
``mlp.gate_up_proj`` and fuses each norm with the int8 quantization of its consumers'
input. So for a kept consumer q lists the HF name, LMDeploy's fused name and the norm that
feeds it (the smoothing mappings say which). LMDeploy 0.18 passes those prefixes only for
some models (Qwen3 among q's); Llama, Mistral, Qwen2 and Gemma are built without them and
quantize every decoder Linear whatever the list says, so q warns that such a checkpoint
with kept decoder Linears will not load there.

Only LMDeploy's PyTorch engine reads this. TurboMind, vLLM, SGLang and transformers do not
(transformers warns "Unknown quantization type" and would load raw codes): for a portable
checkpoint use ``compressed-tensors``.
"""

from __future__ import annotations

import torch

import q
from q.errors import CheckpointError
from q.interfaces import CheckpointReader, Format
from q.recipe import QuantRecipe, activation_spec, weight_spec
from q.source import model_dtype, read_recipe_file
from q.tensor import QuantizedTensor

QUANT_METHOD = "smooth_quant"
CODE_DTYPES = {"int8": torch.int8, "float8_e4m3fn": torch.float8_e4m3fn}


def lmdeploy_dtype(recipe: QuantRecipe) -> tuple[str | None, str]:
    """(LMDeploy's quant_dtype name, or None) and the reason when None."""
    w, acts = recipe.weights, recipe.input_activations
    if w.get("num_bits") != 8 or w.get("strategy") != "channel" or not w.get("symmetric", True):
        return None, ("LMDeploy smooth_quant stores 8-bit per-channel symmetric weights only; "
                      f"this recipe has {w.get('type')}{w.get('num_bits')} per "
                      f"{w.get('strategy')}")
    if not acts or acts.get("strategy") != "token" or not acts.get("dynamic"):
        return None, "LMDeploy smooth_quant quantizes activations dynamically per token"
    if w.get("type") == "int" and acts.get("type") == "int":
        return "int8", ""
    if w.get("type") == "float" and w.get("fp8_dtype", "e4m3") == "e4m3" \
            and acts.get("type") == "float":
        return "float8_e4m3fn", ""
    return None, "LMDeploy smooth_quant takes int8 or e4m3 weights with matching activations"


# LMDeploy's fused module for each HF Linear it packs together
_FUSED = {"self_attn.q_proj": "self_attn.qkv_proj", "self_attn.k_proj": "self_attn.qkv_proj",
          "self_attn.v_proj": "self_attn.qkv_proj", "mlp.gate_proj": "mlp.gate_up_proj",
          "mlp.up_proj": "mlp.gate_up_proj"}
# model types whose LMDeploy 0.18 model passes module prefixes (so honors the list)
PREFIXED_MODEL_TYPES = {"qwen3"}


def lmdeploy_skip_list(skipped, model_config: dict) -> list[str]:
    """``modules_to_not_convert`` for LMDeploy: each kept module, its fused name and its norm."""
    import warnings

    from q.smoothing import ARCH_SMOOTHING

    arch = ARCH_SMOOTHING.get(model_config.get("model_type"))
    norms = {c: m.norm for m in (arch.mappings if arch else ()) for c in m.consumers}
    out, decoder = [], []
    for name in skipped:
        out.append(name)
        layer, _, rel = name.partition(".layers.")
        index, _, rel = rel.partition(".")
        if not rel:
            continue  # not inside a decoder layer (lm_head): LMDeploy keeps those in bf16
        decoder.append(name)
        prefix = f"{layer}.layers.{index}"
        if rel in _FUSED:
            out.append(f"{prefix}.{_FUSED[rel]}")
        if rel in norms:
            out.append(f"{prefix}.{norms[rel]}")
    if decoder and model_config.get("model_type") not in PREFIXED_MODEL_TYPES:
        warnings.warn(
            f"LMDeploy (0.18) builds {model_config.get('model_type')} without module prefixes "
            f"and quantizes every decoder Linear whatever modules_to_not_convert says, so this "
            f"checkpoint, which keeps {len(decoder)} decoder Linears in bf16 (first: "
            f"{decoder[0]}), will not load there; drop --ignore for them, or write "
            "--format compressed-tensors (vLLM, SGLang, transformers)", stacklevel=2)
    return list(dict.fromkeys(out))


class LmdeploySmoothQuantFormat(Format):
    name = "lmdeploy"
    description = "LMDeploy smooth_quant W8A8 (weight + scale; LMDeploy's PyTorch engine only)"

    def supports(self, recipe):
        dtype, reason = lmdeploy_dtype(recipe)
        return None if dtype else reason

    def scale_dtype(self, recipe, model_dtype_):
        return torch.float32

    def encode(self, module, qt):
        if qt.granularity != "channel" or qt.bits != 8 or qt.zero_point is not None:
            raise CheckpointError(f"{module}: LMDeploy smooth_quant stores 8-bit per-channel "
                                  f"symmetric weights, not {qt.qdtype} per {qt.granularity}")
        return {f"{module}.weight": qt.qdata,
                f"{module}.scale": qt.scale.to(torch.float32).reshape(-1, 1)}

    def quantization_config(self, recipe, skipped, model_config):
        dtype, reason = lmdeploy_dtype(recipe)
        if dtype is None:
            raise CheckpointError(reason)
        cfg = {"quant_method": QUANT_METHOD, "quant_dtype": dtype}
        if skipped:
            cfg["modules_to_not_convert"] = lmdeploy_skip_list(skipped, model_config)
        return cfg

    def detect(self, config):
        qcfg = config.get("quantization_config") or {}
        return isinstance(qcfg, dict) and qcfg.get("quant_method") == QUANT_METHOD

    def open(self, source):
        return LmdeploySmoothQuantReader(source)


class LmdeploySmoothQuantReader(CheckpointReader):
    """Reads what q or ``lmdeploy lite smooth_quant`` wrote."""

    def __init__(self, source):
        self.source = source
        qcfg = source.config["quantization_config"]
        name = qcfg.get("quant_dtype", "int8")
        self.code_dtype = CODE_DTYPES.get(name)
        if self.code_dtype is None:
            raise CheckpointError(f"{source.path}: smooth_quant quant_dtype '{name}' is not one "
                                  f"q reads ({', '.join(CODE_DTYPES)})")
        self.skipped = list(qcfg.get("modules_to_not_convert") or [])
        self.orig_dtype = model_dtype(source.config)
        self.modules = {}
        for n in source.names():
            if not n.endswith(".scale"):
                continue
            module = n[: -len(".scale")]
            weight = source.tensors.get(f"{module}.weight")
            if weight is not None and weight.dtype == self.code_dtype and len(weight.shape) == 2:
                if source.info(n).shape != (weight.shape[0], 1):
                    raise CheckpointError(f"{source.path}: '{n}' is {list(source.info(n).shape)}"
                                          f", expected [{weight.shape[0]}, 1]")
                self.modules[module] = [f"{module}.weight", n]
        self.recipe = read_recipe_file(source.path) or self._infer_recipe(name)

    def _infer_recipe(self, name):
        # the file does not say whether the weights were smoothed; it stores plain W8A8
        if name == "int8":
            scheme, args, spec = "w8a8-int8", {}, weight_spec("int", 8, "channel")
        else:
            scheme, args = "fp8-dynamic", {"fp8_dtype": "e4m3"}
            spec = weight_spec("float", 8, "channel", fp8_dtype="e4m3")
        return QuantRecipe(scheme, args, ignore=tuple(self.skipped), weights=spec,
                           input_activations=activation_spec(spec["type"], "token"),
                           scale_dtype="float32")

    def quantized_modules(self):
        return dict(self.modules)

    def decode(self, module, tensors):
        w = tensors[f"{module}.weight"]
        scale = tensors[f"{module}.scale"].reshape(-1, 1)
        return QuantizedTensor(w, scale, (1, w.shape[1]), self.orig_dtype, bits=8)


@q.hookimpl
def register_formats(register):
    register(LmdeploySmoothQuantFormat(), aliases=("smooth-quant", "lmdeploy-smooth-quant"))

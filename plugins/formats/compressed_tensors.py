"""``compressed-tensors`` (alias ``vllm``): the format of llm-compressor, loaded by vLLM,
SGLang and transformers.

Per quantized Linear (formats.md 2):
- fp8 (``float-quantized``): ``weight`` fp8 ``[N, K]``, ``weight_scale`` ``[grid]`` (block),
  ``[N, 1]`` (channel) or ``[1]`` (tensor).
- int weight-only (``pack-quantized``): ``weight_packed`` int32 ``[N, ceil(K*b/32)]``,
  ``weight_scale`` ``[N, groups]``, ``weight_shape`` int64 ``[2]``; symmetric checkpoints
  omit ``weight_zero_point``.
- int8 W8A8 (``int-quantized``, formats.md 2.4): ``weight`` int8 ``[N, K]``, ``weight_scale``
  ``[N, 1]``; activations are quantized per token at run time, so no ``input_scale``.
Scales are stored in the model dtype, as compressed-tensors does. A checkpoint converted
from fp32 scales keeps them fp32 and says so with ``scale_dtype`` (exact, no re-rounding).
The config is what compressed-tensors itself writes; tests validate it with the version
vLLM pins.
"""

from __future__ import annotations

import torch

import q
from q.errors import CheckpointError
from q.interfaces import CheckpointReader, Format
from q.kernels.packing import pack_int32, unpack_int32
from q.planning import match_pattern
from q.recipe import QuantRecipe
from q.source import model_dtype, read_recipe_file
from q.tensor import QuantizedTensor

CT_VERSION = "0.17.0"  # the compressed-tensors version vLLM 0.33 pins; configs validate there
CT_ARG_KEYS = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")


def ct_args(spec: dict | None, scale_dtype: str | None = None) -> dict | None:
    """q's storage spec -> compressed-tensors QuantizationArgs JSON (only keys ct knows)."""
    if spec is None:
        return None
    args = {k: spec.get(k) for k in CT_ARG_KEYS}
    args["dynamic"] = bool(spec.get("dynamic", False))
    if spec.get("block_structure"):
        args["block_structure"] = list(spec["block_structure"])
    if scale_dtype is not None:
        args["scale_dtype"] = f"torch.{scale_dtype}"
    return args


def ct_format_of(recipe) -> tuple[str | None, str]:
    """(compressed-tensors compressor format, or None) and the reason when None."""
    w, acts = recipe.weights, recipe.input_activations
    if w.get("type") == "float":
        if w.get("num_bits") != 8 or w.get("fp8_dtype", "e4m3") != "e4m3":
            return None, "compressed-tensors stores fp8 as e4m3 only; drop --fp8-dtype e5m2"
        if w.get("strategy") not in ("tensor", "channel", "block"):
            return None, f"no compressed-tensors layout for fp8 per {w.get('strategy')}"
        return "float-quantized", ""
    if w.get("type") == "int":
        if w.get("num_bits") not in (4, 8) or w.get("strategy") not in ("channel", "group"):
            return None, f"no layout for int{w.get('num_bits')} per {w.get('strategy')}"
        if acts is None:
            return "pack-quantized", ""
        if (w.get("num_bits") != 8 or w.get("strategy") != "channel"
                or not w.get("symmetric", True)):
            return None, "int W8A8 is stored as int8 per-channel symmetric weights only"
        if (acts.get("type") != "int" or acts.get("num_bits") != 8
                or acts.get("strategy") != "token" or not acts.get("dynamic")):
            return None, ("int8 weights need dynamic per-token int8 activations (the W8A8 "
                          "preset) to be stored as int-quantized")
        return "int-quantized", ""
    return None, f"unknown weight type {w.get('type')!r} in recipe '{recipe.scheme}'"


class CompressedTensorsFormat(Format):
    name = "compressed-tensors"
    description = ("vLLM / llm-compressor compressed-tensors (float-quantized, int-quantized, "
                   "pack-quantized)")

    def supports(self, recipe):
        fmt, reason = ct_format_of(recipe)
        return None if fmt else reason

    def scale_dtype(self, recipe, model_dtype_):
        return model_dtype_

    def encode_for(self, recipe):
        """The encoder for ``recipe``: the same int8 codes are ``weight`` (W8A8,
        int-quantized) or ``weight_packed`` (W8A16, pack-quantized) depending on whether the
        activations are quantized, which a QuantizedTensor alone does not say."""
        if ct_format_of(recipe)[0] == "int-quantized":
            return self._encode_int_quantized
        return self.encode

    @staticmethod
    def _encode_int_quantized(module, qt):
        return {f"{module}.weight": qt.qdata, f"{module}.weight_scale": qt.scale}

    def encode(self, module, qt):
        if qt.qdtype.startswith("float8"):
            scale = qt.scale.reshape(1) if qt.granularity == "tensor" else qt.scale
            return {f"{module}.weight": qt.qdata, f"{module}.weight_scale": scale}
        packed = pack_int32(qt.qdata, qt.bits, dim=1)
        out = {
            f"{module}.weight_packed": packed,
            f"{module}.weight_scale": qt.scale,
            f"{module}.weight_shape": torch.tensor(list(qt.shape), dtype=torch.int64,
                                                   device=qt.qdata.device),
        }
        if qt.zero_point is not None:  # asymmetric: packed along the output rows (dim 0)
            out[f"{module}.weight_zero_point"] = pack_int32(qt.zero_point, qt.bits, dim=0)
        return out

    def quantization_config(self, recipe, skipped, model_config):
        fmt, reason = ct_format_of(recipe)
        if fmt is None:
            raise CheckpointError(reason)
        stored = recipe.scale_dtype
        default = str(model_dtype(model_config)).removeprefix("torch.")
        weights = ct_args(recipe.weights, None if stored == default else stored)
        group = {"targets": ["Linear"], "weights": weights,
                 "input_activations": ct_args(recipe.input_activations),
                 "output_activations": None, "format": fmt}
        return {
            "config_groups": {"group_0": group}, "format": fmt,
            "global_compression_ratio": None,
            "ignore": list(dict.fromkeys([*skipped, "lm_head"])),
            "kv_cache_scheme": None, "quant_method": "compressed-tensors",
            "quantization_status": "compressed", "sparsity_config": {},
            "transform_config": {}, "version": CT_VERSION,
        }

    def detect(self, config):
        qcfg = config.get("quantization_config") or {}
        return isinstance(qcfg, dict) and qcfg.get("quant_method") == "compressed-tensors"

    def open(self, source):
        return CompressedTensorsReader(source)


class CompressedTensorsReader(CheckpointReader):
    """Reads what q, llm-compressor or compressed-tensors itself wrote."""

    def __init__(self, source):
        self.source = source
        qcfg = source.config["quantization_config"]
        if qcfg.get("quantization_status", "compressed") != "compressed":
            raise CheckpointError(
                f"{source.path}: quantization_status is '{qcfg.get('quantization_status')}', "
                "not 'compressed'; the weights are not stored quantized"
            )
        self.groups = list((qcfg.get("config_groups") or {}).values())
        self.skipped = list(qcfg.get("ignore") or [])
        self.orig_dtype = model_dtype(source.config)
        self.modules = {}
        for name in source.names():
            if name.endswith(".weight_packed"):
                module = name[: -len(".weight_packed")]
                extra = [f"{module}.weight_scale", f"{module}.weight_shape"]
                zp = f"{module}.weight_zero_point"
                self.modules[module] = [name, *extra] + ([zp] if zp in source.tensors else [])
            elif name.endswith(".weight_scale"):
                module = name[: -len(".weight_scale")]
                if f"{module}.weight" in source.tensors:
                    self.modules[module] = [f"{module}.weight", name]
        self.shapes = {}
        for module, names in self.modules.items():
            for n in names:
                source.info(n)  # a missing companion tensor is named here, not later
            if names[0].endswith(".weight_packed"):
                # tiny int64[2]; read now so planning on meta tensors knows the true shape
                self.shapes[module] = tuple(int(v) for v in source.read(names[2]).tolist())
        self.recipe = read_recipe_file(source.path) or self._infer_recipe()

    def group_for(self, module):
        for group in self.groups:
            targets = group.get("targets") or []
            if any(t == "Linear" or match_pattern(t, module) for t in targets):
                return group
        raise CheckpointError(
            f"{self.source.path}: no config group targets '{module}' although it has scales"
        )

    def _infer_recipe(self):
        if not self.groups:
            raise CheckpointError(f"{self.source.path}: compressed-tensors config has no groups")
        w = dict(self.groups[0].get("weights") or {})
        acts = self.groups[0].get("input_activations")
        spec = {k: w.get(k) for k in (*CT_ARG_KEYS, "block_structure")}
        spec["symmetric"] = w.get("symmetric", True)
        if spec["type"] == "float":
            spec["fp8_dtype"] = "e4m3"
        act_spec = {k: acts.get(k) for k in CT_ARG_KEYS} if acts else None
        strategy, bits = spec.get("strategy"), spec.get("num_bits")
        if spec["type"] == "float":
            scheme = {"block": "fp8-block", "channel": "fp8-dynamic", "tensor": "fp8-tensor"}.get(
                strategy, f"fp8-{strategy}")
            args = {"fp8_dtype": "e4m3"}
            if strategy == "block":
                args["block_size"] = list(spec.get("block_structure") or [128, 128])
        elif act_spec is None:
            scheme = f"wint{bits}"
            args = {"group_size": spec.get("group_size"), "symmetric": spec["symmetric"]}
        elif bits == 8 and act_spec.get("type") == "int":
            scheme, args = "w8a8-int8", {}
        else:
            scheme, args = f"w{bits}a{act_spec.get('num_bits')}-int", {}
        return QuantRecipe(scheme, args, ignore=tuple(self.skipped), weights=spec,
                           input_activations=act_spec)

    def quantized_modules(self):
        return dict(self.modules)

    def decode(self, module, tensors):
        names = self.modules[module]
        w_args = self.group_for(module).get("weights") or {}
        scale = tensors[f"{module}.weight_scale"]
        if names[0].endswith(".weight_packed"):
            bits = int(w_args.get("num_bits", 4))
            n, k = self.shapes[module]
            codes = unpack_int32(tensors[names[0]], bits, k, dim=1)
            zp = tensors.get(f"{module}.weight_zero_point")
            if zp is not None:
                zp = unpack_int32(zp, bits, n, dim=0)
            return QuantizedTensor(codes, scale, self._block(w_args, (n, k), scale),
                                   self.orig_dtype, bits=bits, zero_point=zp)
        w = tensors[names[0]]
        if scale.dim() == 1:
            scale = scale.reshape(-1, 1) if scale.numel() == w.shape[0] and scale.numel() > 1 \
                else scale.reshape(1, 1)
        return QuantizedTensor(w, scale, self._block(w_args, tuple(w.shape), scale),
                               self.orig_dtype, bits=8)

    def _block(self, w_args, shape, scale):
        strategy = w_args.get("strategy")
        n, k = shape
        if strategy == "block":
            return tuple(w_args.get("block_structure") or (128, 128))
        if strategy == "tensor":
            return (n, k)
        if strategy == "group":
            return (1, int(w_args["group_size"]))
        if strategy == "channel":
            return (1, k)
        raise CheckpointError(f"{self.source.path}: unsupported weight strategy '{strategy}'")


@q.hookimpl
def register_formats(register):
    register(CompressedTensorsFormat(), aliases=("vllm", "ct", "llm-compressor"))

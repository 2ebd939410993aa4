"""Build a transformers model skeleton on the meta device and fill it from a checkpoint.

Quantized Linears become :class:`QuantLinear` modules built straight from the format
reader's QuantizedTensor (or, for online quantization, from the scheme's output for one
bf16 tensor at a time), so no float copy of a quantized layer ever exists. Everything else
(embeddings, norms, biases, unquantized Linears) is read tensor by tensor into the compute
dtype.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from q.api import detect_format, make_recipe
from q.errors import CheckpointError, IncompatibleError
from q.kernels.scaled_gemm.cpp_impl import amx_unavailable as amx_int8_unavailable
from q.planning import build_entries
from q.modeling import parameters_on_meta
from q.source import ModelSource, model_dtype

from .attention import DENSE_ATTR
from .attention import register as register_attention
from .dense import pack_dense_linears
from .fused import install, sibling_groups, stack_quantized
from .layers import QuantLinear, choose_kind, start_path_log

log = logging.getLogger("q.engine")

# transformers model_type values the engine is tested with (tests/test_engine.py,
# tests/test_engine_moe.py).
DENSE_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")
SUPPORTED_ARCHITECTURES = DENSE_ARCHITECTURES + MOE_ARCHITECTURES

# Checkpoint tensors the engine does not use: static activation / KV-cache scales (the engine
# quantizes activations dynamically) and rotary tables some exporters save.
IGNORED_TENSORS = re.compile(r"\.(input_scale|k_scale|v_scale|output_scale|rotary_emb\.inv_freq)$")


DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float32": torch.float32,
          "fp32": torch.float32}


def compute_dtype_for(device: torch.device, config: dict, dtype: str = "auto") -> torch.dtype:
    """The dtype activations (and unquantized weights) compute in. ``auto``: on a CPU, bf16
    where it has bf16 instructions (AVX-512 BF16 or AMX: torch's bf16 GEMMs there beat fp32
    2-3x and its packed int8/int4 kernels want bf16 activations), else fp32; on a GPU the
    model's half dtype."""
    if dtype not in DTYPES:
        raise IncompatibleError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    if DTYPES[dtype] is not None:
        if device.type == "cpu" and DTYPES[dtype] is torch.float16:
            raise IncompatibleError("float16 is not a CPU compute dtype; use bfloat16 or "
                                    "float32")
        return DTYPES[dtype]
    if device.type == "cpu":
        from q.kernels.dispatch import cpu_features

        features = cpu_features()
        if "vnni" not in features:
            log.info("this CPU has no VNNI (int8 dot products): int8 W8A8 layers still run "
                     "on torch._int_mm, more slowly")
        if "bf16" in features:
            return torch.bfloat16
        log.info("this CPU has no bf16 instructions (AVX-512 BF16 or AMX): computing in "
                 "float32, where torch's packed int8/int4 kernels do not apply (each layer's "
                 "path is logged below); dtype='bfloat16' forces bf16")
        return torch.float32
    half = model_dtype(config)
    return half if half in (torch.float16, torch.bfloat16) else torch.bfloat16


def build_skeleton(config: dict, dtype: torch.dtype, path) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = config.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        arch = (config.get("architectures") or [model_type])[0]
        raise IncompatibleError(
            f"{path}: the native engine has no model skeleton for '{arch}' (model_type "
            f"'{model_type}'); supported: {', '.join(SUPPORTED_ARCHITECTURES)}. "
            "`q export --format vllm` writes a checkpoint vLLM can serve instead"
        )
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    clean = {k: v for k, v in config.items() if k != "quantization_config"}
    hf_config = AutoConfig.for_model(**clean)
    # what transformers itself would run (SDPA, or eager for Gemma 2): prompts use it
    dense = "sdpa" if getattr(MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)], "_supports_sdpa",
                              False) else "eager"
    with parameters_on_meta():
        # every attention layer calls the engine's paged attention (attention.py)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype,
                                                 attn_implementation=register_attention())
    setattr(model.config, DENSE_ATTR, dense)
    return model.eval()


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _find_slot(model: nn.Module, name: str):
    """(module, attribute, is a buffer) for a checkpoint tensor, or None. Mixtral checkpoints
    name the MoE block ``block_sparse_moe``; transformers 5 calls it ``mlp``."""
    for candidate in (name, name.replace(".block_sparse_moe.", ".mlp.", 1)):
        module_name, _, attr = candidate.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue
        if attr in module._parameters or attr in module._buffers:
            return module, attr, attr in module._buffers
    return None


def keeps_fp32(model: nn.Module, name: str) -> bool:
    """transformers keeps some tensors in fp32 whatever the model dtype (DeepSeek-V3's
    router weight and score-correction bias): so does the engine."""
    keep = getattr(model, "_keep_in_fp32_modules_strict", None) or ()
    return any(part in name for part in keep)


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    slot = _find_slot(model, name)
    if slot is None:
        raise CheckpointError(f"checkpoint tensor '{name}' has no place in the "
                              f"{type(model).__name__} skeleton; is config.json the right one?")
    module, attr, is_buffer = slot
    if is_buffer:
        module._buffers[attr] = tensor
    else:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


class LoadReport:
    """What loading did: quantized layers, kernel paths, ignored tensors (for logs/tests)."""

    def __init__(self):
        self.quantized: dict[str, QuantLinear] = {}
        self.experts: dict[str, nn.Module] = {}  # MoE experts modules (moe.FusedExperts)
        self.packed = 0  # unquantized bf16 Linears prepacked for oneDNN (dense.py)
        self.fused = 0  # groups of sibling projections run as one GEMM (fused.py)
        self.ignored: list[str] = []
        self.recipe = None
        self.format = "unquantized"
        self.dtype = torch.float32


def _load_experts(model, source, quantized: dict, acts, device, impl, dtype, report,
                  progress=None, woq_activations: str = "bf16") -> set:
    """Replace each MoE experts module by a FusedExperts; its entries leave ``quantized``.
    Returns the checkpoint tensors it consumed."""
    from .moe import build_experts, expert_modules, plan_experts

    modules = expert_modules(model)
    if not modules:
        return set()
    plans = plan_experts(source.path, modules, source.tensors, quantized)  # checks first
    if woq_activations == "int8" and acts is None and plans:
        raise IncompatibleError(f"{plans[0].module}: woq_activations int8 cannot run MoE "
                                "experts (fused_moe multiplies weight-only experts in "
                                "bf16); leave it at bf16 for this model")
    consumed = set()

    def read(module_name):
        if module_name in quantized:
            names, make = quantized.pop(module_name)
            consumed.update(names)
            return make({n: source.read(n) for n in names})
        consumed.add(f"{module_name}.weight")
        return source.read(f"{module_name}.weight")

    for plan in (progress(plans, "loading MoE experts") if progress else plans):
        experts = build_experts(plan, modules[plan.module], read, acts, device, impl, dtype)
        _set_submodule(model, plan.module, experts)
        report.experts[plan.module] = experts
    return consumed


def fusable_groups(modules, device: torch.device, impl: str) -> dict[str, tuple]:
    """module -> (parent, children) for the sibling projections fused on this load: on a
    CPU with torch's kernels (``impl`` auto or torch); the reference keeps one layer per
    projection, as the checkpoint has them."""
    if device.type != "cpu" or impl not in ("auto", "torch"):
        return {}
    return {f"{parent}.{c}": (parent, children)
            for parent, children in sibling_groups(modules) for c in children}


def _build_fused(model, parent, children, parts: dict, acts, device, impl, dtype,
                 report, woq_activations: str = "bf16") -> None:
    """One QuantLinear for the stacked projections where their layouts stack and torch's
    kernels run the result; else one per projection, as unfused."""
    names = [f"{parent}.{c}" for c in children]
    qts = [parts[n][0] for n in names]
    biases = [parts[n][1] for n in names]
    stacked = stack_quantized(qts)
    if stacked is not None and stacked.qdata.dtype == torch.int8 and \
            choose_kind(stacked, acts, device, impl) == "scaled" and \
            amx_int8_unavailable(*stacked.qdata.shape) is not None:
        # int8 W8A8 on _int_mm measured slower fused on the 1.1B model: 33.5 against 39.3
        # tok/s at 32 requests, the same at 1 (docs/benchmarks.md); the AMX kernel is not
        stacked = None
    layer = None
    if stacked is not None:
        bias = None if all(b is None for b in biases) else torch.cat(
            [torch.zeros(t.shape[0], dtype=dtype) if b is None else b
             for t, b in zip(qts, biases)])
        layer = QuantLinear(stacked, acts, bias, device, impl,
                            name=f"{parent}.{'+'.join(children)}", dtype=dtype,
                            woq_activations=woq_activations)
        if layer.backend != "torch":
            layer = None
    if layer is None:
        for name, qt, bias in zip(names, qts, biases):
            single = QuantLinear(qt, acts, bias, device, impl, name=name, dtype=dtype,
                                 woq_activations=woq_activations)
            _set_submodule(model, name, single)
            report.quantized[name] = single
        return
    installed = install(model, parent, children, layer, [t.shape[0] for t in qts],
                        qts[0].shape[1])
    for name, part in zip(names, installed):
        report.quantized[name] = part
    report.fused += 1


def load_model(path, *, device: torch.device, scheme: str | None = None,
               args: dict | None = None, ignore=(), ragged: str = "skip", impl: str = "auto",
               dtype: str = "auto", progress=None, woq_activations: str = "bf16"):
    """(model, tokenizer-free config dict, LoadReport) for a checkpoint or an online recipe.
    ``woq_activations``: ``bf16`` or ``int8`` (weight-only layers' steps of 17+ tokens
    with int8 activations, see QuantLinear)."""
    source = ModelSource(path)
    fmt, reader = detect_format(source)
    report = LoadReport()
    dtype = compute_dtype_for(device, source.config, dtype)
    report.dtype = dtype
    model = build_skeleton(source.config, dtype, source.path)

    quantized: dict[str, tuple] = {}  # module -> (tensor names, make QuantizedTensor)
    acts = None
    if reader is not None:
        if scheme:
            raise IncompatibleError(
                f"{source.path} is already quantized ({fmt.name}); drop --scheme to run it "
                "as it is, or point at the bf16 model to quantize online")
        report.recipe, report.format = reader.recipe, fmt.name
        acts = reader.recipe.input_activations
        for module, names in reader.quantized_modules().items():
            quantized[module] = (names, lambda t, m=module: reader.decode(m, t))
    elif scheme:
        recipe, scheme_obj, _ = make_recipe(scheme, args, ignore=ignore, ragged=ragged,
                                            model_dtype_=model_dtype(source.config))
        scale_dtype = getattr(torch, recipe.scale_dtype)
        report.recipe, report.format = recipe, f"online {recipe.scheme}"
        acts = recipe.input_activations
        for entry in build_entries(source, recipe, scheme_obj.alignment(recipe.args)):
            if entry.action == "quantize":
                quantized[entry.module] = ([entry.name], lambda t, n=entry.name: (
                    scheme_obj.quantize_weight(n, t[n], recipe.args, scale_dtype)))

    consumed = set()
    start_path_log()
    consumed |= _load_experts(model, source, quantized, acts, device, impl, dtype, report,
                              progress, woq_activations)
    items = list(quantized.items())
    fusing = fusable_groups(quantized, device, impl)
    pending: dict[tuple, dict] = {}  # (parent, children) -> {module: (qt, bias)} so far
    for module, (names, make) in (progress(items, "loading quantized layers")
                                  if progress else items):
        qt = make({n: source.read(n) for n in names})
        bias_name = f"{module}.bias"
        bias = source.read(bias_name).to(dtype) if bias_name in source.tensors else None
        consumed.update(names)
        consumed.add(bias_name)
        if module in fusing:
            parent, children = fusing[module]
            parts = pending.setdefault((parent, children), {})
            parts[module] = (qt, bias)
            if len(parts) == len(children):  # pop: the codes must not outlive the build
                _build_fused(model, parent, children, pending.pop((parent, children)), acts,
                             device, impl, dtype, report, woq_activations)
            continue
        layer = QuantLinear(qt, acts, bias, device, impl, name=module, dtype=dtype,
                            woq_activations=woq_activations)
        _set_submodule(model, module, layer)
        report.quantized[module] = layer
    for name in source.names():
        if name in consumed:
            continue
        if IGNORED_TENSORS.search(name):
            report.ignored.append(name)
            continue
        tensor_dtype = torch.float32 if keeps_fp32(model, name) else dtype
        _set_tensor(model, name, source.read(name).to(tensor_dtype).to(device))
    if report.ignored:
        log.info("ignored %d tensors the engine does not use (e.g. %s)", len(report.ignored),
                 report.ignored[0])
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    missing += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if missing:
        raise CheckpointError(
            f"{source.path}: the checkpoint has no tensor for {len(missing)} model parameters "
            f"(first: {', '.join(missing[:3])}); is it complete?")
    model.to(device)
    report.packed, fused = pack_dense_linears(model, device, dtype, impl)
    report.fused += fused
    if woq_activations == "int8" and not any(
            getattr(getattr(m, "fast", None), "int8_activations", False)
            for m in report.quantized.values()):
        log.warning("woq_activations int8: this model has no weight-only layer, so nothing "
                    "changes (W8A8 and unquantized layers keep their own paths)")
    return model, source, report

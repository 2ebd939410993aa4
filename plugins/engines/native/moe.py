"""MoE experts in the native engine: transformers' fused experts modules replaced by
:class:`FusedExperts`, which keeps every expert's weights quantized and runs
:func:`q.kernels.fused_moe.fused_moe`.

transformers 5 builds Mixtral / Qwen2-MoE / Qwen3-MoE / DeepSeek-V3 experts as one module
with 3-D ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` parameters, called as
``experts(hidden_states, top_k_index, top_k_weights)`` after the model's own router.
Checkpoints (and q's outputs) keep one Linear per expert and projection:
``mlp.experts.{e}.gate_proj`` (Qwen, DeepSeek) or ``block_sparse_moe.experts.{e}.w1``
(Mixtral, w1/w3/w2 = gate/up/down). Routers, shared experts and their gates stay
transformers' modules: routers and gates in bf16 (q never quantizes them), shared experts
as QuantLinear like any dense MLP.

Every expert tensor is checked before any is read: an expert missing a projection, or
experts that mix quantized and unquantized tensors (a lost scale), are a CheckpointError
naming the tensor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from q.errors import CheckpointError, IncompatibleError
from q.kernels import Impl
from q.kernels.fused_moe import ExpertWeights, fused_moe
from q.moe_experts import FAMILIES
from q.tensor import QuantizedTensor
from torch import nn

from .layers import (
    FP8_CODES,
    _fp8_act_dtype,
    _logged_kinds,
    choose_backend,
    choose_kind,
    describe_path,
    reference_layout,
)

log = logging.getLogger("q.engine")

ROLES = ("gate", "up", "down")


def expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """transformers' fused experts modules, by name."""
    found = {}
    for name, module in model.named_modules():
        gate_up = module._parameters.get("gate_up_proj")
        if gate_up is not None and gate_up.dim() == 3 and "down_proj" in module._parameters:
            layout = [flag for flag, bad in (("has_bias", True), ("is_transposed", True),
                                              ("is_concatenated", False), ("has_gate", False))
                      if getattr(module, flag, not bad) is bad]
            if layout:
                raise IncompatibleError(f"{name}: the native engine's fused MoE takes experts "
                                        f"with concatenated gate/up and no bias, not "
                                        f"{', '.join(layout)}; `--engine vllm` may serve it")
            found[name] = module
    return found


@dataclass
class ExpertPlan:
    """Where one experts module's tensors are in the checkpoint, checked complete."""

    module: str
    num_experts: int
    names: dict  # (expert, role) -> checkpoint module name
    quantized: dict  # role -> bool


def plan_experts(path, modules: dict[str, nn.Module], tensors, quantized: dict) -> list:
    """One :class:`ExpertPlan` per experts module; raises before anything is read."""
    plans = []
    for name, module in modules.items():
        layer = name.rsplit(".", 2)[0]  # model.layers.3.mlp.experts -> model.layers.3
        experts = module.gate_up_proj.shape[0]
        family = next((f for f in FAMILIES if f"{layer}.{f[0]}.0.{f[1]}" in quantized
                       or f"{layer}.{f[0]}.0.{f[1]}.weight" in tensors), None)
        if family is None:
            raise CheckpointError(f"{path}: no expert tensors for {name} (looked for "
                                  f"{layer}.mlp.experts.0.gate_proj.weight and "
                                  f"{layer}.block_sparse_moe.experts.0.w1.weight)")
        names, state, first = {}, {}, {}
        for e in range(experts):
            for role, proj in zip(ROLES, family[1:]):
                m = f"{layer}.{family[0]}.{e}.{proj}"
                is_quantized = m in quantized
                if not is_quantized and f"{m}.weight" not in tensors:
                    raise CheckpointError(f"{path}: '{m}.weight' is missing; the config says "
                                          f"{experts} experts per layer")
                key = "gate_up" if role != "down" else "down"
                if key not in state:
                    state[key], first[key] = is_quantized, m
                elif state[key] != is_quantized:
                    q_name, plain = (first[key], m) if state[key] else (m, first[key])
                    raise CheckpointError(
                        f"{path}: the experts of {layer} mix quantized and unquantized "
                        f"tensors: '{plain}.weight' is not quantized (its scale is missing?) "
                        f"while '{q_name}' is; re-quantize the model, or restore the "
                        "missing scale tensor")
                names[e, role] = m
        plans.append(ExpertPlan(name, experts, names,
                                {"gate": state["gate_up"], "up": state["gate_up"],
                                 "down": state["down"]}))
    return plans


def _channel_scales(qt: QuantizedTensor) -> QuantizedTensor:
    """A per-tensor scale as per-channel (so gate and up can share one tensor)."""
    if qt.granularity != "tensor":
        return qt
    n, k = qt.shape
    zero = None if qt.zero_point is None else qt.zero_point.reshape(1, 1).expand(n, 1)
    return QuantizedTensor(qt.qdata, qt.scale.reshape(1, 1).expand(n, 1).contiguous(), (1, k),
                           qt.orig_dtype, qt.bits, zero)


def fuse_gate_up(gate: QuantizedTensor, up: QuantizedTensor, name: str):
    """(one QuantizedTensor with gate's rows then up's, row where up starts). 128x128 blocks
    pad the gate rows to whole blocks so that no block mixes the two."""
    gate, up = _channel_scales(gate), _channel_scales(up)
    if gate.block_size != up.block_size or gate.qdata.dtype != up.qdata.dtype \
            or gate.bits != up.bits or (gate.zero_point is None) != (up.zero_point is None):
        raise CheckpointError(f"{name}: gate and up projections are quantized differently "
                              f"({gate.qdtype} blocks {gate.block_size} vs {up.qdtype} "
                              f"blocks {up.block_size})")
    codes, offset = gate.qdata, gate.shape[0]
    if gate.granularity == "block" and offset % gate.block_size[0]:
        offset += gate.block_size[0] - offset % gate.block_size[0]
        codes = torch.cat([codes, codes.new_zeros(offset - gate.shape[0], gate.shape[1])])

    def cat(a, b):
        return None if a is None else torch.cat([a, b])

    fused = QuantizedTensor(torch.cat([codes, up.qdata]), cat(gate.scale, up.scale),
                            gate.block_size, gate.orig_dtype, gate.bits,
                            cat(gate.zero_point, up.zero_point))
    return fused, offset


def _signature(qt: QuantizedTensor):
    return (qt.shape, qt.qdata.dtype, qt.bits, tuple(qt.block_size), qt.zero_point is None)


def stack_experts(parts: list, name: str, acts: dict | None, device, impl: str,
                  dtype: torch.dtype):
    """(ExpertWeights of one projection, backend, log line) from each expert's
    QuantizedTensor (or float weight)."""
    if not isinstance(parts[0], QuantizedTensor):
        weight = torch.stack(parts).to(dtype=dtype, device=device)
        w = ExpertWeights("dense", weight, None, tuple(weight.shape[1:]), len(parts))
        label = str(dtype).removeprefix("torch.")
        return w, ("reference" if Impl(impl) is Impl.reference else "torch"), \
            f"MoE experts, unquantized {label} weights -> fused_moe"
    parts = [_channel_scales(qt) for qt in parts]  # one [N, 1] scale layout per expert
    for e, qt in enumerate(parts):
        if _signature(qt) != _signature(parts[0]):
            raise CheckpointError(f"{name}: expert {e} is quantized as {qt.qdtype} blocks "
                                  f"{qt.block_size}, expert 0 as {parts[0].qdtype} blocks "
                                  f"{parts[0].block_size}; experts must match")
    first = parts[0]
    kind = choose_kind(first, acts, device, impl)
    backend, why = choose_backend(kind, first, device, impl, dtype, name)
    layouts = [reference_layout(qt, kind) for qt in parts]
    stacked = [None if layouts[0][i] is None else torch.stack([lay[i] for lay in layouts])
               .to(device) for i in range(3)]
    act_group, act_dtype = None, None
    if kind == "block":
        act_group, act_dtype = first.block_size[1], _fp8_act_dtype(acts)
    elif kind == "scaled":
        act_dtype = _fp8_act_dtype(acts) if first.qdata.dtype in FP8_CODES else torch.int8
    w = ExpertWeights(kind, stacked[0], stacked[1], first.shape, len(parts), stacked[2],
                      first.bits, layouts[0][3], tuple(first.block_size), act_group, act_dtype)
    path = describe_path(kind, first, backend, why, op="fused_moe")
    return w, backend, f"MoE experts, {path}"


class FusedExperts(nn.Module):
    """Drop-in for transformers' experts module: ``(hidden_states [T, H], top_k_index,
    top_k_weights) -> [T, H]``."""

    def __init__(self, name: str, gate_up: ExpertWeights, down: ExpertWeights,
                 intermediate: int, up_offset: int, act_fn, impl: str, pattern: str = ""):
        super().__init__()
        self.name = name
        # the --ignore glob that keeps these experts unquantized (checkpoint names)
        self.checkpoint_pattern = pattern or f"{name}.*"
        self.gate_up, self.down = gate_up, down
        self.intermediate, self.up_offset = intermediate, up_offset
        self.act_fn = act_fn
        self.impl = impl

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return fused_moe(hidden_states, top_k_index, top_k_weights, self.gate_up, self.down,
                         intermediate=self.intermediate, up_offset=self.up_offset,
                         act_fn=self.act_fn, impl=self.impl)

    def extra_repr(self) -> str:
        return (f"experts={self.gate_up.num_experts}, intermediate={self.intermediate}, "
                f"gate_up={self.gate_up.kind}, down={self.down.kind}")


def build_experts(plan: ExpertPlan, original: nn.Module, read, acts, device, impl: str,
                  dtype: torch.dtype) -> FusedExperts:
    """``read(module name)``: that expert projection's QuantizedTensor, or its float weight."""
    from q.kernels.fused_moe import torch_impl

    gate_up, down, offset = [], [], None
    for e in range(plan.num_experts):
        gate, up = read(plan.names[e, "gate"]), read(plan.names[e, "up"])
        if isinstance(gate, QuantizedTensor):
            fused, offset = fuse_gate_up(gate, up, plan.names[e, "gate"])
        else:
            fused, offset = torch.cat([gate, up]), gate.shape[0]
        gate_up.append(fused)
        down.append(read(plan.names[e, "down"]))
    intermediate = original.down_proj.shape[2]
    weights = []
    for parts, role in ((gate_up, "gate_up"), (down, "down")):
        w, backend, path = stack_experts(parts, f"{plan.module} ({role})", acts, device, impl,
                                         dtype)
        if backend == "torch":
            torch_impl.prepare(w, dtype)
        if path and path not in _logged_kinds:
            _logged_kinds.add(path)
            log.info("%s (first: %s)", path, plan.module)
        weights.append(w)
    impl = "auto" if Impl(impl) is Impl.torch else impl
    container = plan.names[0, "gate"].rsplit(".", 2)[0]  # ...block_sparse_moe.experts
    return FusedExperts(plan.module, weights[0], weights[1], intermediate, offset,
                        original.act_fn, impl, f"{container}.*")

"""SmoothQuant: which norm feeds which Linears (data per architecture), the smoothing factors,
and how they fold into a checkpoint's tensors.

Paper: Xiao et al., "SmoothQuant" (https://arxiv.org/abs/2211.10438), with the statistics of
mit-han-lab/smoothquant ``smooth.py`` and LMDeploy's absmax path (formats.md 3):

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

``max|X_j|`` is input channel j's largest magnitude over every calibration token, and
``max|W_j|`` the largest magnitude in column j of every Linear that reads the same activation
(q, k and v together; gate and up together). The preceding norm's weight is divided by ``s``
and each consumer's columns are multiplied by it, so ``(x / s) @ (W * s).T == x @ W.T``: the
float model computes the same function while activation outliers move into the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from q.kernels.numerics import abs_max

from .errors import CheckpointError, IncompatibleError

# The paper's floors (mit-han-lab smooth.py): a dead weight column must not divide by zero,
# and a tiny factor must not blow the norm weight up to inf.
WEIGHT_FLOOR = 1e-5
SCALE_FLOOR = 1e-5
ALPHA_GRID = tuple(i / 10 for i in range(11))

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


@dataclass(frozen=True)
class SmoothMapping:
    """A norm inside a decoder layer and the Linears that read its output (relative names).

    ``block`` is the submodule whose output ``--alpha auto`` scores (the attention or the
    MLP the consumers belong to); ``block_kwargs``: it takes the layer's call arguments
    (rotary embeddings, mask), as attention does.
    """

    norm: str
    consumers: tuple[str, ...]
    block: str = ""
    block_kwargs: bool = False


@dataclass(frozen=True)
class ArchSmoothing:
    """How to smooth one architecture.

    Attributes:
        mappings: norm -> consumers pairs inside every decoder layer.
        layers: checkpoint name prefix of the decoder layers.
        norm_offset: the norm computes ``x_hat * (norm_offset + weight)`` (Gemma: 1).
    """

    mappings: tuple[SmoothMapping, ...]
    layers: str = "model.layers"
    norm_offset: float = 0.0
    moe: bool = False


_ATTN = SmoothMapping("input_layernorm", QKV, "self_attn", block_kwargs=True)
_DENSE = ArchSmoothing((_ATTN, SmoothMapping("post_attention_layernorm", GATE_UP, "mlp")))
# Gemma 2/3 normalize the attention *output* with post_attention_layernorm; the MLP reads
# pre_feedforward_layernorm.
_GEMMA2 = ArchSmoothing((_ATTN, SmoothMapping("pre_feedforward_layernorm", GATE_UP, "mlp")),
                        norm_offset=1.0)
# MoE: attention only. One factor shared by every expert unbalances them, and the router
# must stay exact (llm-compressor's mappings make the same choice).
_ATTN_ONLY = ArchSmoothing((_ATTN,), moe=True)

ARCH_SMOOTHING: dict[str, ArchSmoothing] = {
    "llama": _DENSE, "mistral": _DENSE, "qwen2": _DENSE, "qwen3": _DENSE,
    "gemma": replace(_DENSE, norm_offset=1.0), "gemma2": _GEMMA2, "gemma3_text": _GEMMA2,
    "mixtral": _ATTN_ONLY, "qwen2_moe": _ATTN_ONLY, "qwen3_moe": _ATTN_ONLY,
}


def arch_smoothing(config: dict, path="model") -> ArchSmoothing:
    """The smoothing data for a config.json, or IncompatibleError naming the alternatives."""
    model_type = config.get("model_type")
    found = ARCH_SMOOTHING.get(model_type)
    if found is None:
        arch = (config.get("architectures") or [model_type])[0]
        raise IncompatibleError(
            f"{path}: SmoothQuant has no smoothing mapping for '{arch}' (model_type "
            f"'{model_type}'); supported: {', '.join(sorted(ARCH_SMOOTHING))}. Data-free "
            "schemes work on any architecture: --scheme w8a8-int8 (int8 W8A8 without "
            "smoothing), fp8-dynamic, fp8-block or wint8"
        )
    return found


# --- numerics -----------------------------------------------------------------------------


def column_abs_max(weights: list[torch.Tensor]) -> torch.Tensor:
    """max|W_j| over the rows of every weight (the consumers of one activation)."""
    return torch.stack([abs_max(w, dim=0) for w in weights]).amax(0)


def smoothing_factors(act_max: torch.Tensor, weight_max: torch.Tensor,
                      alpha: float) -> torch.Tensor:
    """``s = act_max**alpha / weight_max**(1 - alpha)`` with the paper's floors.

    Channels that never activated during calibration (``act_max == 0``) keep ``s = 1``: the
    data says nothing about them, and a floor-sized factor would inflate the norm weight.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = act_max.to(torch.promote_types(act_max.dtype, torch.float32))
    w = weight_max.to(a.dtype).clamp(min=WEIGHT_FLOOR)
    s = (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=SCALE_FLOOR)
    return torch.where(a > 0, s, torch.ones_like(s))


def fold_into_norm(weight: torch.Tensor, s: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """The norm weight whose output is the old output divided by ``s`` (float32 or wider).

    A norm computing ``x_hat * (offset + w)`` becomes ``x_hat * (offset + w')`` with
    ``w' = (offset + w) / s - offset``.
    """
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    return (w + offset) / s.to(w.dtype) - offset


def scale_columns(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``W * s`` per input column (float32 or wider)."""
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    return w * s.to(w.dtype)


def search_alpha(score, act_max: torch.Tensor, weight_max: torch.Tensor, grid=ALPHA_GRID):
    """The alpha of ``grid`` whose factors get the lowest ``score(s)``.

    Returns:
        ``(alpha, s, errors)`` with ``errors[alpha] = score(s)`` for every grid point.
    """
    errors, best = {}, None
    for alpha in grid:
        s = smoothing_factors(act_max, weight_max, alpha)
        errors[alpha] = score(s)
        if best is None or errors[alpha] < errors[best[0]]:
            best = (alpha, s)
    return best[0], best[1], errors


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    denom = ref.pow(2).sum().clamp(min=torch.finfo(torch.float32).tiny)
    return float((out - ref).pow(2).sum() / denom)


def linear_error(x: torch.Tensor, weights: list[torch.Tensor], fake_quant_act,
                 fake_quant_weight):
    """``score(s)``: how far ``Q(x / s) Q(W * s)^T`` is from ``x W^T`` over the consumers."""
    x = x.reshape(-1, x.shape[-1])
    w_cat = torch.cat([w.float() for w in weights])
    ref = x @ w_cat.T
    return lambda s: _relative_error(fake_quant_act(x / s) @ fake_quant_weight(w_cat * s).T,
                                     ref)


def block_error(layer: torch.nn.Module, mapping: SmoothMapping, x: torch.Tensor, call_args,
                fake_quant_act, fake_quant_weight):
    """``score(s)``: how far the mapping's block (attention or MLP) drifts from its float
    output when its consumers read ``Q(x / s)`` with weights ``Q(W * s)``, the rest of the
    block staying float. Scoring the block rather than the Linears alone is AWQ's choice
    (LMDeploy's ``--search-scale`` too): errors in q/k count as the attention sees them.
    """
    block = layer.get_submodule(mapping.block)
    linears = [layer.get_submodule(c) for c in mapping.consumers]
    originals = [lin.weight for lin in linears]
    args, kwargs = call_args if mapping.block_kwargs else ((), {})

    def run(inp):
        out = block(inp, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    ref = run(x)

    def score(s):
        xq = fake_quant_act((x / s).reshape(-1, x.shape[-1])).reshape(x.shape)
        try:
            for lin, w in zip(linears, originals):
                lin.weight = torch.nn.Parameter(fake_quant_weight(w.float() * s),
                                                requires_grad=False)
            return _relative_error(run(xq), ref)
        finally:
            for lin, w in zip(linears, originals):
                lin.weight = w

    return score


# --- the checkpoint transform -----------------------------------------------------------------


@dataclass
class PlannedMapping:
    """One norm -> consumers pair of one layer, by checkpoint tensor names."""

    key: str  # the norm module, "model.layers.3.input_layernorm"
    layer: int
    mapping: SmoothMapping
    norm_tensor: str
    consumer_tensors: tuple[str, ...]


@dataclass
class Smoothing:
    """Which tensors smoothing rewrites (known when planning) and the factors (filled by
    calibration). The write pass calls :meth:`apply` on each of them before quantizing or
    writing it, so smoothing costs no extra pass over the weights."""

    arch: ArchSmoothing
    planned: list[PlannedMapping]
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self._by_tensor: dict[str, tuple[str, PlannedMapping]] = {}
        for p in self.planned:
            self._by_tensor[p.norm_tensor] = ("norm", p)
            for name in p.consumer_tensors:
                self._by_tensor[name] = ("columns", p)

    @property
    def reasons(self) -> dict[str, str]:
        """Tensor name -> what smoothing does to it (for the plan)."""
        return {n: ("norm weight divided by the SmoothQuant factors" if kind == "norm"
                    else "columns multiplied by the SmoothQuant factors")
                for n, (kind, _) in self._by_tensor.items()}

    def layer_mappings(self, layer: int) -> list[PlannedMapping]:
        return [p for p in self.planned if p.layer == layer]

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The smoothed float32 tensor (shapes only on meta tensors)."""
        kind, planned = self._by_tensor[name]
        if tensor.device.type == "meta":
            return tensor.float()
        s = self.scales.get(planned.key)
        if s is None:  # internal invariant: execute() calibrates before writing
            raise RuntimeError(f"no smoothing factors for {planned.key}; calibrate first")
        if kind == "norm":
            return fold_into_norm(tensor, s, self.arch.norm_offset)
        return scale_columns(tensor, s)


def plan_smoothing(source, entries, arch: ArchSmoothing) -> Smoothing:
    """Every mapping of every layer whose consumers include at least one quantized Linear.

    A mapping whose consumers are all kept in bf16 is left alone (smoothing would only
    change rounding). A kept consumer of a smoothed mapping still gets its columns scaled,
    since its norm changes.
    """
    actions = {e.name: e.action for e in entries}
    layers = int(source.config.get("num_hidden_layers") or 0)
    planned = []
    for i in range(layers):
        for m in arch.mappings:
            key = f"{arch.layers}.{i}.{m.norm}"
            consumers = tuple(f"{arch.layers}.{i}.{c}.weight" for c in m.consumers)
            missing = [n for n in (f"{key}.weight", *consumers) if n not in source.tensors]
            if missing:
                raise CheckpointError(
                    f"{source.path}: SmoothQuant needs '{missing[0]}' (layer {i}) but the "
                    "checkpoint has no such tensor; is config.json the right one?"
                )
            if any(actions.get(n) == "quantize" for n in consumers):
                planned.append(PlannedMapping(key, i, m, f"{key}.weight", consumers))
    return Smoothing(arch, planned)


def fold_into_layer_(layer: torch.nn.Module, mapping: SmoothMapping, s: torch.Tensor,
                     offset: float = 0.0) -> None:
    """In place on a loaded decoder layer (tests and in-memory use)."""
    norm = layer.get_submodule(mapping.norm)
    norm.weight.data = fold_into_norm(norm.weight.data, s, offset).to(norm.weight.dtype)
    for c in mapping.consumers:
        lin = layer.get_submodule(c)
        lin.weight.data = scale_columns(lin.weight.data, s).to(lin.weight.dtype)


def calibrate_smoothing(smoothing: Smoothing, source, input_ids: torch.Tensor, alpha,
                        fake_quant_act=None, fake_quant_weight=None,
                        progress: bool | None = None) -> dict:
    """Fill ``smoothing.scales`` from one layer-by-layer pass over ``input_ids``.

    Args:
        alpha: a float in [0, 1], or ``"auto"`` to pick one per mapping from
            :data:`ALPHA_GRID` by :func:`block_error` on the first calibration windows
            (needs the scheme's fake-quant functions).

    Returns:
        A JSON-safe report for the manifest (the alphas used, per mapping when searched).
    """
    from .calibration import run_layers

    auto = alpha == "auto"
    if auto and (fake_quant_act is None or fake_quant_weight is None):
        raise ValueError("alpha='auto' needs the scheme's fake-quant functions")

    def on_layer(lc):
        for p in smoothing.layer_mappings(lc.index):
            weights = [lc.layer.get_submodule(c).weight for c in p.mapping.consumers]
            # every consumer reads the same tensor; take the max in case a hook saw a subset
            act = torch.stack([lc.act_max[c] for c in p.mapping.consumers]).amax(0)
            if auto:
                x = lc.samples[p.mapping.consumers[0]]
                score = (block_error(lc.layer, p.mapping, x, lc.sample_args, fake_quant_act,
                                     fake_quant_weight) if p.mapping.block else
                         linear_error(x, weights, fake_quant_act, fake_quant_weight))
                chosen, s, _ = search_alpha(score, act, column_abs_max(weights))
            else:
                chosen, s = alpha, smoothing_factors(act, column_abs_max(weights), alpha)
            smoothing.scales[p.key] = s.float()
            smoothing.alphas[p.key] = chosen

    if not smoothing.planned:  # every consumer is kept in bf16: nothing to smooth
        return {"alpha": alpha, "mappings": 0}
    sample = {p.mapping.consumers[0] for p in smoothing.planned} if auto else set()
    run_layers(source, input_ids, on_layer, sample_modules=sample, progress=progress)
    report = {"alpha": alpha, "mappings": len(smoothing.planned)}
    if auto:
        report["alphas"] = dict(smoothing.alphas)
    return report

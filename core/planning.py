"""The Plan: one decision per tensor (quantize / skip / copy) and the reason for it.

Rules, in order (first match wins):
1. Not a 2-D ``*.weight``: copied untouched (biases, norms, buffers, 3-D experts).
2. Embeddings: copied untouched (and ties stay ties: q never writes a tied lm_head).
3. ``--ignore`` patterns: skipped (kept in the model dtype, listed in the skip list).
4. ``--targets`` patterns (default ``Linear`` = every Linear): others are skipped.
5. Architecture rules matching what official FP8 releases leave in bf16 (lm_head, MoE
   routers, shared-expert gates, vision/audio towers, projectors, linear-attention gates,
   MTP heads), unless an explicit ``--targets`` pattern names the module.
6. Shapes that do not fit the scheme's blocks/groups (``--ragged skip``, the default).
7. Fused groups (q/k/v, gate/up) share one decision: vLLM refuses mixed shards.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

from .recipe import QuantRecipe

ARCH_SKIP_RULES: list[tuple[str, str]] = [
    (r"(.*\.)?lm_head$", "output head (official FP8 releases keep it in bf16)"),
    (r".*\.(mlp|block_sparse_moe|moe|feed_forward)\.(gate|router)$", "MoE router"),
    (r".*\.router$", "MoE router"),
    (r".*shared_expert_gate$", "MoE shared-expert gate"),
    (
        r"(.*\.)?(visual|vision_tower|vision_model|vision_encoder|image_encoder|"
        r"audio_tower|audio_model|audio_encoder)(\..*)?$",
        "vision/audio tower",
    ),
    (
        r"(.*\.)?(multi_modal_projector|mm_projector|vision_projection|mlp1)(\..*)?$",
        "multimodal projector",
    ),
    (r".*\.(in_proj_a|in_proj_b|in_proj_ba)$", "linear-attention gate (GDN)"),
    (r".*conv1d$", "linear-attention conv"),
    (r"(.*\.)?mtp(\..*)?$", "multi-token-prediction head"),
]
EMBEDDING_RE = re.compile(
    r"(.*\.)?(embed_tokens|embed_positions|wte|wpe|word_embeddings|position_embeddings|"
    r"token_type_embeddings|tok_embeddings|embeddings)$"
)
FUSED_GROUPS = [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3")]


def match_pattern(pattern: str, module: str) -> bool:
    """Exact module name, a glob (``*.mlp.*``) or ``re:<regex>`` (anchored at the start)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(module, pattern)
    return module == pattern


@dataclass
class PlanEntry:
    name: str
    action: str  # "quantize" | "skip" | "copy" | "rewrite" (changed, not quantized)
    reason: str
    shape: tuple[int, ...]
    dtype: str
    in_bytes: int
    module: str | None = None
    out_bytes: int = 0
    outputs: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "action": self.action, "reason": self.reason,
            "shape": list(self.shape), "dtype": self.dtype, "in_bytes": self.in_bytes,
            "out_bytes": self.out_bytes,
            "outputs": {k: [d, list(s)] for k, (d, s) in self.outputs.items()},
        }


@dataclass
class Plan:
    recipe: QuantRecipe
    format: str
    entries: list[PlanEntry]
    # things the user should know before running it (e.g. too little calibration data)
    warnings: list[str] = field(default_factory=list)
    # what executing the plan needs (source, format, jobs, output layout); set by q.plan()
    context: Any = field(default=None, repr=False, compare=False)

    @property
    def skipped_modules(self) -> list[str]:
        """Linear modules left in the model dtype: the format's skip list."""
        return [e.module for e in self.entries if e.action == "skip" and e.module]

    def counts(self) -> dict[str, int]:
        out = {"quantize": 0, "skip": 0, "copy": 0}
        for e in self.entries:
            out[e.action] = out.get(e.action, 0) + 1
        return out

    def totals(self) -> tuple[int, int]:
        return sum(e.in_bytes for e in self.entries), sum(e.out_bytes for e in self.entries)


def decide(
    name: str, shape: tuple[int, ...], recipe: QuantRecipe, alignment: tuple[int, int],
    tied: bool,
) -> tuple[str, str, str | None]:
    """(action, reason, module) for one tensor."""
    if not name.endswith(".weight") or len(shape) != 2:
        kind = "bias" if name.endswith(".bias") else f"{len(shape)}-D tensor, not a Linear weight"
        return "copy", kind, None
    module = name[: -len(".weight")]
    if EMBEDDING_RE.match(module):
        return "copy", "embedding", None
    for pattern in recipe.ignore:
        if match_pattern(pattern, module):
            return "skip", f"--ignore {pattern}", module
    explicit = [p for p in recipe.targets if p != "Linear"]
    named = any(match_pattern(p, module) for p in explicit)
    if "Linear" not in recipe.targets and not named:
        return "skip", "not matched by --targets", module
    if not named:
        for rule, reason in ARCH_SKIP_RULES:
            if re.match(rule, module):
                return "skip", reason, module
    if tied and module.endswith("lm_head"):
        return "skip", "tied to the input embeddings", module
    rows, cols = alignment
    n, k = shape
    if (n % rows or k % cols) and recipe.ragged == "skip":
        return "skip", (
            f"shape {n}x{k} is not a multiple of {rows}x{cols}: peer readers mis-load it "
            "(--ragged quantize to force, for q's engine)"
        ), module
    return "quantize", "Linear weight", module


def apply_fused_groups(entries: list[PlanEntry]) -> None:
    """Skip every member of a fused group when any member is skipped."""
    by_module = {e.module: e for e in entries if e.module}
    for entry in entries:
        if entry.action != "skip" or not entry.module or "." not in entry.module:
            continue
        parent, leaf = entry.module.rsplit(".", 1)
        for group in FUSED_GROUPS:
            if leaf not in group:
                continue
            for other in group:
                sibling = by_module.get(f"{parent}.{other}")
                if sibling is not None and sibling.action == "quantize":
                    sibling.action = "skip"
                    sibling.reason = (
                        f"fused with {leaf} (skipped) in vLLM, which needs one scheme "
                        "per fused layer"
                    )


def build_entries(source, recipe: QuantRecipe, alignment: tuple[int, int]) -> list[PlanEntry]:
    tied = bool(source.config.get("tie_word_embeddings", False))
    entries = []
    for name, info in source.tensors.items():
        action, reason, module = decide(name, info.shape, recipe, alignment, tied)
        entries.append(PlanEntry(
            name=name, action=action, reason=reason, shape=info.shape,
            dtype=str(info.dtype).removeprefix("torch."), in_bytes=info.nbytes, module=module,
        ))
    apply_fused_groups(entries)
    return entries


def mark_transformed(entries: list[PlanEntry], reasons: dict[str, str]) -> None:
    """Record what a calibrated scheme does to tensors besides quantizing them.

    Quantized and skipped Linears keep their action and gain the reason; copied tensors
    (norms) become ``rewrite``: they are written in their dtype with new values.
    """
    for entry in entries:
        reason = reasons.get(entry.name)
        if reason is None:
            continue
        if entry.action == "copy":
            entry.action, entry.reason = "rewrite", reason
        else:
            entry.reason = f"{entry.reason}; {reason}"

"""QuantRecipe: frozen, versioned description of a quantization run, stored in every output.

Serialized as ``{"type": "QuantRecipe", "version": N, "data": {...}}`` (torchao's config
envelope). Loading refuses other types and newer versions instead of guessing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import CheckpointError

RECIPE_VERSION = 1
RECIPE_FILE = "q_recipe.json"


@dataclass(frozen=True)
class QuantRecipe:
    """What to quantize and how.

    Args:
        scheme: registered scheme id, kebab-case (``fp8-block``).
        args: the scheme's validated arguments (JSON-safe values).
        targets: patterns of Linear modules to quantize (``Linear`` = every Linear).
        ignore: patterns of modules left in the model dtype (exact, glob or ``re:``).
        ragged: ``skip`` leaves Linears whose dims do not fit the scheme's blocks or groups
            in the model dtype; ``quantize`` quantizes them with ceil-div scale grids.
        scale_dtype: storage dtype of scales (chosen by the output format).
        weights: how weights are stored, in compressed-tensors' vocabulary so every format
            can map it without knowing scheme names: ``type`` (float/int), ``num_bits``,
            ``strategy`` (tensor/channel/group/block), ``group_size``,
            ``block_structure``, ``symmetric``, and ``fp8_dtype`` for floats.
        input_activations: what the runtime does to activations (same keys plus
            ``dynamic``), or None for weight-only schemes.
        version: recipe schema version.
    """

    scheme: str
    args: dict[str, Any] = field(default_factory=dict)
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ()
    ragged: str = "skip"
    scale_dtype: str = "float32"
    weights: dict[str, Any] = field(default_factory=dict)
    input_activations: dict[str, Any] | None = None
    version: int = RECIPE_VERSION

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        object.__setattr__(self, "args", dict(self.args))
        object.__setattr__(self, "weights", dict(self.weights))
        if self.ragged not in ("skip", "quantize"):
            raise ValueError(f"ragged must be 'skip' or 'quantize', got {self.ragged!r}")

    def __hash__(self):
        return hash(self.to_json())

    def replace(self, **changes) -> "QuantRecipe":
        data = asdict(self)
        data.update(changes)
        return QuantRecipe(**data)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["targets"], data["ignore"] = list(self.targets), list(self.ignore)
        version = data.pop("version")
        return {"type": "QuantRecipe", "version": version, "data": data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, obj: dict) -> "QuantRecipe":
        if not isinstance(obj, dict) or obj.get("type") != "QuantRecipe":
            raise CheckpointError(f"not a QuantRecipe: {str(obj)[:80]}")
        version = obj.get("version")
        if not isinstance(version, int) or version > RECIPE_VERSION:
            raise CheckpointError(
                f"recipe version {version} is newer than this q understands "
                f"({RECIPE_VERSION}); upgrade q"
            )
        return cls(**obj["data"], version=version)

    @classmethod
    def from_json(cls, text: str) -> "QuantRecipe":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"recipe is not valid JSON: {exc}") from None


def weight_spec(type_: str, num_bits: int, strategy: str, *, group_size=None, block=None,
                fp8_dtype: str | None = None, symmetric: bool = True) -> dict[str, Any]:
    """A ``QuantRecipe.weights`` dict."""
    spec = {"type": type_, "num_bits": num_bits, "strategy": strategy,
            "group_size": group_size, "block_structure": list(block) if block else None,
            "symmetric": symmetric}
    if type_ == "float":
        spec["fp8_dtype"] = fp8_dtype or "e4m3"
    return spec


def activation_spec(type_: str, strategy: str, group_size: int | None = None) -> dict[str, Any]:
    """A dynamic ``QuantRecipe.input_activations`` dict (8-bit)."""
    return {"type": type_, "num_bits": 8, "strategy": strategy, "group_size": group_size,
            "dynamic": True, "symmetric": True}

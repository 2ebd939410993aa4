"""Fused MoE expert parameters, assembled from checkpoints that store one tensor per expert.

transformers 5 builds Mixtral / Qwen2-MoE / Qwen3-MoE experts as two 3-D parameters,
``experts.gate_up_proj`` ``[E, 2I, H]`` (each expert's gate rows, then its up rows) and
``experts.down_proj`` ``[E, H, I]``, and fuses the checkpoint's per-expert Linears into them
while loading (its conversion mapping: stack the experts, then concatenate gate and up).
Published checkpoints, and what transformers itself saves, keep one tensor per expert:
``mlp.experts.{e}.gate_proj.weight`` (Qwen) or ``block_sparse_moe.experts.{e}.w1.weight``
(Mixtral, whose ``block_sparse_moe`` transformers renames to ``mlp``). Layer-by-layer
calibration reads parameters by model name, so it asks here for the ones the checkpoint
lacks. tests/test_smoothquant.py checks the result against transformers' own loading.
"""

from __future__ import annotations

import re

import torch

from .errors import CheckpointError

# (checkpoint container, gate, up, down) per naming family; the engine reads them too
FAMILIES = (("mlp.experts", "gate_proj", "up_proj", "down_proj"),
             ("block_sparse_moe.experts", "w1", "w3", "w2"))
_FUSED = re.compile(r"^(?P<layer>.+)\.mlp\.experts\.(?P<which>gate_up_proj|down_proj)$")


def checkpoint_name(source, name: str) -> str | None:
    """The checkpoint's name for a plain (not fused) model parameter, or None."""
    if name in source.tensors:
        return name
    renamed = name.replace(".mlp.", ".block_sparse_moe.", 1)  # Mixtral's router
    return renamed if renamed in source.tensors else None


def fused_expert_tensor(source, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """``name`` built from per-expert tensors (fp32), or None if it is not a fused expert
    parameter this checkpoint can provide."""
    match = _FUSED.match(name)
    if match is None or len(shape) != 3:
        return None
    layer, which, experts = match["layer"], match["which"], shape[0]
    for container, gate, up, down in FAMILIES:
        prefix = f"{layer}.{container}"
        if f"{prefix}.0.{gate}.weight" not in source.tensors:
            continue
        parts = []
        for e in range(experts):
            names = [f"{prefix}.{e}.{p}.weight" for p in
                     ((gate, up) if which == "gate_up_proj" else (down,))]
            missing = [n for n in names if n not in source.tensors]
            if missing:
                raise CheckpointError(f"{source.path}: '{missing[0]}' is missing; the config "
                                      f"says {experts} experts per layer")
            parts.append(torch.cat([source.read(n).float() for n in names], dim=0))
        fused = torch.stack(parts)
        if tuple(fused.shape) != tuple(shape):
            return None
        return fused
    return None

"""Sibling projections fused into one GEMM: q/k/v, and gate/up.

transformers' attention calls ``q_proj``, ``k_proj`` and ``v_proj`` on the same hidden
states, and its MLPs ``gate_proj`` and ``up_proj``. The engine stacks each such group's
weights into one matrix at load (one product of N = the sum of their widths instead of two
or three calls; vLLM's models do the same with ``QKVParallelLinear`` and
``MergedColumnParallelLinear``). The model's modules stay where transformers expects them:
each becomes a :class:`FusedPart` that returns its columns of the group's product. The first
part called with an input runs the product and keeps it; its siblings, called with that
very tensor object, take their columns (the same reuse rule as the layers' shared
activation quantization). A part called with a tensor the group has not seen runs the
product itself, so the result is right whatever the model does, only slower.

At M = 1 each oneDNN call costs a fixed overhead beyond its bytes, so 7 calls per layer
becoming 4 pays at decode; at large M it can cost a little (docs/benchmarks.md has both).
The product is dropped once every part has taken its columns: kept across steps, a
2048-token prefill's products would stay alive in every layer.
"""

from __future__ import annotations

import torch
from torch import nn

from q.tensor import QuantizedTensor

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def sibling_groups(names) -> list[tuple[str, tuple[str, ...]]]:
    """(parent, children) for every complete sibling group among module ``names``."""
    present = set(names)
    groups = []
    for name in sorted(present):
        parent, _, child = name.rpartition(".")
        for children in SIBLINGS:
            if child == children[0] and all(f"{parent}.{c}" in present for c in children):
                groups.append((parent, children))
    return groups


class FusedGroup:
    """One product for several projections of the same input (``layer`` maps ``[M, K]`` to
    ``[M, sum(widths)]``)."""

    def __init__(self, layer, widths: list[int], in_features: int, name: str):
        self.layer, self.widths, self.in_features, self.name = layer, widths, in_features, name
        self.offsets = [sum(widths[:i]) for i in range(len(widths) + 1)]
        self.entry = None  # [input, version, output, parts not served yet]

    def output(self, x: torch.Tensor) -> torch.Tensor:
        version = None if x.is_inference() else x._version
        e = self.entry
        if e is None or e[0] is not x or e[1] != version:
            e = [x, version, self.layer(x.reshape(-1, self.in_features)), len(self.widths)]
        e[3] -= 1
        self.entry = e if e[3] > 0 else None  # every part served: hold nothing
        return e[2]


class FusedPart(nn.Module):
    """Stands where one projection was; returns its columns of the group's product."""

    replaces_linear = True  # q eval hooks it as the Linear it stands for

    def __init__(self, group: FusedGroup, index: int):
        super().__init__()
        self.group, self.index = group, index
        self.in_features = group.in_features
        self.out_features = group.widths[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.group
        y = g.output(x)[:, g.offsets[self.index]:g.offsets[self.index + 1]]
        return y.view(*x.shape[:-1], self.out_features)

    def __getattr__(self, name):  # kind, backend, path, bits...: the fused layer's
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self.__dict__.get("group").layer
            if name.startswith("_") or not hasattr(layer, name):
                raise
            return getattr(layer, name)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"part {self.index} of {self.group.name}")


def install(model: nn.Module, parent: str, children: tuple[str, ...], layer,
            widths: list[int], in_features: int) -> list[FusedPart]:
    """Put the parts of ``layer`` (the fused product) where ``children`` of ``parent`` were."""
    owner = model.get_submodule(parent)
    # the fused layer is not registered as a submodule: hooks and named_modules() see the
    # parts, as they saw the projections
    group = FusedGroup(layer, widths, in_features, f"{parent}.{'+'.join(children)}")
    parts = []
    for i, child in enumerate(children):
        part = FusedPart(group, i)
        setattr(owner, child, part)
        parts.append(part)
    return parts


def stack_quantized(qts: list[QuantizedTensor]) -> QuantizedTensor | None:
    """The projections' codes, scales and zero points stacked by rows into one tensor, or
    None where the stack would not mean the same products: different code types, bits,
    column blocks or zero-point use; per-tensor scales (one each); row blocks (fp8 128x128)
    that a part's height does not fill."""
    first = qts[0]
    bn, bk = first.block_size
    same = all(t.qdata.dtype == first.qdata.dtype and t.bits == first.bits
               and t.shape[1] == first.shape[1] and tuple(t.block_size)[1] == bk
               and (t.zero_point is None) == (first.zero_point is None) for t in qts)
    if not same or any(t.granularity == "tensor" for t in qts):
        return None  # mixed layouts, or per-tensor scales
    if any(t.block_size[0] != bn or t.shape[0] % bn for t in qts):
        return None
    zero = None if first.zero_point is None else torch.cat([t.zero_point for t in qts])
    return QuantizedTensor(torch.cat([t.qdata for t in qts]), torch.cat([t.scale for t in qts]),
                           tuple(first.block_size), first.orig_dtype, first.bits, zero)

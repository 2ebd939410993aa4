"""q.kernels.fused_moe: the reference against a token-by-token loop, and torch's CPU kernels
against the reference, on ragged routings (an expert with no tokens, every token on one
expert, top-k > 1) and every weight kind the engine builds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from q.kernels.act_quant.reference import quantize_activation
from q.kernels.fp8_block.reference import quantize_fp8_block
from q.kernels.fused_moe import ExpertWeights, fused_moe, route, torch_impl
from q.kernels.numerics import codes_to_float, mul_blocks_
from q.kernels.packing.reference import pack_int4_bytes
from q.kernels.weight_only_gemm.reference import dequantize_weight

from .test_kernels_torch import BF16_BOUND, rel_err

E, H, INTER = 4, 128, 96
# activation-quantized kinds: the intermediate rows differ by bf16 roundings between two
# implementations, and that moves some of their int8 / fp8 codes a step (see below)
ACT_QUANT_BOUND = 0.04
ACT_QUANT_KINDS = ("scaled-int8", "scaled-fp8", "block")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def expert_weights(kind: str, n: int, k: int, seed: int, bits: int = 4, group: int = 32,
                   asym: bool = False) -> ExpertWeights:
    g = _gen(seed)
    w = torch.randn(E, n, k, generator=g) * 0.05
    if kind == "dense":
        return ExpertWeights("dense", w, None, (n, k), E)
    if kind == "weight-only":
        qmax = 2 ** (bits - 1)
        codes = torch.randint(-qmax, qmax, (E, n, k), generator=g, dtype=torch.int8)
        scale = torch.rand(E, n, -(-k // group), generator=g) * 0.01 + 1e-3
        zero = torch.randint(-3, 3, scale.shape, generator=g).float() if asym else None
        stored = torch.stack([pack_int4_bytes(c) for c in codes]) if bits == 4 else codes
        return ExpertWeights("weight-only", stored, scale, (n, k), E, zero, bits, group)
    if kind == "scaled-int8":
        codes = torch.randint(-127, 128, (E, n, k), generator=g, dtype=torch.int8)
        scale = torch.rand(E, n, 1, generator=g) * 0.001 + 1e-4
        return ExpertWeights("scaled", codes, scale, (n, k), E, bits=8, act_dtype=torch.int8)
    if kind == "scaled-fp8":
        amax = w.abs().amax(-1, keepdim=True)
        scale = amax / 448
        codes = (w / scale).to(torch.float8_e4m3fn)
        return ExpertWeights("scaled", codes, scale, (n, k), E, bits=8,
                             act_dtype=torch.float8_e4m3fn)
    parts = [quantize_fp8_block(w[e], (128, 128)) for e in range(E)]  # block
    return ExpertWeights("block", torch.stack([p[0] for p in parts]),
                         torch.stack([p[1] for p in parts]), (n, k), E, bits=8,
                         block=(128, 128), act_group=128, act_dtype=torch.float8_e4m3fn)


def dequantized(w: ExpertWeights, e: int) -> torch.Tensor:
    n, k = w.shape
    if w.kind == "dense":
        return w.qdata[e].float()
    if w.kind == "weight-only":
        zero = None if w.zero_point is None else w.zero_point[e]
        return dequantize_weight(w.qdata[e], w.scale[e], k, w.group_size, w.bits, zero)
    block = w.block if w.kind == "block" else (1, k)
    return mul_blocks_(codes_to_float(w.qdata[e]), w.scale[e], block)


def fake_quant(w: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
    if w.act_dtype is None:
        return x.float()
    xq, xs = quantize_activation(x, w.act_group, w.act_dtype)
    return mul_blocks_(codes_to_float(xq), xs, (1, w.act_group or x.shape[1]))


def token_loop(x, ids, weights, gate_up, down) -> torch.Tensor:
    """The MoE as written in the papers: each token, each of its experts, weighted sum."""
    out = torch.zeros(x.shape[0], H)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gu = fake_quant(gate_up, x[t:t + 1]) @ dequantized(gate_up, e).t()
            h = F.silu(gu[:, :INTER]) * gu[:, INTER:]
            out[t] += weights[t, j] * (fake_quant(down, h) @ dequantized(down, e).t())[0]
    return out


ROUTINGS = {
    "spread": lambda t, k, g: torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(t)]),
    "one-expert-idle": lambda t, k, g: torch.stack(
        [torch.randperm(E - 1, generator=g)[:k] for _ in range(t)]),  # expert 3: no tokens
    "all-on-one": lambda t, k, g: torch.full((t, k), 2) if k == 1 else torch.stack(
        [torch.tensor([2, 0])] * t),
}

KINDS = [("dense", {}), ("weight-only", {"bits": 4}), ("weight-only", {"bits": 4, "asym": True}),
         ("weight-only", {"bits": 8, "group": 128}), ("scaled-int8", {}), ("scaled-fp8", {}),
         ("block", {})]
KIND_IDS = ["dense", "int4", "int4-asym", "int8", "w8a8-int8", "w8a8-fp8", "fp8-block"]


def _case(kind, opts, routing, tokens, top_k):
    g = _gen(7)
    x = torch.randn(tokens, H, generator=g)
    ids = ROUTINGS[routing](tokens, top_k, g)
    weights = torch.rand(tokens, top_k, generator=g)
    gate_up = expert_weights(kind, 2 * INTER, H, 1, **opts)
    down = expert_weights(kind, H, INTER, 2, **opts)
    return x, ids, weights, gate_up, down


@pytest.mark.parametrize("kind,opts", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("routing", sorted(ROUTINGS))
@pytest.mark.parametrize("tokens,top_k", [(1, 1), (5, 2), (17, 2)])
def test_reference_equals_a_token_by_token_loop(kind, opts, routing, tokens, top_k):
    x, ids, weights, gate_up, down = _case(kind, opts, routing, tokens, top_k)
    got = fused_moe(x, ids, weights, gate_up, down, intermediate=INTER, impl="reference")
    # the same fp32 products summed in another order: fp32 rounding, which can move an fp8
    # activation code by one step (3.5e-6 seen), where a routing mistake would be O(1)
    assert rel_err(got, token_loop(x, ids, weights, gate_up, down)) < 1e-5


@pytest.mark.parametrize("kind,opts", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("routing", sorted(ROUTINGS))
@pytest.mark.parametrize("tokens,top_k", [(1, 2), (40, 2)])
def test_torch_cpu_kernels_match_reference(kind, opts, routing, tokens, top_k):
    """bf16 activations and torch's kernels: within the bf16 bound of the dense kernels."""
    x, ids, weights, gate_up, down = _case(kind, opts, routing, tokens, top_k)
    # the reference also gets bf16 activations, so its intermediate rows round to bf16 before
    # their activation quantization as the kernels' do (else 3% of fp8 codes move a step)
    x = x.bfloat16()
    want = fused_moe(x, ids, weights, gate_up, down, intermediate=INTER,
                     impl="reference").float()
    for w in (gate_up, down):
        torch_impl.prepare(w, torch.bfloat16)
    got = fused_moe(x, ids, weights, gate_up, down, intermediate=INTER, impl="auto")
    assert got.dtype == torch.bfloat16
    # weight-only and bf16: the dense kernels' bf16 bound, twice (two GEMMs in a row).
    # Quantized activations: the intermediate rows differ by bf16 roundings between the two
    # paths, which moves some of their fp8 (3 mantissa bits) or int8 codes by one step:
    # 1.6-3.0% at the output in these cases; a routing or scale mistake is O(1)
    bound = ACT_QUANT_BOUND if kind in ACT_QUANT_KINDS else 2 * BF16_BOUND
    assert rel_err(got.float(), want) < bound
    if kind in ("weight-only", "scaled-int8"):
        assert gate_up.qdata is None  # held once: only the packed per-expert kernels remain


def test_block_gate_rows_padded_to_a_whole_block():
    """fp8 128x128 blocks with I = 96: the up rows start at 128 (``up_offset``)."""
    g = _gen(3)
    x = torch.randn(6, H, generator=g)
    ids = torch.randint(0, E, (6, 2), generator=g)
    weights = torch.rand(6, 2, generator=g)
    w = torch.randn(E, 2 * INTER, H, generator=g) * 0.05
    padded = torch.cat([w[:, :INTER], torch.zeros(E, 128 - INTER, H), w[:, INTER:]], dim=1)
    parts = [quantize_fp8_block(padded[e], (128, 128)) for e in range(E)]
    gate_up = ExpertWeights("block", torch.stack([p[0] for p in parts]),
                            torch.stack([p[1] for p in parts]), (128 + INTER, H), E, bits=8,
                            block=(128, 128), act_group=128, act_dtype=torch.float8_e4m3fn)
    down = expert_weights("block", H, INTER, 2)
    got = fused_moe(x, ids, weights, gate_up, down, intermediate=INTER, up_offset=128,
                    impl="reference")
    gu_plain = ExpertWeights("dense", torch.stack(
        [torch.cat([dequantized(gate_up, e)[:INTER], dequantized(gate_up, e)[128:]])
         for e in range(E)]), None, (2 * INTER, H), E, act_dtype=torch.float8_e4m3fn,
        act_group=128)
    assert rel_err(got, token_loop(x, ids, weights, gu_plain, down)) < 1e-5


def test_route_sorts_stably_and_counts():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])
    order, offsets = route(ids, 4)
    assert offsets == [0, 2, 3, 6, 6]
    assert order.tolist() == [1, 4, 3, 0, 2, 5]


def test_out_of_range_expert_ids_are_refused():
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 4\), got 0..4"):
        route(torch.tensor([[0, 4]]), 4)

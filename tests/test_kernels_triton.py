"""Each Triton kernel against its torch reference, run by Triton's CPU interpreter.

``@triton.jit`` reads TRITON_INTERPRET when a kernel module is imported, so it is set before
the ``triton_impl`` modules load; the process environment is then restored so other test
modules see it as they found it, and a fixture sets it again (for the dispatcher, which reads
it per call) only while these tests run. The interpreter is slow: shapes stay small.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

from q.kernels import act_quant, block_gemm, scaled_gemm, weight_only_gemm
from q.kernels.numerics import ceil_div
from q.kernels.packing.reference import pack_int4_bytes
from q.testing import assert_bitwise_equal

from . import test_kernels_moe

_PREVIOUS = os.environ.get("TRITON_INTERPRET")
os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    if os.environ["TRITON_INTERPRET"] != "1":
        pytest.skip("TRITON_INTERPRET is set to something other than 1", allow_module_level=True)
    pytest.importorskip("triton")
    from q.kernels.act_quant import triton_impl as aq_triton
    from q.kernels.block_gemm import triton_impl as bg_triton
    from q.kernels.fused_moe import triton_impl as moe_triton
    from q.kernels.scaled_gemm import triton_impl as sg_triton
    from q.kernels.weight_only_gemm import triton_impl as wo_triton
finally:
    if _PREVIOUS is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS

if type(aq_triton._act_quant_kernel).__name__ != "InterpretedFunction":
    pytest.skip("the Triton kernels were imported earlier without the interpreter",
                allow_module_level=True)

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
MS = [1, 5, 33]
NKS = [(128, 256), (200, 300), (96, 576)]
GEMM_SHAPES = [(m, n, k) for m in MS for n, k in NKS]


def shape_id(s):
    return "x".join(str(v) for v in s)


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def gen(*key):
    """A generator seeded from the test case, so each case draws its own inputs."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def rel_err(y, ref):
    ref = ref.double()
    return float((y.double() - ref).norm() / ref.norm().clamp(min=1e-300))


def run_triton(monkeypatch, op_module, name, *args, impl="triton"):
    """The public op with ``impl="triton"`` while its reference raises: proves Triton ran."""
    def refuse(*_a, **_k):
        raise AssertionError(f"{name} ran its torch reference, not the Triton kernel")

    with monkeypatch.context() as mp:
        mp.setattr(op_module.reference, name, refuse)
        return getattr(op_module, name)(*args, impl=impl)


def fp8_codes(shape, dtype, g):
    return (torch.randn(shape, generator=g) * 40).to(dtype)


# ---- activation quantization: bit-exact codes and scales ----

def activations(m, k, dtype, g):
    x = torch.randn(m, k, generator=g) * (torch.rand(m, 1, generator=g) * 8 + 0.1)
    x[0, :5] = torch.tensor([0.5, -1.5, 2.5, 126.5, -300.0])  # ties and an outlier
    if m > 2:
        x[2] = 0  # an all-zero token: tiny scale, zero codes
    return x.to(dtype)


@pytest.mark.parametrize("qdtype", [E4M3, E5M2, torch.int8], ids=["e4m3", "e5m2", "int8"])
@pytest.mark.parametrize("group", [128, None], ids=["g128", "token"])
@pytest.mark.parametrize("mk", [(1, 256), (5, 300), (33, 576)], ids=shape_id)
def test_act_quant_bit_exact(monkeypatch, qdtype, group, mk):
    x = activations(*mk, torch.float32, gen("aq", qdtype, group, mk))
    q_ref, s_ref = act_quant.reference.quantize_activation(x, group, qdtype)
    q, s = run_triton(monkeypatch, act_quant, "quantize_activation", x, group, qdtype)
    assert_bitwise_equal(s, s_ref, "scales")
    assert_bitwise_equal(q, q_ref, "codes")


@pytest.mark.parametrize("case", [
    (torch.bfloat16, 64, E4M3, None), (torch.float16, 100, torch.int8, None),
    (torch.bfloat16, None, torch.int8, None), (torch.float32, 1000, E5M2, None),
    # per-token and wide groups in two passes over narrow chunks
    (torch.float32, None, E4M3, {"ONE_PASS_MAX": 256, "CHUNK": 128}),
    (torch.bfloat16, 200, torch.int8, {"ONE_PASS_MAX": 128, "CHUNK": 64}),
    (torch.float32, 128, E4M3, {"TILE": 128}),
], ids=lambda c: f"{str(c[0])[6:]}-g{c[1]}-{str(c[2])[6:]}{'-cfg' if c[3] else ''}")
def test_act_quant_dtypes_groups_and_passes(case):
    xdtype, group, qdtype, config = case
    x = activations(3, 1100, xdtype, gen("aq2", str(case)))
    q_ref, s_ref = act_quant.reference.quantize_activation(x, group, qdtype)
    q, s = aq_triton.quantize_activation(x, group, qdtype, config=config)
    assert_bitwise_equal(s, s_ref, "scales")
    assert_bitwise_equal(q, q_ref, "codes")


def test_act_quant_wide_row_and_strided_input(monkeypatch):
    big = activations(2, 6000, torch.float32, gen("aq3"))  # K above the one-pass limit
    x = big[:, :5000]  # row stride 6000
    for group in (None, 128):
        q_ref, s_ref = act_quant.reference.quantize_activation(x, group, E4M3)
        q, s = run_triton(monkeypatch, act_quant, "quantize_activation", x, group, E4M3)
        assert_bitwise_equal(s, s_ref, f"scales g={group}")
        assert_bitwise_equal(q, q_ref, f"codes g={group}")


def test_auto_picks_triton_under_the_interpreter(monkeypatch):
    x = activations(2, 256, torch.float32, gen("auto"))
    ref = act_quant.reference.quantize_activation(x, 128, E4M3)
    q, s = run_triton(monkeypatch, act_quant, "quantize_activation", x, 128, E4M3, impl="auto")
    assert_bitwise_equal(q, ref[0])
    assert_bitwise_equal(s, ref[1])


# ---- fp8 block-scaled GEMM ----

def block_operands(m, n, k, dtype, g, block=(128, 128)):
    xq, wq = fp8_codes((m, k), dtype, g), fp8_codes((n, k), dtype, g)
    xs = torch.rand(m, ceil_div(k, block[1]), generator=g) + 0.5
    ws = torch.rand(ceil_div(n, block[0]), ceil_div(k, block[1]), generator=g) + 0.5
    return xq, xs, wq, ws


@pytest.mark.parametrize("mnk", GEMM_SHAPES, ids=shape_id)
def test_block_gemm_fp32(monkeypatch, mnk):
    ops = block_operands(*mnk, E4M3, gen("bg", mnk))
    ref = block_gemm.reference.fp8_block_gemm(*ops, (128, 128), torch.float32)
    y = run_triton(monkeypatch, block_gemm, "fp8_block_gemm", *ops, (128, 128), torch.float32)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert rel_err(y, ref) <= 1e-5


@pytest.mark.parametrize("case", [
    ((5, 200, 300), E5M2, (128, 128), torch.bfloat16, None),
    ((33, 96, 576), E4M3, (128, 128), torch.bfloat16, {"SPLIT_K": 3, "BLOCK_N": 32}),
    ((1, 200, 300), E4M3, (64, 128), torch.float32, {"SPLIT_K": 2}),
    ((17, 96, 256), E4M3, (128, 64), torch.float32, {"BLOCK_M": 32, "GROUP_M": 2}),
], ids=["e5m2-bf16", "split3-bf16", "bn64-split2", "bk64-grouped"])
def test_block_gemm_variants(case):
    mnk, dtype, block, out_dtype, config = case
    ops = block_operands(*mnk, dtype, gen("bg2", str(case)), block)
    ref = block_gemm.reference.fp8_block_gemm(*ops, block, out_dtype)
    y = bg_triton.fp8_block_gemm(*ops, block, out_dtype, config=config)
    assert y.dtype == out_dtype
    assert rel_err(y, ref) <= (1e-5 if out_dtype == torch.float32 else 1e-2)


def test_block_gemm_validates():
    xq, xs, wq, ws = block_operands(2, 128, 256, E4M3, gen("bg3"))
    with pytest.raises(ValueError, match="weight scales"):
        bg_triton.fp8_block_gemm(xq, xs, wq, ws[:, :1])


# ---- W8A8 scaled GEMM ----

def scaled_operands(m, n, k, dtype, per_tensor, g):
    if dtype == torch.int8:
        xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
        wq = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    else:
        xq, wq = fp8_codes((m, k), dtype, g), fp8_codes((n, k), dtype, g)
    xs = torch.rand(m, 1, generator=g) + 0.5
    ws = torch.rand(1 if per_tensor else n, 1, generator=g) + 0.5
    return xq, xs, wq, ws


def int_scaled(xq, xs, wq, ws):
    """int8 codes summed exactly, then scaled once in fp32: what the kernel computes."""
    acc = xq.double() @ wq.double().T  # exact: |sum| < 2**53
    return acc.float() * xs * ws.reshape(1, -1)


@pytest.mark.parametrize("dtype", [E4M3, torch.int8], ids=["fp8", "int8"])
@pytest.mark.parametrize("mnk", GEMM_SHAPES, ids=shape_id)
def test_scaled_gemm_fp32(monkeypatch, dtype, mnk):
    ops = scaled_operands(*mnk, dtype, mnk[0] == 5, gen("sg", dtype, mnk))
    ref = scaled_gemm.reference.scaled_gemm(*ops, torch.float32)
    y = run_triton(monkeypatch, scaled_gemm, "scaled_gemm", *ops, torch.float32)
    assert rel_err(y, ref) <= 1e-5
    if dtype == torch.int8:
        assert_bitwise_equal(y, int_scaled(*ops), "int8 accumulates exactly")


@pytest.mark.parametrize("case", [
    ((5, 200, 300), torch.int8, False, torch.bfloat16, None),
    ((33, 96, 576), E5M2, True, torch.bfloat16, None),
    ((33, 200, 300), torch.int8, False, torch.float32, {"SPLIT_K": 3, "BLOCK_K": 64}),
    ((1, 128, 576), E4M3, False, torch.float32, {"SPLIT_K": 2, "BLOCK_K": 128}),
], ids=["int8-bf16", "e5m2-tensor-bf16", "int8-split3", "fp8-split2"])
def test_scaled_gemm_variants(case):
    mnk, dtype, per_tensor, out_dtype, config = case
    ops = scaled_operands(*mnk, dtype, per_tensor, gen("sg2", str(case)))
    ref = scaled_gemm.reference.scaled_gemm(*ops, out_dtype)
    y = sg_triton.scaled_gemm(*ops, out_dtype, config=config)
    assert y.dtype == out_dtype
    assert rel_err(y, ref) <= (1e-5 if out_dtype == torch.float32 else 1e-2)
    if dtype == torch.int8:
        assert_bitwise_equal(y, int_scaled(*ops).to(out_dtype), "int8 split-K reduces exactly")


# ---- weight-only GEMM ----

def weight_only_operands(m, n, k, kind, group, zero, xdtype, g):
    ng = ceil_div(k, group)
    if kind == "fp8":
        wq, bits = fp8_codes((n, k), E4M3, g), 8
    else:
        qmax = 127 if kind == "int8" else 7
        codes = torch.randint(-qmax - 1, qmax + 1, (n, k), generator=g, dtype=torch.int8)
        wq, bits = (codes, 8) if kind == "int8" else (pack_int4_bytes(codes), 4)
    ws = torch.rand(n, ng, generator=g) * 0.02 + 0.001
    zp = torch.randint(-8, 8, (n, ng), generator=g, dtype=torch.int8) if zero else None
    x = torch.randn(m, k, generator=g).to(xdtype)
    return x, wq, ws, group, bits, zp


# (kind, group: 0 = one group per row, zero point) per shape: channel, grouped and fp8 codes
WO_KINDS = [("int8", 0, False), ("int4", 128, True), ("fp8", 0, False)]


@pytest.mark.parametrize("kind", WO_KINDS, ids=lambda c: f"{c[0]}-g{c[1]}{'-zp' if c[2] else ''}")
@pytest.mark.parametrize("mnk", GEMM_SHAPES, ids=shape_id)
def test_weight_only_fp32(monkeypatch, kind, mnk):
    name, group, zero = kind
    ops = weight_only_operands(*mnk, name, group or mnk[2], zero, torch.float32,
                               gen("wo", kind, mnk))
    ref = weight_only_gemm.reference.weight_only_gemm(*ops, torch.float32)
    y = run_triton(monkeypatch, weight_only_gemm, "weight_only_gemm", *ops, torch.float32)
    assert y.shape == ref.shape
    assert rel_err(y, ref) <= 1e-5


@pytest.mark.parametrize("case", [
    ((3, 64, 301), "int4", 64, False, torch.float32, torch.float32, None),  # odd K
    ((3, 64, 301), "int4", 301, True, torch.float32, torch.float32, None),
    ((5, 200, 300), "int8", 64, True, torch.float32, torch.float32, None),
    ((5, 96, 300), "int4", 100, True, torch.float32, torch.float32, None),  # per-element scales
    ((5, 96, 300), "int8", 48, False, torch.float32, torch.float32, None),
    ((1, 200, 576), "int4", 128, False, torch.float32, torch.float32, {"SPLIT_K": 3}),
    ((16, 96, 576), "int8", 576, False, torch.float32, torch.float32, {"SPLIT_K": 2}),
    ((5, 200, 300), "int4", 128, True, torch.bfloat16, torch.bfloat16, None),
    ((33, 96, 576), "int8", 576, False, torch.bfloat16, torch.bfloat16, None),
    ((5, 128, 256), "fp8", 128, False, torch.bfloat16, torch.float32, None),
    ((5, 128, 256), "int8", 128, True, torch.float16, torch.float16, None),
], ids=lambda c: f"{c[1]}-g{c[2]}{'-zp' if c[3] else ''}-{str(c[4])[6:]}-{shape_id(c[0])}"
                 f"{'-split' if c[6] else ''}")
def test_weight_only_variants(case):
    mnk, kind, group, zero, xdtype, out_dtype, config = case
    ops = weight_only_operands(*mnk, kind, group, zero, xdtype, gen("wo2", str(case)))
    ref = weight_only_gemm.reference.weight_only_gemm(*ops, out_dtype)
    y = wo_triton.weight_only_gemm(*ops, out_dtype, config=config)
    assert y.dtype == out_dtype
    exact = out_dtype == torch.float32 and xdtype == torch.float32
    assert rel_err(y, ref) <= (1e-5 if exact else 1e-2)


def test_weight_only_validates():
    x, wq, ws, group, bits, _ = weight_only_operands(2, 64, 256, "int4", 128, False,
                                                     torch.float32, gen("wo3"))
    with pytest.raises(ValueError, match="packed into uint8"):
        wo_triton.weight_only_gemm(x, wq.view(torch.int8), ws, group, bits)


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_weight_only_decodes_every_fp8_code(dtype):
    """fp8 codes reach the kernel as bytes and are decoded from their bits: every finite code
    (subnormals, both zeros) must come out exact; x = I makes y the decoded weight."""
    codes = torch.arange(256, dtype=torch.uint8).view(dtype)
    codes = torch.where(torch.isfinite(codes.float()), codes.float(), 0.0).to(dtype)
    wq = codes.view(2, 128)
    y = wo_triton.weight_only_gemm(torch.eye(128), wq, torch.ones(2, 1), 128, 8)
    assert_bitwise_equal(y.T.contiguous() + 0.0, wq.float() + 0.0, "decoded codes")


# --- fused MoE ------------------------------------------------------------------------------

MOE_CASES = [(kind, opts, routing, tokens, top_k)
             for (kind, opts) in test_kernels_moe.KINDS
             for routing in ("spread", "one-expert-idle", "all-on-one")
             for tokens, top_k in ((1, 2), (9, 2))]


def _moe_id(case):
    kind, opts, routing, tokens, top_k = case
    name = test_kernels_moe.KIND_IDS[test_kernels_moe.KINDS.index((kind, opts))]
    return f"{name}-{routing}-{tokens}x{top_k}"


@pytest.mark.parametrize("case", MOE_CASES, ids=_moe_id)
def test_fused_moe_triton_matches_reference(case):
    """fp32 activations: the reference's products summed in another order (an fp8
    activation code may move one step: 1e-5); bf16: the CPU kernels' bounds."""
    from q.kernels.fused_moe import fused_moe

    kind, opts, routing, tokens, top_k = case
    x, ids, weights, gate_up, down = test_kernels_moe._case(kind, opts, routing, tokens, top_k)
    inter = test_kernels_moe.INTER
    want = fused_moe(x, ids, weights, gate_up, down, intermediate=inter, impl="reference")
    got = moe_triton.fused_moe(x, ids, weights, gate_up, down, inter, inter,
                               torch.nn.functional.silu)
    assert test_kernels_moe.rel_err(got, want) < 1e-5
    xb = x.bfloat16()
    want = fused_moe(xb, ids, weights, gate_up, down, intermediate=inter,
                     impl="reference").float()
    got = fused_moe(xb, ids, weights, gate_up, down, intermediate=inter, impl="triton")
    bound = test_kernels_moe.ACT_QUANT_BOUND if kind in test_kernels_moe.ACT_QUANT_KINDS else \
        2 * test_kernels_moe.BF16_BOUND
    assert got.dtype == torch.bfloat16 and test_kernels_moe.rel_err(got.float(), want) < bound


@pytest.mark.parametrize("block_m", [4, 16])
def test_moe_align_pads_each_expert_to_whole_tiles(block_m):
    ids = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 3]])
    sorted_pairs, block_expert = moe_triton.align(ids, 5, block_m)
    pairs = ids.numel()
    tiles = sorted_pairs.view(-1, block_m)
    seen = []
    for tile, e in zip(tiles.tolist(), block_expert.tolist()):
        real = [p for p in tile if p < pairs]
        if e < 0:
            assert not real
            continue
        assert real == tile[:len(real)] and real  # a used tile starts with real rows
        assert all(ids.view(-1)[p] == e for p in real)
        seen += real
    assert sorted(seen) == list(range(pairs))  # every pair exactly once
    assert 4 not in block_expert.tolist()  # expert 4 has no tokens and no tile


@pytest.mark.parametrize("scheme,args", [("wint4", {"group_size": 32}), ("fp8-block", None)])
def test_moe_engine_runs_triton_experts(tmp_path, scheme, args):
    """The engine's FusedExperts dispatch to the Triton kernel (interpreted) and compute what
    the reference path computes."""
    import q

    from .engine_reference import engine_logits
    from .test_engine_moe import save_tiny_moe

    model = save_tiny_moe(tmp_path / "m", "qwen3_moe")
    out = q.quantize(model, scheme, tmp_path / "o", args=args, progress=False).output
    fast = q.load_engine(out, dtype="float32", impl="triton")
    assert all(m.impl == "triton" for m in fast.report.experts.values())
    ref = q.load_engine(out, dtype="float32", impl="reference")
    ids = [3, 17, 99, 250, 4]
    a, b = engine_logits(fast, ids), engine_logits(ref, ids)
    assert (a - b).norm() / b.norm() < 1e-4

"""Weight-only layers with int8 activations (the engine's ``woq_activations="int8"``).

- The W8A8 kernel reading the weight-only int8 pair layout (``int8_amx_pairs``, the path of
  CPUs with AMX tiles): it regroups each strip into the W8A8 quad layout in cache, so its
  output must be the very bits of ``int8_amx`` on the quad layout (itself bit-exact to
  ``_int_mm`` + the torch scaling).
- ``int8_activations.cpp`` (CPUs without tiles): activations quantized per token and block
  of 32 values, bit for bit act_quant's reference; each block's integer sum exact, so int8
  and int4 layers are within fp32 ordering and one bf16 rounding of the same sums in torch,
  and within int8 activation rounding of the exact weight-only product. An outlier channel
  costs per-block scales less than per-token ones (what the block size is for).
- WeightOnlyTorch's switch between that path (from ``INT8_ACTIVATIONS_FROM`` tokens) and the
  exact one.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from q.kernels import cpp_build
from q.kernels.act_quant.reference import quantize_activation
from q.kernels.packing.reference import pack_int4_bytes
from q.kernels.scaled_gemm import cpp_impl as w8a8
from q.kernels.scaled_gemm.reference import scaled_gemm
from q.kernels.weight_only_gemm import cpp_impl as wo_cpp
from q.kernels.weight_only_gemm import int8_activations as int8_acts
from q.kernels.weight_only_gemm import torch_impl as wo
from q.kernels.weight_only_gemm.reference import weight_only_gemm


def gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def available(n, k):
    reason = w8a8.amx_unavailable(n, k) or wo_cpp.amx_unavailable(n, k)
    if reason is not None:
        pytest.skip(reason)


def test_the_pair_layout_kernel_gives_the_quad_layout_kernels_bits():
    available(16, 64)
    # 5-16 tokens: one tile / pass; 17-31: a second tile overlapping the first; 33+: more
    # passes over the regrouped strip; 129+: more chunks. Odd strip counts (48: 3 strips)
    for n, k in [(16, 64), (48, 192), (512, 2048)]:
        g = gen("pairs", n, k)
        wq = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        ws = torch.rand(n, generator=g)
        sums, quads, pairs = w8a8.weight_row_sums(wq), w8a8.to_amx_int8_layout(wq), \
            wo_cpp.to_amx_layout(wq)
        for m in (5, 9, 17, 31, 33, 130):
            xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
            xs = torch.rand(m, generator=g)
            for dtype in (torch.bfloat16, torch.float32):
                want = (xq.int() @ wq.int().t()).float().mul_(xs[:, None]).mul_(ws).to(dtype)
                got = w8a8.int8_amx_pairs(xq, xs, pairs, ws, sums, dtype)
                assert torch.equal(got, want), (n, k, m, dtype)
                assert torch.equal(got, w8a8.int8_amx(xq, xs, quads, ws, sums, dtype))
    wq = torch.ones(16, 64, dtype=torch.int8)
    pairs, sums = wo_cpp.to_amx_layout(wq), w8a8.weight_row_sums(wq)
    x = torch.ones(5, 64, dtype=torch.int8)
    assert w8a8.int8_amx_pairs(x[:4], torch.ones(4), pairs, torch.ones(16), sums,
                               torch.bfloat16) is None  # 1-4 tokens: the register path's
    assert w8a8.int8_amx_pairs(x, torch.ones(5), w8a8.to_amx_int8_layout(wq), torch.ones(16),
                               sums, torch.bfloat16) is None  # the quad layout
    assert w8a8.int8_amx_pairs(x, torch.ones(5), pairs, torch.ones(16), sums.long(),
                               torch.bfloat16) is None


def block_sums(xq, xs, codes, group):
    """Per token and output channel: each weight group's sum over its 32-value activation
    blocks of (exact integer sum) * block scale, ``[M, N, groups]`` fp32."""
    m, k = xq.shape
    n = codes.shape[0]
    blocks = k // 32
    d = (xq.int().view(m, 1, blocks, 32) * codes.int().view(1, n, blocks, 32)).sum(-1)
    return (d.float() * xs[:, None]).view(m, n, k // group, group // 32).sum(-1)


def with_outlier(m, k, key):
    """Activations with one outlier channel, as LLM activations have."""
    x = torch.randn(m, k, generator=gen(*key))
    x[:, 3] *= 30
    return x.bfloat16()


@pytest.mark.parametrize("n,k", [(512, 256), (48, 192), (32, 96)])
def test_a_layer_with_int8_activations_sums_blocks_of_32_and_is_exact_below(n, k):
    if int8_acts.unavailable(8, n, k):
        pytest.skip(int8_acts.unavailable(8, n, k))
    g = gen("layer", n, k)
    codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, 1, generator=g) / 50 + 1e-3).bfloat16().float()
    exact = wo.WeightOnlyTorch(codes, scale, k, 8)
    fast = wo.WeightOnlyTorch(codes, scale, k, 8, int8_activations=True)
    assert fast.kernels == ("amx",) and fast.row_sums is None
    first = wo.INT8_ACTIVATIONS_FROM[8]
    for m in (1, 4, first - 1, first, 40, 300):
        x = with_outlier(m, k, ("x8", m, k))
        got = fast(x)
        if m < first:
            assert torch.equal(got, exact(x)), m  # the register path, untouched
            continue
        xq, xs = quantize_activation(x, 32, torch.int8)
        want = block_sums(xq, xs, codes, k)[..., 0] * scale.reshape(1, n)
        assert float((got.float() - want).norm() / want.norm()) < 4e-3, m
        ref = weight_only_gemm(x.float(), codes, scale, k, 8)
        err = float((got.float() - ref).norm() / ref.norm())
        # per-token scales (W8A8's) on the same input: the outlier coarsens every value,
        # blocks only its own (a third of them at K = 96: the gain is smallest there)
        tq, ts = quantize_activation(x, None, torch.int8)
        per_token = scaled_gemm(tq, ts, codes, scale, torch.float32)
        token_err = float((per_token - ref).norm() / ref.norm())
        assert err < 0.02 and err < 0.8 * token_err, (m, err, token_err)
        assert fast.bind(x, torch.empty(m, n, dtype=torch.bfloat16)) is None  # per call


def test_int8_activations_refuse_the_weights_they_cannot_run():
    n, k = 32, 128
    available(n, k)
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    with pytest.raises(ValueError, match="per-channel scales without zero points"):
        wo.WeightOnlyTorch(codes, torch.rand(n, 2), 64, 8, int8_activations=True)
    with pytest.raises(ValueError, match="per-channel scales without zero points"):
        wo.WeightOnlyTorch(codes, torch.rand(n, 1), k, 8, torch.ones(n, 1),
                           int8_activations=True)
    with pytest.raises(ValueError, match="compute dtype is float32"):
        wo.WeightOnlyTorch(codes, torch.rand(n, 1), k, 8, dtype=torch.float32,
                           int8_activations=True)
    with pytest.raises(ValueError, match="K % 32"):
        wo.WeightOnlyTorch(codes[:, :80].contiguous(), torch.rand(n, 1), 80, 8,
                           int8_activations=True)
    int4 = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    with pytest.raises(ValueError, match="compute dtype is float32"):
        wo.WeightOnlyTorch(int4, torch.rand(n, 2), 64, 4, dtype=torch.float32,
                           int8_activations=True)
    if cpp_build.amx_tiles():
        with pytest.raises(ValueError, match="AMX tiles, which have no int8-activation path"):
            wo.WeightOnlyTorch(int4, torch.rand(n, 2), 64, 4, int8_activations=True)


def int4_case(n, k, group, asym):
    g = gen("int4", n, k, group, asym)
    codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    groups = k // group
    s = (torch.rand(n, groups, generator=g) / 50 + 1e-3).bfloat16().float()
    z = (torch.randint(-3, 4, (n, groups), generator=g).float() * s).bfloat16().float() \
        if asym else None
    return codes, s, z


@pytest.mark.parametrize("m,k,group", [(9, 64, 32), (40, 192, 64), (130, 2048, 64),
                                       (300, 512, 128)])
def test_int8_activations_are_quantized_as_the_reference_bit_for_bit(m, k, group):
    if int8_acts.unavailable(4, 16, k, group):
        pytest.skip(int8_acts.unavailable(4, 16, k, group))
    x = (torch.randn(m, k, generator=gen("codes", m, k)) * 3).bfloat16()
    x[1] = 0  # an all-zero token: amax floored, codes 0
    x[2, :group] = torch.arange(group) * 0.5 - group / 4  # halves: ties round to even
    x[3, 7] = 1e4  # an outlier: the rest of its group rounds to few codes
    x[4, group:2 * group] = -x[4, group:2 * group].abs()  # the largest |x| negative
    got = int8_acts.int8_block_codes(x, group)
    want = quantize_activation(x, group, torch.int8)
    assert got is not None
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("n,k,group,asym", [(16, 64, 32, False), (48, 192, 64, True),
                                            (512, 2048, 64, False), (256, 512, 128, True)])
def test_int4_with_int8_activations_sums_exactly_per_block(n, k, group, asym):
    if int8_acts.unavailable(4, n, k, group):
        pytest.skip(int8_acts.unavailable(4, n, k, group))
    codes, s, z = int4_case(n, k, group, asym)
    zero = torch.zeros_like(s) if z is None else z
    layer = wo.WeightOnlyTorch(codes, s, group, 4, None if z is None else -z / s,
                               int8_activations=True)
    exact = wo.WeightOnlyTorch(codes, s, group, 4, None if z is None else -z / s)
    assert layer.int8_activations and layer.kernels == ("amx",)
    groups = k // group
    w = (codes.float().view(n, groups, group) * s[..., None] + zero[..., None]).view(n, k)
    for m in (1, 8, 9, 17, 40, 130, 300):
        x = with_outlier(m, k, ("x4", m, k))
        got = layer(x)
        if m < wo.INT8_ACTIVATIONS_FROM[4]:
            assert torch.equal(got, exact(x)), m
            continue
        xq, xs = quantize_activation(x, 32, torch.int8)  # per token and block of 32
        # per block the exact integer sum of (q - 8) * xq times its activation scale, per
        # group times the weight's scale, summed in fp32, plus z * sum(x): within fp32
        # ordering and the one bf16 rounding of the output
        want = (block_sums(xq, xs, codes, group) * s).sum(-1) \
            + x.float().view(m, groups, group).sum(-1) @ zero.t()
        assert float((got.float() - want).norm() / want.norm()) < 4e-3, m
        ref = weight_only_gemm(x.float(), pack_int4_bytes(codes), s, group, 4,
                               None if z is None else -z / s)
        err = float((got.float() - ref).norm() / ref.norm())
        gq, gs = quantize_activation(x, group, torch.int8)  # one scale per weight group
        coarse = ((gq.int().view(m, 1, groups, group) * codes.int().view(1, n, groups, group))
                  .sum(-1).float() * s * gs[:, None]).sum(-1) \
            + x.float().view(m, groups, group).sum(-1) @ zero.t()
        coarse_err = float((coarse - ref).norm() / ref.norm())
        assert err < 0.02 and (group == 32 or err < coarse_err), (m, err, coarse_err)
        assert float((ref - x.float() @ w.t()).norm() / ref.norm()) < 1e-5

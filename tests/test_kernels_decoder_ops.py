"""The decoder layer's C++ elementwise ops (q.kernels.decoder_ops.cpp_impl) against their
torch reference, which is transformers' own arithmetic: bit-exact for the residual add, the
rotary embedding, the cache write and bf16 SiLU x up everywhere, and for RMSNorm where
torch's summation order is known (probed: cpp_impl.torch_sum_lanes)."""

from __future__ import annotations

import pytest
import torch

from q.kernels.decoder_ops import reference

cpp = pytest.importorskip("q.kernels.decoder_ops.cpp_impl")
if cpp.unavailable_reason(torch.float32) is not None:
    pytest.skip(f"C++ decoder ops: {cpp.unavailable_reason(torch.float32)}",
                allow_module_level=True)

DTYPES = [torch.bfloat16, torch.float32]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", [(1, 576), (7, 2048), (300, 576), (5, 100), (3, 1000),
                                        (2, 7), (4, 20000)])
def test_rms_norm_matches_transformers(dtype, rows, width):
    g = _gen()
    x = (torch.randn(rows, width, generator=g) * 40).to(dtype)
    r = torch.randn(rows, width, generator=g).to(dtype)
    w = torch.randn(width, generator=g).to(dtype)
    got, want = cpp.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5)
    (got_n, got_s), (want_n, want_s) = (cpp.rms_norm(x, w, 1e-5, residual=r),
                                        reference.rms_norm(x, w, 1e-5, residual=r))
    assert torch.equal(got_s, want_s)  # the residual add rounds once, as torch's
    if cpp.torch_sum_lanes() is not None:  # torch's summation order found (x86 builds)
        assert torch.equal(got, want) and torch.equal(got_n, want_n)
    else:  # the sum's order differs: the variance within a few fp32 ulp
        torch.testing.assert_close(got, want, rtol=2 ** -7, atol=0)


def test_rms_norm_reads_strided_rows_and_leaves_inputs_alone():
    g = _gen(1)
    product = torch.randn(6, 900, generator=g).bfloat16()  # a fused GEMM's output
    x, r = product[:, 100:676], torch.randn(6, 576, generator=g).bfloat16()
    before = product.clone(), r.clone()
    w = torch.randn(576, generator=g).bfloat16()
    got_n, got_s = cpp.rms_norm(x, w, 1e-6, residual=r)
    want_n, want_s = reference.rms_norm(x, w, 1e-6, residual=r)
    assert torch.equal(got_s, want_s) and torch.equal(got_n, want_n)
    assert torch.equal(product, before[0]) and torch.equal(r, before[1])


def _rope(positions, dim, dtype, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, dim, 2).float() / dim)
    angles = positions[:, None].float() * inv
    emb = torch.cat([angles, angles], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,dim,value_dim", [(9, 3, 64, 64), (32, 4, 64, 64),
                                                          (4, 4, 128, 128), (6, 2, 32, 16)])
@pytest.mark.parametrize("rows", [1, 5, 130])
def test_rotary_and_cache_write_match_transformers(dtype, heads, kv_heads, dim, value_dim,
                                                   rows):
    g = _gen(2)
    qkv = torch.randn(rows, (heads + kv_heads) * dim + kv_heads * value_dim,
                      generator=g).to(dtype) * 3
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * value_dim], 1)
    cos, sin = _rope(torch.randint(0, 5000, (rows,), generator=g), dim, dtype)
    want_q, want_k = reference.rotary(q, k, cos, sin, dim)
    blocks, bs = 12, 64
    k_cache = torch.randn(blocks, kv_heads, dim, bs, generator=g).to(dtype)
    v_cache = torch.randn(blocks, kv_heads, bs, value_dim, generator=g).to(dtype)
    want_kc, want_vc = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(blocks * bs, generator=g)[:rows]
    reference.write_cache(want_k, v, want_kc, want_vc, slots)
    # the layout itself: token i's KV head h is row slots[i] % bs of head h's part of block
    # slots[i] // bs, for keys [blocks, kvH, d, bs] and values [blocks, kvH, bs, dv]
    assert torch.equal(want_kc[slots // bs, :, :, slots % bs], want_k.view(rows, kv_heads, dim))
    assert torch.equal(want_vc[slots // bs, :, slots % bs], v.view(rows, kv_heads, value_dim))
    v_before = v.clone()
    cpp.rotary_cache(q, k, v, cos, sin, dim, k_cache, v_cache, slots)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert torch.equal(k_cache, want_kc) and torch.equal(v_cache, want_vc)
    assert torch.equal(v, v_before)


def test_rotary_without_a_cache_only_rotates():
    g = _gen(3)
    q, k = torch.randn(3, 4 * 16, generator=g), torch.randn(3, 2 * 16, generator=g)
    cos, sin = _rope(torch.tensor([0, 7, 100]), 16, torch.float32)
    want = reference.rotary(q, k, cos, sin, 16)
    cpp.rotary_cache(q, k, torch.empty(3, 32), cos, sin, 16)
    assert torch.equal(q, want[0]) and torch.equal(k, want[1])


def _same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit-equal, except that any NaN matches any NaN (torch's vector and scalar bf16
    conversions themselves store NaN as 0xFFFF and 0x7FC0)."""
    nan = torch.isnan(want)
    return (torch.equal(torch.isnan(got), nan)
            and torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan]))


def test_silu_table_is_torchs_silu_of_every_bf16_value():
    import numpy as np

    bits = torch.from_numpy(np.arange(1 << 16, dtype=np.uint16).view(np.int16))
    x = bits.view(torch.bfloat16)
    table = cpp.silu_table()
    assert table.shape == (1 << 16,) and table.dtype == torch.float32
    assert _same_bits(table.bfloat16(), torch.nn.functional.silu(x))
    # torch's scalar loop (a row's tail) gives the same numbers as its vector loop, so one
    # table serves every element: 1-element calls take the scalar path
    some = x[torch.randperm(1 << 16, generator=_gen(5))[:2000]]
    scalar = torch.cat([torch.nn.functional.silu(v.reshape(1)) for v in some])
    assert _same_bits(scalar, torch.nn.functional.silu(some))


@pytest.mark.parametrize("rows,width", [(1, 5632), (1, 16), (3, 37), (7, 576), (64, 1536),
                                        (300, 100)])
def test_silu_mul_matches_transformers(rows, width):
    g = _gen(rows)
    gate_up = (torch.randn(rows, 2 * width, generator=g) * 4).bfloat16()  # one fused GEMM
    gate, up = gate_up.split(width, dim=1)
    before = gate_up.clone()
    got = cpp.silu_mul(gate, up)
    assert _same_bits(got, reference.silu_mul(gate, up))
    assert torch.equal(gate_up, before)  # inputs untouched
    out = torch.full((rows, width), 7.0, dtype=torch.bfloat16)
    cpp.bind_silu_mul(gate, up, out)()
    assert _same_bits(out, got)


def test_silu_mul_over_every_bf16_gate_value():
    import numpy as np

    bits = torch.from_numpy(np.arange(1 << 16, dtype=np.uint16).view(np.int16))
    gate = bits.view(torch.bfloat16).view(64, 1024)  # inf, NaN, subnormals, -0 included
    up = (torch.randn(64, 1024, generator=_gen(6)) * 3).bfloat16()
    up[0, :8] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40,
                              3e38, -3e38])
    assert _same_bits(cpp.silu_mul(gate, up), reference.silu_mul(gate, up))


def test_layouts_the_kernels_cannot_read_are_refused():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="contiguous"):
        cpp.rms_norm(x.t(), torch.ones(4), 1e-6)
    with pytest.raises(ValueError, match="dtype"):
        cpp.rms_norm(x, torch.ones(8, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(ValueError, match="share a dtype"):
        cpp.rotary_cache(x, x.bfloat16(), x, x, x, 8)
    with pytest.raises(ValueError, match="cache"):
        cpp.rotary_cache(torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8),
                         torch.ones(2, 8), torch.zeros(2, 8), 8, torch.zeros(3, 1, 8, 16),
                         torch.zeros(3, 16, 1, 8), torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="bf16 gate and up"):
        cpp.silu_mul(x, x)
    gate_up = torch.zeros(2, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="row stride"):
        cpp.silu_mul(gate_up[:, :8], torch.zeros(2, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous"):
        cpp.silu_mul(gate_up.t(), gate_up.t())
    with pytest.raises(ValueError, match="output"):
        cpp.bind_silu_mul(gate_up[:, :8], gate_up[:, 8:], torch.zeros(2, 9, dtype=torch.bfloat16))

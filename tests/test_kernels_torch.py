"""torch's built-in CPU kernels (``q.kernels.<op>.torch_impl``) against the fp32 references.

Each candidate kernel runs on aligned and ragged shapes. Bounds: the references compute in
fp32 on the same (bf16-representable) activations; the torch paths round the scales to
bf16, may round the dequantized weight to bf16, and round the output to bf16: three
roundings of at most 2^-9 relative each, so 8e-3 in relative Frobenius norm is a ceiling a
real bug (a wrong group, zero point or layout, errors of order 1) cannot hide under. With
fp32 compute the int8 paths are exact up to fp32 rounding (1e-5). Layout unpacking is
bit-exact.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from q.kernels.act_quant.reference import quantize_activation
from q.kernels.block_gemm.reference import fp8_block_gemm
from q.kernels.configs import cpu_choice, cpu_class
from q.kernels.packing.reference import pack_int4_bytes
from q.kernels.scaled_gemm.cpp_impl import amx_unavailable as amx_int8_unavailable
from q.kernels.scaled_gemm.reference import scaled_gemm
from q.kernels.scaled_gemm.torch_impl import Fp8Dequantized, Int8Scaled
from q.kernels.weight_only_gemm import torch_impl as wo
from q.kernels.weight_only_gemm.reference import weight_only_gemm

BF16_BOUND = 8e-3
MS = (1, 3, 17, 40)


def gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def rel_err(y, ref):
    return float((y.float() - ref).norm() / ref.norm())


def acts(m, k, *key):
    return torch.randn(m, k, generator=gen("x", m, k, *key)).bfloat16()


def int_weight(n, k, bits, group, asym, *key):
    g = gen("w", n, k, bits, group, asym, *key)
    lo, hi = (-127, 128) if bits == 8 else (-8, 8)
    codes = torch.randint(lo, hi, (n, k), generator=g, dtype=torch.int8)
    groups = -(-k // group)
    scale = (torch.rand(n, groups, generator=g) / 50 + 1e-3).bfloat16().float()
    zero = torch.randint(-3, 4, (n, groups), generator=g).float() if asym else None
    return codes, scale, zero


@pytest.mark.parametrize("n,k", [(128, 64), (192, 256), (64, 1024)])
def test_int4pack_layout_unpacks_bit_exactly(n, k):
    assert wo.int4pack_block_n() is not None, "torch's CPU int4 layout changed: re-derive it"
    u = torch.randint(0, 16, (n, k), generator=gen("u", n, k), dtype=torch.int32)
    assert torch.equal(wo.unpack_int4pack(wo._pack_int4(u), n, k), u.to(torch.uint8))


@pytest.mark.parametrize("n,k,group,asym", [
    (256, 512, 512, False),   # aligned, per channel: int8pack + dequantize
    (200, 72, 72, False),     # ragged N and K
    (96, 256, 64, False),     # int8 groups: dequantize only
    (96, 200, 64, True),      # ragged groups, zero points: dequantize only
])
def test_weight_only_int8_kernels_match_reference(n, k, group, asym):
    codes, scale, zero = int_weight(n, k, 8, group, asym)
    impl = wo.WeightOnlyTorch(codes, scale, group, 8, zero)
    packable = group == k and not asym and k % 16 == 0  # torch's int8pack needs K % 16
    expect = ("int8pack", "dequantize") if packable else ("dequantize",)
    if group == k and not asym and wo.gemv_unavailable() is None:
        expect = ("gemv", *expect)  # q's C++ GEMV: per-channel scales, any K
    if group == k and not asym and wo.amx_unavailable(n, k) is None:
        expect = ("amx",)  # AMX tiles: one kernel, the weight kept in its layout only
    assert impl.kernels == expect
    for m in MS:
        x = acts(m, k, n)
        ref = weight_only_gemm(x.float(), codes, scale, group, 8, zero)
        for kernel in impl.kernels:
            assert rel_err(impl.run(x, kernel), ref) < BF16_BOUND, (kernel, m)
        assert rel_err(impl(x), ref) < BF16_BOUND


def test_weight_only_int8_in_fp32_is_the_reference():
    codes, scale, zero = int_weight(64, 96, 8, 32, True)
    impl = wo.WeightOnlyTorch(codes, scale, 32, 8, zero, torch.float32)
    x = acts(5, 96).float()
    ref = weight_only_gemm(x, codes, scale, 32, 8, zero)
    assert rel_err(impl(x), ref) < 1e-6


def test_int8_weight_amx_matches_the_reference_for_any_number_of_tokens():
    from q.kernels.weight_only_gemm import cpp_impl

    reason = cpp_impl.amx_unavailable(16, 32)
    if reason is not None:
        pytest.skip(reason)
    # 1-32 tokens: registers (8 per pass); 33+: tiles (or vdpbf16ps) over the widened strip
    # (32 tokens per pass, a second tile overlapping the first on ragged ends); 129+: more
    # chunks of tokens
    last = cpp_impl.register_tokens(8)
    tokens = (1, 2, 4, 5, 8, 9, 16, 17, 31, 32, 33, 48, 49, 70, 81, 130, 300)
    assert last in tokens and last + 1 in tokens  # both sides of the register path's end
    for n, k in [(16, 32), (48, 96), (256, 2048)]:
        codes, scale, _ = int_weight(n, k, 8, k, False)
        amx = cpp_impl.to_amx_layout(codes)
        for m in tokens:
            x = acts(m, k, n)
            ref = weight_only_gemm(x.float(), codes, scale, k, 8)
            got = cpp_impl.int8_weight_amx(x, amx, scale.float().reshape(n))
            assert got.dtype == torch.bfloat16 and rel_err(got, ref) < BF16_BOUND, (n, k, m)
            # each token's row is its own: the same bits in a smaller batch on the same path
            tail = x[-(1 if m <= last else last + 1):].contiguous()
            alone = cpp_impl.int8_weight_amx(tail, amx, scale.float().reshape(n))
            assert torch.equal(got[-tail.shape[0]:], alone), (n, k, m)
    assert "N % 16" in cpp_impl.amx_unavailable(200, 64)
    assert "K % 32" in cpp_impl.amx_unavailable(64, 72)
    amx = cpp_impl.to_amx_layout(torch.ones(16, 64, dtype=torch.int8))
    assert cpp_impl.int8_weight_amx(torch.ones(1, 64), amx, torch.ones(16)) is None  # fp32 x
    assert cpp_impl.int8_weight_amx(torch.ones(1, 32, dtype=torch.bfloat16), amx,
                                    torch.ones(16)) is None  # K mismatch


def test_int8_weight_gemv_in_cpp_matches_the_reference_and_refuses_what_it_cannot_read():
    from q.kernels.weight_only_gemm import cpp_impl

    if cpp_impl.gemv_unavailable() is not None:  # CI machines have a compiler
        pytest.fail(f"the C++ int8 GEMV did not build: {cpp_impl.gemv_unavailable()}")
    for m, n, k in [(1, 576, 576), (3, 33, 2048), (2, 40, 100), (1, 7, 5), (5, 4, 17)]:
        codes, scale, _ = int_weight(n, k, 8, k, False)
        ref = weight_only_gemm(acts(m, k, n).float(), codes, scale, k, 8)
        for dtype, bound in ((torch.float32, 1e-6), (torch.bfloat16, BF16_BOUND)):
            x = acts(m, k, n).to(dtype)
            got = cpp_impl.int8_weight_gemv(x, codes, scale.float().reshape(n))
            assert got.dtype == dtype and rel_err(got, ref) < bound, (m, n, k, dtype)
    # the largest sums: every code at -128 against activations of 1 (exact in fp32)
    low = torch.full((2, 4096), -128, dtype=torch.int8)
    got = cpp_impl.int8_weight_gemv(torch.ones(1, 4096), low, torch.tensor([1.0, 0.5]))
    assert got.tolist() == [[-128 * 4096, -64 * 4096]]
    assert cpp_impl.int8_weight_gemv(torch.ones(1, 4096), low, torch.ones(2).double()) is None
    assert cpp_impl.int8_weight_gemv(torch.ones(1, 4096).half(), low, torch.ones(2)) is None
    assert cpp_impl.int8_weight_gemv(torch.ones(4096, 2).t(), low, torch.ones(2)) is None


@pytest.mark.parametrize("n,k,group,asym", [
    (128, 256, 32, False), (128, 256, 64, True), (192, 512, 128, False),
    (64, 512, 256, True), (128, 384, 384, False),  # per channel: groups of 128
    (80, 128, 64, False),  # N not a multiple of torch's 64-row blocks: int4pack only
])
def test_weight_only_int4_kernels_match_reference(n, k, group, asym):
    codes, scale, zero = int_weight(n, k, 4, group, asym)
    impls = [wo.WeightOnlyTorch(codes, scale, group, 4, zero, amx=amx) for amx in (True, False)]
    torch_kernels = ("int4pack", "dequantize") if n % 64 == 0 else ("int4pack",)
    assert impls[1].kernels == torch_kernels
    assert impls[0].kernels == (torch_kernels if wo.amx_int4_unavailable(n, k, impls[0].group)
                                else ("amx",))
    for m in MS:
        x = acts(m, k, n, group)
        ref = weight_only_gemm(x.float(), pack_int4_bytes(codes), scale, group, 4, zero)
        for impl in impls:
            for kernel in impl.kernels:
                assert rel_err(impl.run(x, kernel), ref) < BF16_BOUND, (kernel, m)
            assert rel_err(impl(x), ref) < BF16_BOUND
    if "dequantize" in impls[1].kernels:  # both layouts give the weight the same bf16 numbers
        assert torch.equal(impls[0].dequantized_torch(), impls[1].dequantized_torch())


def test_int4_weight_amx_matches_the_reference_for_any_number_of_tokens():
    from q.kernels.weight_only_gemm import cpp_impl

    reason = cpp_impl.amx_int4_unavailable(16, 32, 32)
    if reason is not None:
        pytest.skip(reason)
    last = cpp_impl.register_tokens(4)
    tokens = (1, 2, 3, 4, 5, 8, 9, 16, 17, 31, 32, 33, 47, 130)
    assert last in tokens and last + 1 in tokens  # both sides of the register path's end
    for n, k, group, asym in [(16, 32, 32, True), (48, 256, 64, True), (256, 2048, 128, True),
                              (32, 512, 256, True), (48, 256, 64, False), (32, 512, 32, False)]:
        codes, scale, zero = int_weight(n, k, 4, group, asym)
        impl = wo.WeightOnlyTorch(codes, scale, group, 4, zero)
        # without zeros the scales alone are kept (and streamed)
        assert impl.kernels == ("amx",) and impl.has_zero == asym
        assert impl.amx_scales.shape == (n // 16, k // group, 2 if asym else 1, 16)
        for m in tokens:
            x = acts(m, k, n, group)
            ref = weight_only_gemm(x.float(), pack_int4_bytes(codes), scale, group, 4, zero)
            got = impl.run(x, "amx")
            assert got.dtype == torch.bfloat16 and rel_err(got, ref) < BF16_BOUND, (n, k, m)
            # each token's row is its own: 1-16 tokens on registers, more on widened strips
            tail = x[-(1 if m <= last else last + 1):].contiguous()
            assert torch.equal(got[-tail.shape[0]:], impl.run(tail, "amx")), (n, k, m)
    # exact arithmetic (small integer activations, power-of-two scales, integer zeros): both
    # paths sum exactly and round once, so any misplaced nibble or scale would show
    n, k, group = 64, 256, 64
    g = gen("int4-exact", n, k)
    codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scale = 2.0 ** torch.randint(-3, 2, (n, k // group), generator=g).float()
    zero = torch.randint(-2, 3, (n, k // group), generator=g).float()
    impl = wo.WeightOnlyTorch(codes, scale, group, 4, zero)
    symmetric = wo.WeightOnlyTorch(codes, scale, group, 4)
    assert impl.has_zero and not symmetric.has_zero
    for m in (1, 3, 4, 5, 8, 9, 40):
        x = torch.randint(-3, 4, (m, k), generator=g).to(torch.bfloat16)
        ref = weight_only_gemm(x.float(), pack_int4_bytes(codes), scale, group, 4, zero)
        assert torch.equal(impl.run(x, "amx"), ref.bfloat16()), m
        ref = weight_only_gemm(x.float(), pack_int4_bytes(codes), scale, group, 4)
        assert torch.equal(symmetric.run(x, "amx"), ref.bfloat16()), m
    assert torch.equal(symmetric.dequantized(),
                       ((codes.float() * scale.repeat_interleave(group, 1)).bfloat16()))
    assert "groups of 48" in cpp_impl.amx_int4_unavailable(64, 96, 48)
    assert "N % 16" in cpp_impl.amx_int4_unavailable(40, 64, 32)
    x = acts(2, k)
    assert cpp_impl.int4_weight_amx(x.float(), impl.amx_codes, impl.amx_scales,
                                    group) is None  # fp32 activations
    assert cpp_impl.int4_weight_amx(x, impl.amx_codes, impl.amx_scales, 128) is None
    # scales of another layout than to_amx_int4_scales's: refused, not misread
    assert cpp_impl.int4_weight_amx(x, impl.amx_codes, impl.amx_scales[:, :, :1].repeat(
        1, 1, 3, 1), group) is None


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_register_paths_lose_nothing_to_fixed_point_activations(bits):
    """1-8 tokens multiply 16-bit fixed-point activations (``amx_tiles.h``'s
    ``to_fixed_point``, one unit per block of 128 or per group) in integer sums. Even with
    outlier channels 10^3-10^5 times the rest of their block, the error against the fp32
    reference stays within 10% of what rounding the reference itself to bf16 costs; a token's
    bits are the same alone or in a batch; an inf makes its own token's row NaN, no other."""
    from q.kernels.weight_only_gemm import cpp_impl

    reason = cpp_impl.amx_unavailable(16, 32)
    if reason is not None:
        pytest.skip(reason)
    n, k, group = 256, 2048, 64
    codes, scale, zero = int_weight(n, k, bits, k if bits == 8 else group, bits == 4)
    if bits == 8:
        amx = cpp_impl.to_amx_layout(codes)

        def run(x):
            return cpp_impl.int8_weight_amx(x, amx, scale.float().reshape(n))
        packed = codes
    else:
        impl = wo.WeightOnlyTorch(codes, scale, group, 4, zero)

        def run(x):
            return impl.run(x, "amx")
        packed = pack_int4_bytes(codes)
    for outlier in (1e3, 1e5):
        x = acts(8, k, n, bits).float()
        x[:, 7] *= outlier
        x[:, 1500] *= outlier / 3
        x = x.bfloat16()
        ref = weight_only_gemm(x.float(), packed, scale, k if bits == 8 else group, bits, zero)
        got = run(x)
        assert rel_err(got, ref) < 1.1 * rel_err(ref.bfloat16(), ref), outlier
        for i in range(8):
            assert torch.equal(got[i:i + 1], run(x[i:i + 1].contiguous())), (outlier, i)
    x = acts(3, k, n, bits)
    x[1, 5] = float("inf")
    got = run(x)
    assert got[1].isnan().all() and got[[0, 2]].isfinite().all()


def test_int4_amx_layout_round_trips_bit_exactly():
    from q.kernels.weight_only_gemm import cpp_impl

    codes = torch.randint(-8, 8, (48, 96), generator=gen("amx4", 48, 96), dtype=torch.int8)
    amx = cpp_impl.to_amx_int4_layout(codes)
    assert amx.shape == (3, 12, 64) and amx.dtype == torch.uint8
    assert torch.equal(cpp_impl.from_amx_int4_layout(amx).to(torch.int16) - 8,
                       codes.to(torch.int16))
    # byte 4c + j of block t: channel c's q at k = 8t + j (low) and 8t + 4 + j (high)
    assert amx[0, 0, 7].item() == (codes[1, 3] + 8).item() | ((codes[1, 7] + 8).item() << 4)
    assert amx[2, 5, 62].item() == \
        (codes[47, 42] + 8).item() | ((codes[47, 46] + 8).item() << 4)


@pytest.mark.parametrize("n,k,group,asym", [
    (128, 256, 32, False), (128, 256, 64, True), (192, 512, 128, True),
    (64, 512, 256, False), (128, 384, 384, True),  # per channel: groups of 128
])
def test_int4_unpacking_in_cpp_is_bit_identical_to_torch_ops(n, k, group, asym):
    """The prompt path's one-pass C++ unpacking (CI machines have a compiler: it must
    run) against the torch ops it replaces, with the roundings they make."""
    from q.kernels.weight_only_gemm.cpp_impl import dequantize_int4pack

    codes, scale, zero = int_weight(n, k, 4, group, asym)
    impl = wo.WeightOnlyTorch(codes, scale * 37.0, group, 4, zero, amx=False)  # big w
    fast = dequantize_int4pack(impl.packed, impl.scales_and_zeros, n, k, impl.group,
                               wo.int4pack_block_n())
    assert fast is not None, "the C++ int4 unpacking kernel did not build"
    assert torch.equal(fast, impl.dequantized_torch())
    assert torch.equal(impl.dequantized(), fast)


@pytest.mark.parametrize("n,k,group,asym", [
    (128, 256, 256, False), (96, 200, 200, True),  # per channel
    (64, 256, 32, False), (40, 192, 64, True), (33, 100, 32, True),  # groups, a ragged one
])
def test_int8_dequantization_in_cpp_is_bit_identical_to_torch_ops(n, k, group, asym):
    from q.kernels.weight_only_gemm.cpp_impl import dequantize_int8

    codes, scale, zero = int_weight(n, k, 8, group, asym)
    impl = wo.WeightOnlyTorch(codes, scale * 37.0, group, 8, zero)
    fast = dequantize_int8(impl.plain_codes(), impl.scale, impl.zero, impl.group_size)
    assert fast is not None, "the C++ int8 dequantization kernel did not build"
    assert torch.equal(fast, impl.dequantized_torch())
    assert torch.equal(impl.dequantized(), fast)
    assert torch.equal(impl.plain_codes(), codes)  # also from the AMX layout
    assert dequantize_int8(codes, impl.scale.float(), None, impl.group_size) is None


@pytest.mark.parametrize("n,k,group,reason", [
    (128, 256, 48, "groups of 48"), (128, 200, 64, "groups of 64 over K=200"),
    (72, 256, 64, "N=72 is not a multiple of 16"),
])
def test_int4_shapes_without_a_torch_kernel_say_why(n, k, group, reason):
    assert reason in wo.unsupported(4, n, k, group)
    codes, scale, _ = int_weight(n, k, 4, group, False)
    with pytest.raises(ValueError, match=reason):
        wo.WeightOnlyTorch(codes, scale, group, 4)


def test_a_kernel_a_weight_cannot_take_is_refused():
    codes, scale, zero = int_weight(64, 64, 8, 32, True)
    with pytest.raises(ValueError, match="int8pack"):
        wo.WeightOnlyTorch(codes, scale, 32, 8, zero).run(acts(1, 64), "int8pack")


@pytest.mark.parametrize("n,k,tensor_scale", [(256, 512, False), (200, 72, False),
                                              (96, 130, True), (96, 128, True)])
def test_int8_w8a8_kernels_match_reference(n, k, tensor_scale):
    g = gen("w8a8", n, k)
    wq = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    ws = (torch.rand(1 if tensor_scale else n, 1, generator=g) / 50 + 1e-3).bfloat16().float()
    bf16, fp32 = Int8Scaled(wq, ws, torch.bfloat16), Int8Scaled(wq, ws, torch.float32)
    amx = amx_int8_unavailable(n, k) is None  # the strip layout: the weight's only copy
    assert bf16.kernels == (("amx",) if amx else ("gemv", "int8pack", "int_mm")
                            if k % 16 == 0 else ("gemv", "int_mm"))
    for m in MS:
        x = acts(m, k, n)
        xq, xs = quantize_activation(x.float(), None, torch.int8)
        ref = scaled_gemm(xq, xs, wq, ws.expand(n, 1), torch.float32)
        for kernel in bf16.kernels:
            assert rel_err(bf16.run(x, kernel), ref) < BF16_BOUND, (kernel, m)
        assert rel_err(bf16(x), ref) < BF16_BOUND
        # fp32 compute always takes _int_mm: the exact int32 sum, fp32 scaling
        assert rel_err(fp32(x.float()), ref) < 1e-6
        # the C++ GEMV and _int_mm + the C++ epilogue: the same bits as the torch ops
        xq, xs = quantize_activation(x, None, torch.int8)
        torch_ops = torch._int_mm(xq, wq.t()).float().mul_(xs).mul_(bf16.ws).bfloat16()
        for kernel in ("amx",) if amx else ("gemv", "int_mm"):
            assert torch.equal(bf16.run(x, kernel), torch_ops), (kernel, m)


@pytest.mark.parametrize("block,act_group", [((128, 128), 128), ((1, 200), None)])
def test_fp8_weights_dequantized_at_load_match_reference(block, act_group):
    n, k = 256, 200
    g = gen("fp8", block)
    wq = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    ws = torch.rand(-(-n // block[0]), -(-k // block[1]), generator=g) / 100 + 1e-3
    impl = Fp8Dequantized(wq, ws, block, act_group, torch.float8_e4m3fn, torch.bfloat16)
    for m in MS:
        x = acts(m, k)
        xq, xs = quantize_activation(x.float(), act_group, torch.float8_e4m3fn)
        if act_group:
            ref = fp8_block_gemm(xq, xs, wq, ws, block, torch.float32)
        else:
            ref = scaled_gemm(xq, xs, wq, ws.reshape(n, 1), torch.float32)
        assert rel_err(impl(x), ref) < BF16_BOUND, m


def test_int8_gemv_and_epilogue_are_bit_exact_and_refuse_what_they_cannot_read():
    from q.kernels.scaled_gemm import cpp_impl

    if cpp_impl.unavailable_reason() is not None:  # CI machines have a compiler
        pytest.fail(f"the C++ int8 kernels did not build: {cpp_impl.unavailable_reason()}")
    g = gen("gemv")
    for m, n, k in [(1, 576, 576), (3, 33, 2048), (2, 40, 100), (1, 7, 5)]:
        xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
        wq = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        xs, ws = torch.rand(m, 1, generator=g), torch.rand(1, n, generator=g)
        acc = xq.int() @ wq.int().t()  # exact integer sums
        for dtype in (torch.bfloat16, torch.float32):
            want = acc.float().mul_(xs).mul_(ws).to(dtype)
            assert torch.equal(cpp_impl.int8_gemv(xq, xs, wq, ws, dtype), want), (m, n, k)
            assert torch.equal(cpp_impl.int8_epilogue(acc, xs, ws, dtype), want), (m, n, k)
    # the largest sums: every code at +-127 (exact in int32)
    full = torch.full((1, 4096), 127, dtype=torch.int8)
    one = torch.ones(1, 1)
    out = cpp_impl.int8_gemv(full, one, torch.cat([full, -full]), torch.ones(1, 2),
                             torch.float32)
    assert out.tolist() == [[127 * 127 * 4096, -127 * 127 * 4096]]
    low = torch.full((1, 4096), -128, dtype=torch.int8)  # int8's own extreme, both sides
    sums = cpp_impl.weight_row_sums(low)
    assert cpp_impl.int8_gemv(low, one, low, one, torch.float32, sums).item() == 128 * 128 * 4096
    assert cpp_impl.int8_gemv(low, one, low, one, torch.float32, sums.long()) is None
    strided = torch.cat([full, full], dim=1)[:, ::2]
    assert cpp_impl.int8_gemv(full, one, strided, one, torch.float32) is None
    assert cpp_impl.int8_gemv(full, one, full, one, torch.float16) is None
    assert cpp_impl.int8_epilogue(acc.t(), xs, ws, torch.float32) is None


def test_int8_amx_is_bit_exact_for_any_number_of_tokens():
    from q.kernels.scaled_gemm import cpp_impl

    reason = cpp_impl.amx_unavailable(16, 64)
    if reason is not None:
        pytest.skip(reason)
    g = gen("amx-int8")
    # 1-4 tokens: vpdpbusd; 5-16: one tile; 17-31: a second tile overlapping the first;
    # 33+: more passes; 129+: more chunks. int8's full range, -128 included
    for n, k in [(16, 64), (48, 192), (512, 2048)]:
        wq = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        ws = torch.rand(1, n, generator=g)
        amx, sums = cpp_impl.to_amx_int8_layout(wq), cpp_impl.weight_row_sums(wq)
        for m in (1, 2, 3, 4, 5, 16, 17, 31, 32, 33, 130):
            xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
            xs = torch.rand(m, 1, generator=g)
            acc = xq.int() @ wq.int().t()  # exact integer sums
            for dtype in (torch.bfloat16, torch.float32):
                want = acc.float().mul_(xs).mul_(ws).to(dtype)
                got = cpp_impl.int8_amx(xq, xs, amx, ws, sums, dtype)
                assert torch.equal(got, want), (n, k, m, dtype)
    assert "K % 64" in cpp_impl.amx_unavailable(16, 96)
    assert "N % 16" in cpp_impl.amx_unavailable(40, 64)
    one = torch.ones(1, 64, dtype=torch.int8)
    amx = cpp_impl.to_amx_int8_layout(torch.ones(16, 64, dtype=torch.int8))
    sums = torch.full((16,), 64, dtype=torch.int32)
    assert cpp_impl.int8_amx(one, torch.ones(1), amx, torch.ones(16), sums.long(),
                             torch.float32) is None
    assert cpp_impl.int8_amx(one, torch.ones(1), amx, torch.ones(16), sums,
                             torch.float16) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_activation_quantization_in_cpp_is_bit_exact(dtype):
    from q.kernels.act_quant import cpp_impl, quantize_activation_cpu

    g = gen("act-int8", str(dtype))
    cases = [torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10
             for m, k in [(1, 576), (7, 2048), (300, 64), (3, 5), (2, 130)]]
    cases[2][0] = 0  # an all-zero token: the eps floor, codes 0
    cases.append(torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 63.5, -126.5]]))  # ties
    for x in cases:
        x = x.to(dtype)
        got = cpp_impl.quantize_int8_per_token(x)
        want = quantize_activation(x, None, torch.int8)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), x.shape
        wide = torch.cat([x, x], dim=1)  # rows a stride apart: read where they lie
        assert torch.equal(cpp_impl.quantize_int8_per_token(wide[:, :x.shape[1]])[0], want[0])
    assert cpp_impl.quantize_int8_per_token(torch.randn(4, 8).half()) is None
    assert cpp_impl.quantize_int8_per_token(torch.randn(8, 4).t()) is None
    # the dispatcher: the kernel where it runs, the reference for groups and fp8
    x = torch.randn(5, 256)
    assert torch.equal(quantize_activation_cpu(x, 128, torch.int8)[1],
                       quantize_activation(x, 128, torch.int8)[1])


def test_cpu_table_names_real_kernels_for_every_m():
    kernels = {"weight_only_int8": ("gemv", *wo.KERNELS[8]), "weight_only_int4": wo.KERNELS[4],
               "scaled_int8": ("gemv", "int8pack", "int_mm"),
               "dense_bf16": ("linear", "prepacked")}
    for op, names in kernels.items():
        for m in (1, 2, 16, 33, 100, 4096, 10**6):
            assert cpu_choice(op, m) in names, (op, m)


@pytest.mark.parametrize("n,k", [(96, 64), (200, 72), (1536, 576)])
@pytest.mark.parametrize("m", [1, 3, 40, 300])
def test_prepacked_bf16_linear_matches_reference(n, k, m):
    """oneDNN's prepacked bf16 Linear: within the bf16 bound of the fp32 product, and the
    numbers F.linear gives on the same bf16 operands (only the weight layout moved): every
    bit on CPUs without AMX; with AMX tiles, from M ~ 40 the two kernels split the fp32 sums
    differently and a few outputs in 10^4 differ in their last bits (measured 3-6e-5), so
    there each output must lie within one bf16 rounding of the other's sum."""
    from q.kernels.dense_gemm.reference import dense_gemm
    from q.kernels.dense_gemm.torch_impl import PackedLinear, unavailable_reason

    if unavailable_reason():
        pytest.skip(unavailable_reason())
    g = gen("dense", n, k, m)
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    x = torch.randn(m, k, generator=g).bfloat16()
    y = PackedLinear(w, b, amx=False)(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, dense_gemm(x, w, b)) < BF16_BOUND
    plain = torch.nn.functional.linear(x, w, b)
    if "amx" not in cpu_class():
        assert torch.equal(y, plain)
        return
    differ = y != plain
    assert differ.float().mean() < 1e-3, differ.float().mean()
    # a dot product's rounding scales with the sum of |products|, not with its (cancelling) value
    magnitude = x.float().abs() @ w.float().abs().T + b.float().abs()
    assert ((y.float() - plain.float()).abs() <= 2 ** -7 * magnitude).all()


def test_bf16_amx_matches_the_reference_for_any_number_of_tokens():
    from q.kernels.dense_gemm import cpp_impl
    from q.kernels.dense_gemm.reference import dense_gemm

    reason = cpp_impl.amx_unavailable(16, 32)
    if reason is not None:
        pytest.skip(reason)
    for n, k in [(16, 32), (48, 96), (256, 2048)]:
        g = gen("amx-bf16", n, k)
        w = torch.randn(n, k, generator=g).bfloat16()
        b = torch.randn(n, generator=g).bfloat16()
        amx = cpp_impl.to_amx_bf16_layout(w)
        assert torch.equal(cpp_impl.from_amx_bf16_layout(amx), w)
        for m in (1, 2, 3, 4, 5, 16, 17, 31, 33, 130):
            x = torch.randn(m, k, generator=g).bfloat16()
            got = cpp_impl.bf16_amx(x, amx, b.float())
            assert got.dtype == torch.bfloat16
            assert rel_err(got, dense_gemm(x, w, b)) < BF16_BOUND, (n, k, m)
            # small integers: exact sums, one rounding (the bias added before it)
            xi = torch.randint(-3, 4, (m, k), generator=g).bfloat16()
            wi = torch.randint(-3, 4, (n, k), generator=g).bfloat16()
            want = (xi.float() @ wi.float().T + b.float()).bfloat16()
            got = cpp_impl.bf16_amx(xi, cpp_impl.to_amx_bf16_layout(wi), b.float())
            assert torch.equal(got, want), (n, k, m)
            assert torch.equal(cpp_impl.bf16_amx(xi, cpp_impl.to_amx_bf16_layout(wi), None),
                               (xi.float() @ wi.float().T).bfloat16())
    assert "N % 16" in cpp_impl.amx_unavailable(40, 64)
    assert "K % 32" in cpp_impl.amx_unavailable(64, 48)
    amx = cpp_impl.to_amx_bf16_layout(torch.ones(16, 64, dtype=torch.bfloat16))
    assert cpp_impl.bf16_amx(torch.ones(1, 64), amx, None) is None  # fp32 activations
    assert cpp_impl.bf16_amx(torch.ones(1, 32, dtype=torch.bfloat16), amx, None) is None


def test_bf16_amx_over_a_weight_that_takes_large_token_chunks():
    """A weight above amx_tiles.h's kVecLargeWeight (16 MB) is multiplied in chunks of 2 MB
    of activations (504 tokens at K = 2080): 520 tokens span two chunks, every row exact."""
    from q.kernels.dense_gemm import cpp_impl

    n, k, m = 4096, 2080, 520  # 17 MB of bf16 weight
    reason = cpp_impl.amx_unavailable(n, k)
    if reason is not None:
        pytest.skip(reason)
    g = gen("amx-bf16-large", n, k)
    xi = torch.randint(-3, 4, (m, k), generator=g).bfloat16()
    wi = torch.randint(-3, 4, (n, k), generator=g).bfloat16()
    got = cpp_impl.bf16_amx(xi, cpp_impl.to_amx_bf16_layout(wi), None)
    assert torch.equal(got, (xi.float() @ wi.float().T).bfloat16())


def test_the_amx_wrappers_refuse_what_their_kernels_refuse():
    """A layout that is well formed but off the kernel's shape rule (K not a multiple of 32
    or 64) comes back as None, never as an uninitialized output."""
    from q.kernels.dense_gemm import cpp_impl as dense
    from q.kernels.scaled_gemm import cpp_impl as scaled
    from q.kernels.weight_only_gemm import cpp_impl as wo_cpp

    if wo_cpp.amx_unavailable(16, 32) or scaled.amx_unavailable(16, 64) \
            or dense.amx_unavailable(16, 32):
        pytest.skip("this CPU has no AMX tiles")
    x = torch.ones(5, 48, dtype=torch.bfloat16)  # K = 48: pairs and quads fit, tiles do not
    assert wo_cpp.int8_weight_amx(x, wo_cpp.to_amx_layout(torch.ones(16, 48, dtype=torch.int8)),
                                  torch.ones(16)) is None
    assert dense.bf16_amx(x, dense.to_amx_bf16_layout(torch.ones(16, 48, dtype=torch.bfloat16)),
                          None) is None
    w = torch.ones(16, 96, dtype=torch.int8)  # K = 96: not a multiple of 64
    assert scaled.int8_amx(torch.ones(5, 96, dtype=torch.int8), torch.ones(5),
                           scaled.to_amx_int8_layout(w), torch.ones(16),
                           scaled.weight_row_sums(w), torch.float32) is None
    codes = wo_cpp.to_amx_int4_layout(torch.zeros(16, 48, dtype=torch.int8))
    scales = wo_cpp.to_amx_int4_scales(torch.ones(16, 3), None)
    assert wo_cpp.int4_weight_amx(x, codes, scales, 16) is None  # groups of 16

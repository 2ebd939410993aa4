"""Each reference op against an independent computation of the same math (bit-exact) and
against the peers' own code where it is installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from q.kernels.fp8_block import (
    dequantize_fp8_block, quantize_act_per_token_group, quantize_fp8_block,
)
from q.kernels.fp8_rowwise import quantize_fp8_per_channel, quantize_fp8_per_tensor
from q.kernels.int_weight import (
    dequantize_int_weight, quantize_int_weight, quantize_int_weight_asym,
)
from q.kernels.packing import pack_int32, unpack_int32
from q.testing import assert_bitwise_equal, sqnr

SHAPES = [(256, 384), (128, 128), (200, 300), (576, 1536), (13, 129)]
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def weight(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w[0, :7] *= 40  # an outlier row segment, so tiles differ
    return w.to(torch.bfloat16)


def loop_fp8_block(w, block, dtype):
    """Tile by tile with explicit slices: the independent reference."""
    fmax = torch.finfo(dtype).max
    n, k = w.shape
    bn, bk = block
    rows, cols = -(-n // bn), -(-k // bk)
    scale = torch.empty(rows, cols)
    q = torch.empty(n, k, dtype=dtype)
    for i in range(rows):
        for j in range(cols):
            tile = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].float()
            amax = tile.abs().max()
            s = amax / fmax if amax > 0 else torch.tensor(1.0)
            scale[i, j] = s
            q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = (tile / s).clamp(-fmax, fmax).to(dtype)
    return q, scale


@pytest.mark.parametrize("dtype", FP8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_fp8_block_matches_tile_loop(shape, dtype):
    w = weight(shape)
    q, s = quantize_fp8_block(w, (128, 128), dtype)
    q_ref, s_ref = loop_fp8_block(w, (128, 128), dtype)
    assert_bitwise_equal(s, s_ref, f"scale n,k={shape}")
    assert_bitwise_equal(q, q_ref, f"q n,k={shape} dtype={dtype}")


def test_fp8_block_zero_tile_gets_unit_scale():
    w = torch.zeros(256, 256, dtype=torch.bfloat16)
    w[:128, :128] = 1.0
    q, s = quantize_fp8_block(w)
    assert s[1, 1] == 1.0 and s[0, 0] == 1.0 / 448
    assert torch.equal(dequantize_fp8_block(q, s), w)


def test_fp8_block_matches_transformers_quantizer():
    """transformers' Fp8Quantize computes w * (448/amax) and stores 1/(448/amax); q divides by
    amax/448. They agree to within one fp8 step on a few elements, scales to 1 ulp."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    class Cfg:
        weight_block_size = (128, 128)
        scale_fmt = "float"

    class Quantizer:
        quantization_config = Cfg()

    w = weight((256, 384))
    out = Fp8Quantize(Quantizer())._quantize_one("x.weight", w)
    q, s = quantize_fp8_block(w)
    torch.testing.assert_close(s, out["x.weight_scale_inv"], rtol=2**-22, atol=0)
    codes_differ = (q.float() != out["x.weight"].float()).float().mean().item()
    assert codes_differ < 1e-3, f"{codes_differ:.2e} of the fp8 codes differ from transformers"
    deq_q = dequantize_fp8_block(q, s, out_dtype=torch.float32)
    deq_t = dequantize_fp8_block(out["x.weight"], out["x.weight_scale_inv"], out_dtype=torch.float32)
    assert sqnr(deq_q, deq_t) > 60


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_fp8_per_channel_and_tensor_match_loop(shape):
    w = weight(shape)
    fmax = 448.0
    q, s = quantize_fp8_per_channel(w)
    for row in range(shape[0]):
        amax = w[row].float().abs().max()
        s_ref = amax / fmax if amax > 0 else torch.tensor(1.0)
        assert s[row, 0] == s_ref, f"row {row}"
        assert_bitwise_equal(q[row], (w[row].float() / s_ref).clamp(-fmax, fmax).to(q.dtype))
    qt, st = quantize_fp8_per_tensor(w)
    s_ref = w.float().abs().max() / fmax
    assert st.shape == (1, 1) and st[0, 0] == s_ref
    assert_bitwise_equal(qt, (w.float() / s_ref).clamp(-fmax, fmax).to(qt.dtype))


def numpy_weight_quantize(w: np.ndarray, bits: int, group: int | None):
    """Paddle weight_quantize semantics re-derived in numpy (half away from zero)."""
    qmax = {8: 127, 4: 7}[bits]
    n, k = w.shape
    g = group or k
    q = np.empty((n, k), dtype=np.int8)
    scales = np.empty((n, -(-k // g)), dtype=np.float32)
    for j in range(0, k, g):
        part = w[:, j:j + g]
        amax = np.abs(part).max(axis=1)
        s = np.where(amax > 0, amax / np.float32(qmax), np.float32(1)).astype(np.float32)
        x = part / s[:, None]
        r = np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))
        q[:, j:j + g] = np.clip(r, -qmax, qmax).astype(np.int8)
        scales[:, j // g] = s
    return q, scales


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [None, 64, 128], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_int_weight_restricted_matches_paddle_numpy(shape, bits, group):
    w = weight(shape)
    q, s = quantize_int_weight(w, bits, group, int_range="restricted")
    q_ref, s_ref = numpy_weight_quantize(w.float().numpy(), bits, group)
    assert_bitwise_equal(s, torch.from_numpy(s_ref), f"scale {shape} bits={bits} g={group}")
    assert_bitwise_equal(q, torch.from_numpy(q_ref), f"codes {shape} bits={bits} g={group}")
    assert int(q.abs().max()) <= {8: 127, 4: 7}[bits]
    gauss = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    deq = dequantize_int_weight(*quantize_int_weight(gauss, bits, group, int_range="restricted"),
                                group, torch.float32)
    assert sqnr(gauss, deq) > {8: 38, 4: 14}[bits], f"{shape} bits={bits} g={group}"


def compressed_tensors_int_quantize(w: torch.Tensor, bits: int, group: int | None):
    """compressed-tensors' own symmetric qparams and quantize (what llm-compressor's RTN
    runs), fp32, with q's zero-padded ragged last group."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    n, k = w.shape
    g = group or k
    pad = -k % g
    v = torch.nn.functional.pad(w.float(), (0, pad)).view(n, -1, g)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True,
                            strategy="group" if group else "channel", group_size=group)
    scale, zero = calculate_qparams(v.amin(-1), v.amax(-1), args)
    codes = quantize(v, scale[..., None], zero[..., None], args, dtype=torch.int8)
    return codes.view(n, -1)[:, :k], scale


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [None, 64, 128], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_int_weight_full_range_matches_compressed_tensors(shape, bits, group):
    """The default: llm-compressor's RTN numerics bit for bit (fp32 weights and scales)."""
    w = weight(shape).float()
    w[1, 0] = -w[1].abs().max() * 2  # a row whose largest magnitude is negative: code -2^(b-1)
    q, s = quantize_int_weight(w, bits, group)
    q_ref, s_ref = compressed_tensors_int_quantize(w, bits, group)
    assert_bitwise_equal(s, s_ref, f"scale {shape} bits={bits} g={group}")
    assert_bitwise_equal(q, q_ref, f"codes {shape} bits={bits} g={group}")
    assert int(q.min()) == -(1 << (bits - 1))
    gauss = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    full = dequantize_int_weight(*quantize_int_weight(gauss, bits, group), group, torch.float32)
    restricted = dequantize_int_weight(
        *quantize_int_weight(gauss, bits, group, int_range="restricted"), group, torch.float32)
    if bits == 4:  # 16 levels against 15: about 0.5 dB on Gaussians
        assert sqnr(gauss, full) > sqnr(gauss, restricted) + 0.2, f"{shape} g={group}"
        gen = torch.Generator().manual_seed(4)
        heavy = {"laplace": torch.distributions.Laplace(0.0, 1.0),
                 "student-t3": torch.distributions.StudentT(3.0)}
        for label, dist in heavy.items():  # heavier tails: still ahead
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
            w = dist.sample(shape)
            errs = {r: sqnr(w, dequantize_int_weight(*quantize_int_weight(w, 4, group,
                                                                          int_range=r),
                                                     group, torch.float32))
                    for r in ("full", "restricted")}
            assert errs["full"] > errs["restricted"], f"{label} {shape} g={group}: {errs}"
    else:  # 256 against 255 levels: no worse, within rounding noise
        assert sqnr(gauss, full) > sqnr(gauss, restricted) - 0.3, f"{shape} g={group}"


def test_int_range_rounding():
    w = torch.tensor([[127.0, 0.5, -0.5, 1.5, -2.5, 63.5]])
    q, s = quantize_int_weight(w, 8, int_range="restricted")  # Paddle: half away from zero
    assert s.item() == 1.0
    assert q.tolist() == [[127, 1, -1, 2, -3, 64]]
    w[0, 0] = 127.5  # full: s = 127.5 / 127.5, half to even, 127.5 clipped to 127
    q, s = quantize_int_weight(w, 8)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 0, 0, 2, -2, 64]]
    with pytest.raises(ValueError, match="int_range"):
        quantize_int_weight(w, 8, int_range="wide")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [8, 13, 64, 129, 576])
def test_packing_matches_compressed_tensors(bits, k):
    from compressed_tensors.compressors.pack_quantized.helpers import (
        pack_to_int32, unpack_from_int32,
    )

    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(lo, hi + 1, (7, k), dtype=torch.int8,
                          generator=torch.Generator().manual_seed(k))
    ours = pack_int32(codes, bits)
    theirs = pack_to_int32(codes, bits)
    assert_bitwise_equal(ours, theirs, f"pack bits={bits} k={k}")
    assert_bitwise_equal(unpack_int32(ours, bits, k), codes)
    assert_bitwise_equal(unpack_from_int32(ours, bits, torch.Size((7, k))).to(torch.int8), codes)
    # zero points are packed along dim 0 (output rows)
    assert_bitwise_equal(pack_int32(codes.T.contiguous(), bits, dim=0),
                         pack_to_int32(codes.T.contiguous(), bits, packed_dim=0))


@pytest.mark.parametrize("shape", [(1, 128), (5, 256), (3, 4, 384)], ids=str)
def test_act_per_token_group_matches_float64(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3
    xq, s = quantize_act_per_token_group(x)
    xg = x.double().reshape(*shape[:-1], -1, 128)
    s_ref = (xg.abs().amax(-1).clamp(min=1e-10) / 448).float()
    assert_bitwise_equal(s, s_ref)
    deq = (xq.float().reshape(xg.shape) * s.unsqueeze(-1)).reshape(shape)
    assert sqnr(x, deq) > 28


def test_act_quant_rejects_ragged_width():
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize_act_per_token_group(torch.randn(2, 100))


def test_references_run_on_meta():
    """Planning runs every quantizer on meta tensors to learn output shapes."""
    w = torch.empty(576, 1536, dtype=torch.bfloat16, device="meta")
    q, s = quantize_fp8_block(w)
    assert q.shape == (576, 1536) and s.shape == (5, 12) and q.device.type == "meta"
    q, s = quantize_int_weight(w, 4, 128)
    assert s.shape == (576, 12)
    assert pack_int32(q, 4).shape == (576, 192)


def numpy_asym_quantize(w: np.ndarray, bits: int, group: int | None):
    """compressed-tensors' asymmetric formula, group by group in numpy (float32)."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    n, k = w.shape
    g = group or k
    codes = np.empty((n, k), dtype=np.int8)
    scales = np.empty((n, -(-k // g)), dtype=np.float32)
    zeros = np.empty_like(scales, dtype=np.int8)
    for j in range(0, k, g):
        part = w[:, j:j + g]
        lo = np.minimum(part.min(axis=1), 0).astype(np.float32)
        hi = np.maximum(part.max(axis=1), 0).astype(np.float32)
        rng = (hi - lo).astype(np.float32)
        s = np.where(rng == 0, np.float32(1), rng / np.float32(qmax - qmin)).astype(np.float32)
        zp = np.clip(np.round(np.float32(qmin) - lo / s), qmin, qmax)
        codes[:, j:j + g] = np.clip(np.round(part / s[:, None]) + zp[:, None], qmin, qmax)
        scales[:, j // g], zeros[:, j // g] = s, zp
    return codes, scales, zeros


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [None, 32, 128], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_int_weight_asym_matches_numpy(shape, bits, group):
    w = weight(shape)
    q, s, zp = quantize_int_weight_asym(w, bits, group)
    q_ref, s_ref, zp_ref = numpy_asym_quantize(w.float().numpy(), bits, group)
    assert_bitwise_equal(s, torch.from_numpy(s_ref), f"scale {shape} bits={bits} g={group}")
    assert_bitwise_equal(zp, torch.from_numpy(zp_ref), f"zero point {shape} bits={bits}")
    assert_bitwise_equal(q, torch.from_numpy(q_ref), f"codes {shape} bits={bits} g={group}")

"""Sibling projections (q/k/v, gate/up) fused into one GEMM at load: which groups fuse, the
stacked quantized layout, and the engine's numbers with and without fusing."""

from __future__ import annotations

import pytest
import torch

import q
from q.kernels.scaled_gemm.cpp_impl import amx_unavailable as amx_int8_unavailable
from q.plugins.engines.native import dense, loader
from q.plugins.engines.native.fused import FusedPart, sibling_groups, stack_quantized
from q.tensor import QuantizedTensor


def test_sibling_groups_need_every_member():
    names = ["m.0.attn.q_proj", "m.0.attn.k_proj", "m.0.attn.v_proj", "m.0.attn.o_proj",
             "m.0.mlp.gate_proj", "m.0.mlp.up_proj", "m.0.mlp.down_proj",
             "m.1.attn.q_proj", "m.1.attn.k_proj",  # v_proj kept unquantized (--ignore)
             "m.1.mlp.up_proj"]
    assert sibling_groups(names) == [("m.0.attn", ("q_proj", "k_proj", "v_proj")),
                                     ("m.0.mlp", ("gate_proj", "up_proj"))]


def _qt(n, k, block, bits=8, zero=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = (-(-n // block[0]), -(-k // block[1]))
    return QuantizedTensor(torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8),
                           torch.rand(grid, generator=g), block, torch.bfloat16, bits,
                           torch.randint(-2, 2, grid, generator=g).float() if zero else None)


def test_stack_quantized_keeps_every_code_and_scale():
    parts = [_qt(64, 128, (1, 32), 4, True, s) for s in range(3)]
    stacked = stack_quantized(parts)
    assert stacked.shape == (192, 128) and stacked.block_size == (1, 32) and stacked.bits == 4
    assert torch.equal(stacked.qdata, torch.cat([p.qdata for p in parts]))
    assert torch.equal(stacked.scale, torch.cat([p.scale for p in parts]))
    assert torch.equal(stacked.zero_point, torch.cat([p.zero_point for p in parts]))
    blocks = [_qt(256, 256, (128, 128)), _qt(128, 256, (128, 128))]
    assert stack_quantized(blocks).scale.shape == (3, 2)


@pytest.mark.parametrize("parts", [
    [_qt(64, 128, (64, 128)), _qt(32, 128, (32, 128))],  # per-tensor scales: one each
    [_qt(256, 256, (128, 128)), _qt(64, 256, (128, 128))],  # 64 rows do not fill a block
    [_qt(64, 128, (1, 32)), _qt(64, 128, (1, 64))],  # different groups
    [_qt(64, 128, (1, 32), zero=True), _qt(64, 128, (1, 32))],  # zero points in one only
    [_qt(64, 128, (1, 128), bits=4), _qt(64, 128, (1, 128), bits=8)],
])
def test_stack_quantized_refuses_what_would_change_the_products(parts):
    assert stack_quantized(parts) is None


def _unfused(monkeypatch):
    monkeypatch.setattr(loader, "fusable_groups", lambda *a, **k: {})
    monkeypatch.setattr(dense, "sibling_groups", lambda names: [])


SCHEMES = [("bf16", None, {}), ("wint4", "wint4", {"group_size": 32}),
           ("wint8", "wint8", {}), ("w8a8-int8", "w8a8-int8", {}),
           ("fp8-dynamic", "fp8-dynamic", {})]


@pytest.mark.parametrize("label,scheme,args", SCHEMES, ids=[s[0] for s in SCHEMES])
def test_fused_engine_matches_unfused(tiny_llama, monkeypatch, label, scheme, args):
    """Same checkpoint, bf16 compute, torch's kernels: the fused model's prompt logits and
    greedy tokens against one GEMM per projection (bf16 products: a fused GEMM may block
    K differently, so logits agree to bf16 rounding, not bit for bit)."""
    path = tiny_llama(layers=2)
    fused = q.load_engine(path, scheme=scheme, args=args, dtype="bfloat16")
    attn = fused.model.model.layers[0].self_attn
    if scheme == "w8a8-int8" and amx_int8_unavailable(768, 256) is not None:
        # int8 W8A8 on _int_mm stays unfused (measured slower fused)
        assert not isinstance(attn.q_proj, FusedPart) and fused.report.fused == 0
        return
    assert isinstance(attn.q_proj, FusedPart) and attn.q_proj.group is attn.v_proj.group
    assert isinstance(fused.model.model.layers[1].mlp.up_proj, FusedPart)
    with monkeypatch.context() as m:
        _unfused(m)
        plain = q.load_engine(path, scheme=scheme, args=args, dtype="bfloat16")
    assert not isinstance(plain.model.model.layers[0].self_attn.q_proj, FusedPart)
    ids = [3, 17, 99, 250, 4, 8, 400, 21]
    got, want = fused.prompt_logits(ids), plain.prompt_logits(ids)
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    assert fused.generate([ids], max_tokens=4, ignore_eos=True)[0].token_ids == \
        plain.generate([ids], max_tokens=4, ignore_eos=True)[0].token_ids
    if scheme is not None:  # q eval reaches each projection through the report
        part = fused.report.quantized["model.layers.0.self_attn.k_proj"]
        x = torch.randn(5, part.in_features, dtype=torch.bfloat16)
        torch.testing.assert_close(
            part(x), plain.report.quantized["model.layers.0.self_attn.k_proj"](x),
            rtol=0.02, atol=0.02 * plain.report.quantized[
                "model.layers.0.self_attn.k_proj"](x).abs().max().item())
        assert fused.report.fused == 4  # 2 layers x (qkv, gate/up)


def test_reference_and_fp32_keep_one_layer_per_projection(tiny_llama):
    session = q.load_engine(tiny_llama(layers=2), scheme="wint8", impl="reference")
    assert not isinstance(session.model.model.layers[0].self_attn.q_proj, FusedPart)
    assert session.report.fused == 0

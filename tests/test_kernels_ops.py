"""The GEMM-path ops' torch references against float64 math written out here block by block,
and the dispatcher that chooses between them and their Triton kernels."""

from __future__ import annotations

import logging
import sys
import zlib

import pytest
import torch

from q.kernels import act_quant, block_gemm, dispatch, scaled_gemm, weight_only_gemm
from q.kernels.packing.reference import pack_int4_bytes
from q.testing import assert_bitwise_equal

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
SHAPES = [(1, 128, 256), (5, 200, 300), (33, 96, 576), (4, 130, 129)]
OPS = {"act_quant": act_quant, "block_gemm": block_gemm, "scaled_gemm": scaled_gemm,
       "weight_only_gemm": weight_only_gemm}


def shape_id(s):
    return "x".join(str(v) for v in s)


def gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def cdiv(a, b):
    return (a + b - 1) // b


def rel_err(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


# ---- references against float64 ----

def loop_quantize_activation(x, group, qdtype):
    """Group by group with explicit slices; the division is done in float64 and rounded to
    fp32 once (the same value as an fp32 division), codes rounded from there."""
    m, k = x.shape
    g = k if group is None else group
    qmax = 127.0 if qdtype == torch.int8 else float(torch.finfo(qdtype).max)
    scales = torch.empty(m, cdiv(k, g), dtype=torch.float32)
    codes = torch.empty(m, k, dtype=qdtype)
    for r in range(m):
        for j in range(cdiv(k, g)):
            seg = x[r, j * g:(j + 1) * g].double()
            s = torch.tensor(max(seg.abs().max().item(), 1e-10)).float().double() / qmax
            s = s.float()
            v = (seg / s.double()).float().double()
            if qdtype == torch.int8:
                v = v.round()  # half to even
            scales[r, j] = s
            codes[r, j * g:(j + 1) * g] = v.clamp(-qmax, qmax).float().to(qdtype)
    return codes, scales


@pytest.mark.parametrize("qdtype", [E4M3, E5M2, torch.int8], ids=["e4m3", "e5m2", "int8"])
@pytest.mark.parametrize("group", [128, 64, None], ids=["g128", "g64", "token"])
@pytest.mark.parametrize("mk", [(3, 256), (5, 300), (2, 129)], ids=shape_id)
def test_act_quant_reference_matches_loop(qdtype, group, mk):
    g = gen("aq", qdtype, group, mk)
    x = (torch.randn(mk, generator=g) * 5).to(torch.bfloat16)
    x[0, :4] = torch.tensor([0.5, -2.5, 300.0, 1e-3])
    x[1] = 0  # all-zero token: floor scale, zero codes
    q, s = act_quant.reference.quantize_activation(x, group, qdtype)
    q_ref, s_ref = loop_quantize_activation(x, group, qdtype)
    assert_bitwise_equal(s, s_ref, "scales")
    assert_bitwise_equal(q, q_ref, "codes")


def fp8(shape, dtype, g):
    return (torch.randn(shape, generator=g) * 40).to(dtype)


@pytest.mark.parametrize("block", [(128, 128), (64, 128)], ids=["b128", "bn64"])
@pytest.mark.parametrize("mnk", SHAPES, ids=shape_id)
def test_block_gemm_reference_matches_float64(mnk, block):
    m, n, k = mnk
    bn, bk = block
    g = gen("bg", mnk, block)
    xq, wq = fp8((m, k), E4M3, g), fp8((n, k), E4M3, g)
    xs = torch.rand(m, cdiv(k, bk), generator=g) + 0.5
    ws = torch.rand(cdiv(n, bn), cdiv(k, bk), generator=g) + 0.5
    y64 = torch.zeros(m, n, dtype=torch.float64)
    for kb in range(cdiv(k, bk)):
        cols = slice(kb * bk, (kb + 1) * bk)
        part = xq[:, cols].double() @ wq[:, cols].double().T
        w_scale = ws[torch.arange(n) // bn, kb].double()
        y64 += part * xs[:, kb].double()[:, None] * w_scale[None, :]
    y = block_gemm.reference.fp8_block_gemm(xq, xs, wq, ws, block, torch.float32)
    assert y.dtype == torch.float32
    assert rel_err(y, y64) < 1e-6


@pytest.mark.parametrize("kind", ["int8", "e4m3", "e5m2"])
@pytest.mark.parametrize("per_tensor", [False, True], ids=["channel", "tensor"])
@pytest.mark.parametrize("mnk", SHAPES, ids=shape_id)
def test_scaled_gemm_reference_matches_float64(mnk, kind, per_tensor):
    m, n, k = mnk
    g = gen("sg", mnk, kind, per_tensor)
    if kind == "int8":
        xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
        wq = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    else:
        dtype = E4M3 if kind == "e4m3" else E5M2
        xq, wq = fp8((m, k), dtype, g), fp8((n, k), dtype, g)
    xs = torch.rand(m, 1, generator=g) + 0.5
    ws = torch.rand(1 if per_tensor else n, 1, generator=g) + 0.5
    y64 = torch.einsum("mk,nk->mn", xq.double(), wq.double())
    y64 = y64 * xs.double() * ws.double().reshape(1, -1)
    y = scaled_gemm.reference.scaled_gemm(xq, xs, wq, ws, torch.float32)
    assert rel_err(y, y64) < 1e-6
    assert scaled_gemm.reference.scaled_gemm(xq, xs, wq, ws, torch.bfloat16).dtype == \
        torch.bfloat16


def nibbles(packed, k):
    """Unpack int4 with integer arithmetic: low nibble first, values >= 8 are negative."""
    out = torch.empty(packed.shape[0], 2 * packed.shape[1], dtype=torch.int64)
    p = packed.long()
    out[:, 0::2] = p & 0xF
    out[:, 1::2] = p >> 4
    return torch.where(out >= 8, out - 16, out)[:, :k]


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("group,zero", [(0, False), (128, True), (64, False), (100, True)],
                         ids=["channel", "g128-zp", "g64", "g100-zp"])
@pytest.mark.parametrize("mnk", SHAPES, ids=shape_id)
def test_weight_only_reference_matches_float64(mnk, kind, group, zero):
    m, n, k = mnk
    group = group or k
    ng = cdiv(k, group)
    g = gen("wo", mnk, kind, group, zero)
    if kind == "fp8":
        wq, bits = fp8((n, k), E4M3, g), 8
        codes = wq.double()
    else:
        qmax = 127 if kind == "int8" else 7
        c = torch.randint(-qmax - 1, qmax + 1, (n, k), generator=g, dtype=torch.int8)
        wq, bits = (c, 8) if kind == "int8" else (pack_int4_bytes(c), 4)
        codes = c.double() if kind == "int8" else nibbles(wq, k).double()
        assert torch.equal(codes, c.double())
    ws = torch.rand(n, ng, generator=g) * 0.02 + 0.001
    zp = torch.randint(-8, 8, (n, ng), generator=g, dtype=torch.int8) if zero else None
    x = torch.randn(m, k, generator=g)
    w64 = torch.empty(n, k, dtype=torch.float64)
    for j in range(ng):
        cols = slice(j * group, (j + 1) * group)
        z = zp[:, j, None].double() if zero else 0.0
        w64[:, cols] = (codes[:, cols] - z) * ws[:, j, None].double()
    y64 = x.double() @ w64.T
    y = weight_only_gemm.reference.weight_only_gemm(x, wq, ws, group, bits, zp, torch.float32)
    assert rel_err(y, y64) < 1e-6


# ---- the dispatcher ----

def small_calls():
    """One small call per op: (module, function name, args)."""
    g = gen("dispatch")
    x = torch.randn(2, 256, generator=g)
    xq, xs = act_quant.reference.quantize_activation(x, 128, E4M3)
    wq = fp8((64, 256), E4M3, g)
    ws_block = torch.ones(1, 2)
    c8 = torch.randint(-127, 128, (64, 256), generator=g, dtype=torch.int8)
    xq8, xs8 = act_quant.reference.quantize_activation(x, None, torch.int8)
    return [
        (act_quant, "quantize_activation", (x, 128, E4M3)),
        (block_gemm, "fp8_block_gemm", (xq, xs, wq, ws_block)),
        (scaled_gemm, "scaled_gemm", (xq8, xs8, c8, torch.ones(64, 1))),
        (weight_only_gemm, "weight_only_gemm", (x, c8, torch.ones(64, 1), 256)),
    ]


@pytest.fixture
def no_triton_impl(monkeypatch):
    """Importing any op's triton_impl raises ImportError (a None entry in sys.modules)."""
    for name in OPS:
        monkeypatch.setitem(sys.modules, f"q.kernels.{name}.triton_impl", None)


def same(a, b):
    for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,),
                    strict=True):
        assert_bitwise_equal(u, v)


def test_reference_never_imports_triton_impl(monkeypatch, no_triton_impl):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # auto would pick Triton here
    for module, name, args in small_calls():
        out = getattr(module, name)(*args, impl="reference")
        same(out, getattr(module.reference, name)(*args))


def test_auto_on_cpu_without_interpreter_runs_reference(monkeypatch, no_triton_impl, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with caplog.at_level(logging.WARNING, logger="q.kernels"):
        for module, name, args in small_calls():
            same(getattr(module, name)(*args, impl="auto"), getattr(module.reference, name)(*args))
    assert not caplog.records  # auto falls back silently


@pytest.mark.parametrize("how", ["patched-reason", "cpu-without-interpreter"])
def test_triton_where_it_cannot_run_warns_once_and_falls_back(monkeypatch, no_triton_impl,
                                                              caplog, how):
    monkeypatch.setattr(dispatch, "_warned", set())
    if how == "patched-reason":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(dispatch, "triton_unavailable_reason",
                            lambda device, fp8=False: "this test says no")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = small_calls()
    with caplog.at_level(logging.WARNING, logger="q.kernels"):
        for _ in range(2):
            for module, name, args in calls:
                same(getattr(module, name)(*args, impl="triton"),
                     getattr(module.reference, name)(*args))
    ops_warned = [r.getMessage().split(":")[0] for r in caplog.records]
    assert sorted(ops_warned) == sorted(name for _, name, _ in calls)  # once per op
    if how == "patched-reason":
        assert all("this test says no" in r.getMessage() for r in caplog.records)


def test_unavailable_reason_follows_the_environment(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert dispatch.triton_unavailable_reason(cpu) is not None
    assert not dispatch.use_triton("auto", cpu, "op")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if dispatch.triton_installed():
        assert dispatch.triton_unavailable_reason(cpu) is None
        assert dispatch.use_triton("auto", cpu, "op")
    assert not dispatch.use_triton("reference", cpu, "op")


def test_launch_configs_are_data_with_buckets_and_overrides(monkeypatch):
    from q.kernels import configs
    from q.kernels.configs import launch_config, m_bucket

    assert [m_bucket(m) for m in (1, 2, 16, 17, 128, 1000, 1024, 4096, 10**6)] == \
        [1, 16, 16, 128, 128, 1024, 1024, 4096, 4096]
    for op in ("act_quant", "block_gemm", "scaled_gemm", "weight_only_gemm"):
        for m in (1, 16, 128, 1024, 4096, 9999):
            cfg = launch_config(op, m, 4096, 4096)
            assert cfg["num_warps"] in (1, 2, 4, 8, 16) and cfg["num_stages"] >= 1
            for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
                if key in cfg:
                    assert cfg[key] >= 16 and cfg[key] & (cfg[key] - 1) == 0, (op, m, key)
    # a per-shape entry overrides its bucket; other shapes keep the bucket's values
    table = {"default": {"SPLIT_K": 1, "BLOCK_N": 64}, "m": {"1": {"BLOCK_N": 32}},
             "nk": {"4096x14336": {"1": {"SPLIT_K": 4}}}}
    with monkeypatch.context() as patch:
        patch.setattr(configs, "_table", lambda op: table)
        assert launch_config("x", 1, 4096, 14336) == {"SPLIT_K": 4, "BLOCK_N": 32}
        assert launch_config("x", 1, 4096, 4096) == {"SPLIT_K": 1, "BLOCK_N": 32}
        assert launch_config("x", 200, 4096, 14336) == {"SPLIT_K": 1, "BLOCK_N": 64}
    cfg = launch_config("weight_only_gemm", 1)
    cfg["BLOCK_N"] = 0  # a fresh dict each call: callers may update it
    assert launch_config("weight_only_gemm", 1)["BLOCK_N"] != 0
    with pytest.raises(ValueError, match="no launch configs"):
        launch_config("no_such_op", 1)

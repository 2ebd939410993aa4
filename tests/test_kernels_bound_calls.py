"""Runs of bound kernel calls through the C++ call runner (q.kernels.bound_calls): the same
bits as the kernels called one by one and as their torch references, the per-step
registers read anew on every run, a refusing kernel named with nothing after it run, and
runs split around the Python calls between them."""

from __future__ import annotations

import ctypes

import pytest
import torch
from q.kernels import bound_calls
from q.kernels.bound_calls import BoundCall, CallRun, batch
from q.kernels.decoder_ops import reference

cpp = pytest.importorskip("q.kernels.decoder_ops.cpp_impl")
if cpp.unavailable_reason(torch.bfloat16) is not None:
    pytest.skip(f"C++ decoder ops: {cpp.unavailable_reason(torch.bfloat16)}",
                allow_module_level=True)
if bound_calls.runner_unavailable() is not None:
    pytest.skip(f"call runner: {bound_calls.runner_unavailable()}", allow_module_level=True)

ROWS, HEADS, KV_HEADS, DIM, WIDTH, FFN = 3, 4, 2, 32, 256, 96


def _bf16(*shape, g):
    return torch.randn(*shape, generator=g).to(torch.bfloat16)


class _Layer:
    """A norm (eps 0.25: the float argument matters), the rotary embedding with the cache
    write reading per-step registers, and SiLU x up, bound to fixed buffers."""

    def __init__(self, g):
        self.x, self.w = _bf16(ROWS, WIDTH, g=g) * 3, _bf16(WIDTH, g=g)
        self.h = torch.zeros(ROWS, WIDTH, dtype=torch.bfloat16)
        self.qkv = _bf16(ROWS, (HEADS + 2 * KV_HEADS) * DIM, g=g)
        self.q, self.k, self.v = self.qkv.split([HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM], 1)
        self.k_cache = torch.zeros(4, KV_HEADS, DIM, 64, dtype=torch.bfloat16)
        self.v_cache = torch.zeros(4, KV_HEADS, 64, DIM, dtype=torch.bfloat16)
        self.gate_up = _bf16(ROWS, 2 * FFN, g=g) * 4
        self.act = torch.zeros(ROWS, FFN, dtype=torch.bfloat16)
        self.cos, self.sin, self.slots = (ctypes.c_void_p() for _ in range(3))
        gate, up = self.gate_up.split(FFN, 1)
        self.calls = [
            cpp.bind_rms_norm(self.x, self.w, 0.25, self.h),
            cpp.bind_rotary_cache(self.q, self.k, self.v, DIM, self.k_cache, self.v_cache,
                                  self.cos, self.sin, self.slots),
            cpp.bind_silu_mul(gate, up, self.act)]

    def point(self, cos, sin, slots):
        self.cos.value, self.sin.value = cos.data_ptr(), sin.data_ptr()
        self.slots.value = slots.data_ptr()

    @property
    def registers(self):
        return (self.cos, self.sin, self.slots)


def test_a_run_matches_the_calls_one_by_one_and_the_references():
    g = torch.Generator().manual_seed(0)
    layer = _Layer(g)
    steps = batch(layer.calls, layer.registers)
    assert len(steps) == 1 and isinstance(steps[0], CallRun)
    for step in range(3):  # each step points the registers at new tables and slots
        cos, sin = _bf16(ROWS, DIM, g=g), _bf16(ROWS, DIM, g=g)
        slots = torch.randperm(4 * 64, generator=g)[:ROWS]
        layer.point(cos, sin, slots)
        q, k = layer.q.clone(), layer.k.clone()
        caches = layer.k_cache.clone(), layer.v_cache.clone()
        steps[0]()
        assert torch.equal(layer.h, cpp.rms_norm(layer.x, layer.w, 0.25)), step
        want_q, want_k = reference.rotary(q, k, cos, sin, DIM)
        assert torch.equal(layer.q, want_q) and torch.equal(layer.k, want_k), step
        reference.write_cache(want_k, layer.v, *caches, slots)
        assert torch.equal(layer.k_cache, caches[0]), step
        assert torch.equal(layer.v_cache, caches[1]), step
        assert torch.equal(layer.act, reference.silu_mul(*layer.gate_up.split(FFN, 1))), step


def test_runs_split_around_python_calls_and_keep_the_order():
    layer = _Layer(torch.Generator().manual_seed(1))
    seen = []
    norm, rotary, silu = layer.calls
    steps = batch([norm, lambda: seen.append(layer.h.clone()), rotary, silu], layer.registers)
    assert [isinstance(s, CallRun) for s in steps] == [True, False, True]
    assert [len(s.calls) for s in steps if isinstance(s, CallRun)] == [1, 2]
    cos, slots = torch.ones(ROWS, DIM, dtype=torch.bfloat16), torch.arange(ROWS)
    layer.point(cos, cos, slots)
    for step in steps:
        step()
    assert torch.equal(seen[0], cpp.rms_norm(layer.x, layer.w, 0.25))  # the norm ran first


def test_a_refusing_kernel_is_named_and_nothing_after_it_runs():
    from q.kernels.dense_gemm.cpp_impl import _amx

    lib = _amx()[0]
    if lib is None:
        pytest.skip(f"q's bf16 strip kernel: {_amx()[1]}")
    layer = _Layer(torch.Generator().manual_seed(2))
    x, w = torch.zeros(1, 32, dtype=torch.bfloat16), torch.zeros(64, dtype=torch.bfloat16)
    out = torch.zeros(1, 8, dtype=torch.bfloat16)
    # N = 8 is no multiple of 16: the kernel returns 1 before it reads anything
    gemm = BoundCall(lib, "q_bf16_amx", (x.data_ptr(), w.data_ptr(), None, out.data_ptr(),
                                         1, 8, 32, 1))
    silu = layer.calls[2]
    steps = batch([gemm, silu])
    with pytest.raises(RuntimeError, match=r"the C\+\+ kernel q_bf16_amx refused"):
        steps[0]()
    assert not layer.act.any()  # SiLU x up, after it, did not run
    with pytest.raises(RuntimeError, match="q_bf16_amx refused"):
        gemm()  # the same call from Python says the same


def test_bound_arguments_are_checked_when_bound():
    layer = _Layer(torch.Generator().manual_seed(3))
    lib = cpp._library()[0]
    with pytest.raises(TypeError, match="q_silu_mul takes 9 arguments, 2 were bound"):
        BoundCall(lib, "q_silu_mul", (0, 0))
    # a ctypes object the run is not told about would keep the value it had when batched
    with pytest.raises(ValueError, match=r"argument 11 \(from 0\) of q_rotary_cache is a ctypes object"):
        batch(layer.calls, registers=(layer.sin, layer.slots))

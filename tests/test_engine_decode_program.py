"""Decode steps replayed from bound calls (plugins/engines/native/decode_program.py) against
the decoder forward they replace, on the same loaded model: every step's logits bit for bit,
through decode batches that shrink from 12 sequences to 1 as requests finish (past the
weight-only kernels' register path at 8), sequences that cross cache blocks, a sliding
window and q/k/v biases; GEMMs bound straight to their kernels (bf16, wint8, wint4, int8
W8A8) or run through their modules (fp8)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import q
from q.generation import SamplingParams

from .conftest import save_tiny_arch

cpp = pytest.importorskip("q.kernels.decoder_ops.cpp_impl")
if cpp.unavailable_reason(torch.bfloat16) is not None:
    pytest.skip(f"C++ decoder ops: {cpp.unavailable_reason(torch.bfloat16)}",
                allow_module_level=True)

ARCHS = {
    "llama": ("LlamaConfig", {}),
    "mistral-window": ("MistralConfig", {"sliding_window": 24}),
    "qwen2": ("Qwen2Config", {}),  # q/k/v biases
}


PROMPTS = [62, 70, 5, 60, 3, 9, 4, 8, 6, 7, 30, 2]


def _run(session, replay: bool) -> tuple[list[torch.Tensor], list[int]]:
    """Every step's logits of one workload, and the token counts of the replayed steps."""
    forward = session.runner.forward
    programs = forward.programs
    forward.programs = programs if replay else None
    replayed, seen = [], []
    run = type(programs.get(1, session.runner.cache)).run

    def counting(self, input_ids, *args):
        replayed.append(len(input_ids))
        return run(self, input_ids, *args)

    def recording(**kwargs):
        out = forward(**kwargs)
        seen.append(out.clone())
        return out

    session.runner.forward = recording
    type(programs.get(1, session.runner.cache)).run = counting
    try:
        # prompts of 60-70 tokens decode across the 64-token block boundary; the requests
        # finish one after another, so decode batches go 12, 11, ..., 1
        for i, n in enumerate(PROMPTS):
            session.add_request(list(range(3 + i, 3 + i + n)),
                                SamplingParams(max_tokens=2 + i, ignore_eos=True))
        while session.has_unfinished():
            session.step()
    finally:
        session.runner.forward = forward
        type(programs.get(1, session.runner.cache)).run = run
        forward.programs = programs
    return seen, replayed


def _bindable(scheme: str | None) -> bool:
    """Whether this CPU runs the strip kernel a layer of ``scheme`` binds to."""
    from q.kernels.dense_gemm.cpp_impl import amx_unavailable as bf16
    from q.kernels.scaled_gemm.cpp_impl import amx_unavailable as int8
    from q.kernels.weight_only_gemm.cpp_impl import amx_int4_unavailable, amx_unavailable

    return {None: bf16(16, 32), "wint8": amx_unavailable(16, 32),
            "wint4": amx_int4_unavailable(16, 32, 32), "w8a8-int8": int8(16, 64),
            "fp8-dynamic": "fp8 weights are dequantized to bf16 on CPU: no bound kernel"
            }[scheme] is None


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("scheme", [None, "wint8", "wint4", "w8a8-int8", "fp8-dynamic"])
def test_replayed_decode_steps_are_bit_exact_to_the_forward(arch, scheme, tmp_path, caplog):
    cls_name, extra = ARCHS[arch]
    path = save_tiny_arch(tmp_path, cls_name, **extra)
    with caplog.at_level(logging.INFO, logger="q.engine"):
        session = q.load_engine(path, scheme=scheme, dtype="bfloat16", max_batch=len(PROMPTS))
        got, replayed = _run(session, replay=True)
    want, none = _run(session, replay=False)
    assert not none and sorted(set(replayed)) == list(range(1, len(PROMPTS) + 1))
    assert len(got) == len(want) > len(replayed)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"step {i}: max difference {(a - b).abs().max()}"
    # the GEMMs went straight to their kernels where the layer binds, else via the module
    line = next(r.getMessage() for r in caplog.records if "replayed from bound" in r.getMessage())
    how = lambda ok: "bound" if ok else "through its module"  # noqa: E731
    assert f"PackedDenseLinear {how(_bindable(None))}" in line, line
    assert scheme is None or f"QuantLinear {how(_bindable(scheme))}" in line, line


def test_models_it_cannot_replay_keep_the_forward(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="q.engine"):
        qwen3 = q.load_engine(save_tiny_arch(tmp_path / "a", "Qwen3Config"), dtype="bfloat16")
        fp32 = q.load_engine(save_tiny_arch(tmp_path / "b", "LlamaConfig"), dtype="float32")
    assert qwen3.runner.forward.programs is None and fp32.runner.forward.programs is None
    assert "decode steps: the decoder forward (not replayed: the layers normalize q and k " \
           "per head)" in caplog.text
    assert "not replayed: the activations are torch.float32, not bfloat16" in caplog.text
    out = qwen3.generate([[5, 6, 7]], max_tokens=3, ignore_eos=True)[0]
    assert len(out.token_ids) == 3


def test_programs_are_rebound_when_their_cache_or_threads_change(tmp_path):
    session = q.load_engine(save_tiny_arch(tmp_path, "LlamaConfig"), dtype="bfloat16")
    programs, cache = session.runner.forward.programs, session.runner.cache
    first = programs.get(2, cache)
    assert programs.get(2, cache) is first and first.threads == torch.get_num_threads()
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        assert programs.get(2, cache) is not first
    finally:
        torch.set_num_threads(threads)
    again = programs.get(2, cache)
    assert programs.get(2, copy.copy(cache)) is not again  # a new cache object


def test_a_step_of_the_wrong_shape_is_refused_before_any_kernel_runs(tmp_path):
    """The bound kernels trust their pointers: tables, lengths, slots or rotary tables of
    another step size must raise, not read out of bounds."""
    from types import SimpleNamespace

    session = q.load_engine(save_tiny_arch(tmp_path, "LlamaConfig"), dtype="bfloat16")
    program = session.runner.forward.programs.get(2, session.runner.cache)
    longs = lambda *shape: torch.zeros(*shape, dtype=torch.int64)  # noqa: E731
    rotary = torch.zeros(2, 32, dtype=torch.bfloat16)
    batch = SimpleNamespace(paged=SimpleNamespace(blocks=longs(3, 1), lengths=longs(2)),
                            slot_mapping=longs(2))
    with pytest.raises(ValueError, match=r"a decode step of 2 tokens needs contiguous int64"):
        program.run(longs(2), rotary, rotary, batch)
    batch.paged.blocks = longs(2, 1)
    with pytest.raises(ValueError, match=r"bf16 rotary tables \[2, 32\]"):
        program.run(longs(2), rotary.float(), rotary.float(), batch)


def test_bound_calls_made_one_by_one_give_the_runs_bits(tmp_path):
    """The C++ call runner (kernels/bound_calls.py) against the same programs' calls made
    one at a time from Python: the same logits at every step."""
    from q.kernels.bound_calls import CallRun

    session = q.load_engine(save_tiny_arch(tmp_path, "LlamaConfig"), scheme="w8a8-int8",
                            dtype="bfloat16", max_batch=len(PROMPTS))
    programs, cache = session.runner.forward.programs, session.runner.cache
    runs, _ = _run(session, replay=True)
    assert any(isinstance(s, CallRun) for s in programs.get(1, cache).steps)
    programs.call_runner = False
    programs.where = None  # rebuilt on the next step, each call from Python
    one_by_one, _ = _run(session, replay=True)
    assert not any(isinstance(s, CallRun) for s in programs.get(1, cache).steps)
    assert len(runs) == len(one_by_one)
    for i, (a, b) in enumerate(zip(runs, one_by_one)):
        assert torch.equal(a, b), f"step {i}: max difference {(a - b).abs().max()}"

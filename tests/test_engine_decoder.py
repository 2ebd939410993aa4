"""The engine's own decoder forward (plugins/engines/native/decoder.py) against transformers'
forward of the same loaded model, step by step through a mixed workload: fresh prompts,
chunked prompts continuing over their cache blocks, and decode steps. In bf16 the logits are
bit-exact (same ops, same rounding, RMSNorm summed in torch's order), and in fp32 too
where torch's summation order is known."""

from __future__ import annotations

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
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
}


def _save(tmp_path, arch: str):
    cls_name, extra = ARCHS[arch]
    return save_tiny_arch(tmp_path, cls_name, **extra)


def _step_logits(session, forward) -> list[torch.Tensor]:
    """Every step's logits of one workload, run with ``forward``: three prompts, one chunked
    across steps (max_step_tokens=40) beside decoding requests."""
    runner = session.runner
    seen = []

    def recording(**kwargs):
        out = forward(**kwargs)
        seen.append(out.clone())
        return out

    runner.forward = recording
    try:
        prompts = [list(range(5, 35)), list(range(40, 130)), [7, 8, 9]]
        for ids in prompts:
            session.add_request(ids, SamplingParams(max_tokens=8, ignore_eos=True))
        while session.has_unfinished():
            session.step()
    finally:
        runner.forward = forward
    return seen


def _both_forwards(session):
    fast = session.runner.forward
    model = session.runner.model
    assert type(fast).__name__ == "DecoderForward"
    return fast, (lambda **kwargs: model(**kwargs).logits[0])


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("scheme", [None, "wint4", "w8a8-int8"])
def test_own_forward_is_bit_exact_to_transformers_in_bf16(arch, scheme, tmp_path):
    session = q.load_engine(_save(tmp_path, arch), scheme=scheme, dtype="bfloat16",
                            max_step_tokens=40, max_batch=3)
    fast, slow = _both_forwards(session)
    got, want = _step_logits(session, fast), _step_logits(session, slow)
    assert len(got) == len(want) > 8
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"step {i}: max difference {(a - b).abs().max()}"


def test_own_forward_in_fp32(tmp_path):
    session = q.load_engine(_save(tmp_path, "llama"), dtype="float32", max_step_tokens=40)
    fast, slow = _both_forwards(session)
    for a, b in zip(_step_logits(session, fast), _step_logits(session, slow)):
        if cpp.torch_sum_lanes() is not None:
            assert torch.equal(a, b)
        else:  # RMSNorm sums in another order: a few fp32 ulp
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_prompt_logits_use_the_same_forward(tmp_path):
    session = q.load_engine(_save(tmp_path, "qwen3"), dtype="bfloat16")
    fast, slow = _both_forwards(session)
    ids = list(range(3, 70))
    got = session.prompt_logits(ids)
    session.runner.forward = slow
    assert torch.equal(got, session.prompt_logits(ids))


def test_models_it_does_not_know_keep_transformers_forward(tmp_path, caplog):
    save_tiny_arch(tmp_path, "GemmaConfig", layers=1)
    with caplog.at_level(logging.INFO, logger="q.engine"):
        session = q.load_engine(tmp_path, dtype="bfloat16")
    assert type(session.runner.forward).__name__ != "DecoderForward"
    assert "decoder layers: transformers' forward (final norm GemmaRMSNorm is not a known" \
        in caplog.text
    assert session.generate([[5, 6, 7]], max_tokens=3, ignore_eos=True)[0].token_ids


def test_reference_implementation_keeps_transformers_forward(tiny_llama, caplog):
    with caplog.at_level(logging.INFO, logger="q.engine"):
        session = q.load_engine(tiny_llama(), impl="reference")
    assert type(session.runner.forward).__name__ != "DecoderForward"
    assert "impl=reference keeps transformers' forward" in caplog.text

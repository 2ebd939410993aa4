"""The native engine on the real SmolLM2-135M-Instruct, against transformers.

For every scheme: ``q quantize`` -> OUT, ``q dequantize --dtype float32`` -> DQ. The engine
runs OUT (quantized weights, quantized activations for W8A8 schemes, q.kernels ops); the
reference is transformers running DQ in fp32 with the same activation fake-quantization
(tests/engine_reference.py). Logits must agree closely; greedy generation of 32 tokens must
be identical for weight-only schemes (also with the prompts run as one batch), and for W8A8
schemes the reference must rank most of the engine's greedy tokens first, and each within
2 nats of its first choice. The same
holds for a checkpoint written by the real compressed-tensors library.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import q

from .engine_reference import (engine_logits, greedy_transformers, teacher_forced_agreement,
                               transformers_reference)

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Hi, please introduce yourself.",
           "def fibonacci(n):"]
CASES = [  # (id, scheme, args, ragged, format)
    ("fp8-block", "fp8-block", None, "quantize", "hf-fp8"),
    ("fp8-dynamic", "fp8-dynamic", None, "skip", "compressed-tensors"),
    ("fp8-tensor", "fp8-tensor", None, "skip", "compressed-tensors"),
    ("wint8", "wint8", None, "skip", "compressed-tensors"),
    ("wint4-g64", "wint4", {"group_size": 64}, "skip", "compressed-tensors"),
    ("wint4-asym-g32", "wint4", {"group_size": 32, "symmetric": False}, "skip",
     "compressed-tensors"),
]
# Max |logit difference| allowed. Op order could differ between the engine and transformers,
# and for W8A8 schemes a 1e-7 difference in an activation can round it to a neighbouring
# fp8 code, which SmolLM2's large activations amplify. On CPU the engine's reference ops
# compute in the same order as transformers does on the dequantized weights: the measured
# difference is 0 for every case here (printed with -s); the bound leaves room for BLAS
# differences on other CPUs. The engine runs in fp32 here (dtype="float32"): bf16 compute is
# checked against fp32 in tests/test_engine_dtype.py.
MAX_LOGIT_DIFF = {"weight-only": 1e-3, "w8a8": 1e-3}


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from q.embedded import default_model

    return default_model()


def _check_against_transformers(session, deq_dir, label):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(deq_dir)
    acts = session.report.recipe.input_activations if session.report.recipe else None
    ref = transformers_reference(deq_dir, session.report.quantized, acts)
    ids = tok("Shanghai is a city in China. It is famous for its").input_ids
    got = engine_logits(session, ids)
    with torch.inference_mode():
        want = ref(input_ids=torch.tensor([ids])).logits[0]
    diff = float((got - want).abs().max())
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    print(f"\n{label}: max |logit diff| {diff:.2e}, top-1 agreement {agree:.3f}")
    assert diff < MAX_LOGIT_DIFF["w8a8" if acts else "weight-only"], diff
    assert agree == 1.0
    prompt_ids = [tok(p).input_ids for p in PROMPTS]
    solo = [session.generate([i], max_tokens=32, ignore_eos=True)[0].token_ids
            for i in prompt_ids]
    for p, ids_, tokens in zip(PROMPTS, prompt_ids, solo):
        if not acts:
            assert tokens == greedy_transformers(ref, ids_, 32), f"{label}: {p!r}"
            continue
        # W8A8 decode: the engine's paged attention and transformers' cached attention sum
        # in different orders; a last-bit difference flips an activation's fp8/int8 code,
        # which moves logits by up to ~0.3 and can swap near-ties. So the engine's own
        # continuation is checked token by token: transformers, reading prompt +
        # continuation, must rank most tokens first and all but two near its first choice.
        # Measured: 75-100% first; gaps up to 1.2 nats on an AMD EPYC, and on an Intel Xeon
        # one of 4.31 nats (then 1.59) at the last two of 32 code tokens, after flips of
        # 0.15-0.51 nats earlier in the same continuation. A wrong cache, position or block
        # table picks tokens far down the list at most positions; weight-only decode above is
        # exact.
        agree, gaps = teacher_forced_agreement(ref, ids_, tokens)
        far = sum(g >= 2.0 for g in gaps)
        print(f"{label}: {p!r}: the reference ranks {agree:.0%} of the engine's tokens first,"
              f" largest gap {max(gaps):.2f} nats, {far} of {len(gaps)} beyond 2")
        assert agree >= 0.7 and far <= 2, (label, p, agree, gaps)
    batched = [o.token_ids for o in session.generate(prompt_ids, max_tokens=32, ignore_eos=True)]
    same = sum(b == s for b, s in zip(batched, solo))
    print(f"{label}: {same}/{len(PROMPTS)} prompts identical when run as one batch")
    if not acts:
        # Weight-only and unquantized layers are batch-invariant here. W8A8 is not always:
        # batch size changes fp32 summation order, which can flip an activation's fp8 code
        # and, many tokens later, a greedy choice (docs/engine.md).
        assert batched == solo, label


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_engine_matches_transformers(case, smollm2, tmp_path):
    label, scheme, args, ragged, fmt = case
    out = q.quantize(smollm2, scheme, tmp_path / "out", args=args, ragged=ragged, format=fmt,
                     progress=False).output
    deq = q.dequantize(out, tmp_path / "deq", dtype="float32", progress=False).output
    session = q.load_engine(out, dtype="float32")
    assert len(session.report.quantized) == 210
    _check_against_transformers(session, deq, label)


# Per-channel presets only: SmolLM2's 576 columns do not split into ct's groups of 128.
# W8A8 is int8 weights with dynamic per-token int8 activations (the int8 scaled_gemm path).
@pytest.mark.parametrize("preset", ["FP8_DYNAMIC", "W8A8"])
def test_engine_runs_a_compressed_tensors_checkpoint(preset, smollm2, tmp_path):
    from q.api import copy_side_files

    from .test_formats_interop import ct_reference_checkpoint

    ckpt = ct_reference_checkpoint(smollm2, tmp_path / "ct", preset)
    copy_side_files(smollm2, ckpt)  # tokenizer files, as llm-compressor's oneshot saves them
    deq = q.dequantize(ckpt, tmp_path / "deq", dtype="float32", progress=False).output
    # int8 W8A8 in fp32 runs torch._int_mm, whose exact int32 sums differ from transformers'
    # fp32 sums of dequantized values in the last bit, and SmolLM2 amplifies a flipped int8
    # code to whole logits; the reference ops sum in transformers' order. _int_mm against the
    # reference: tests/test_kernels_torch.py; bf16 against fp32: tests/test_engine_dtype.py
    session = q.load_engine(ckpt, dtype="float32",
                            impl="reference" if preset == "W8A8" else "auto")
    assert session.report.format == "compressed-tensors"
    assert len(session.report.quantized) == 210
    _check_against_transformers(session, deq, f"compressed-tensors {preset}")

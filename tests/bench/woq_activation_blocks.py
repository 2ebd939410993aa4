"""Why weight-only prompts quantize their activations in blocks of 32 (``woq_activations=
"int8"``): SmolLM2's perplexity with every Linear's input fake-quantized to int8, one scale
per token or per block of 192, 64 or 32 values, its weights RTN-quantized per channel
(int8) or per group of 64 (int4), in transformers, no engine.

    python tests/bench/woq_activation_blocks.py [--dtype bfloat16] [--bits 8,4]

The text is tests/test_engine_dtype.py's (512 tokens of ``real_text("lee")``); the lm_head
stays unquantized, as q's schemes leave it. Fake quantization: ``round(x / a)`` clamped to
[-128, 127], times ``a = max|x| / 127`` over the token or block (act_quant's spec), computed
in fp32 and cast back to the model's dtype.
"""

from __future__ import annotations

import argparse
import math

import torch
import transformers

import q
from q.textdata import real_text

BLOCKS = (0, 192, 64, 32)  # 0: one scale per token; SmolLM2's widths are multiples of 192


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).item())


def rtn(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Symmetric round-to-nearest weights, per channel (group 0) or group."""
    n, k = w.shape
    g = k if group == 0 else group
    qmax = 2 ** (bits - 1) - 1
    wr = w.float().reshape(n, k // g, g)
    s = wr.abs().amax(-1, keepdim=True).clamp(min=1e-12) / qmax
    return ((wr / s).round().clamp(-qmax - 1, qmax) * s).reshape(n, k).to(w.dtype)


def fake_int8(x: torch.Tensor, block: int) -> torch.Tensor:
    shape = x.shape
    b = shape[-1] if block == 0 else block
    xr = x.float().reshape(*shape[:-1], shape[-1] // b, b)
    a = xr.abs().amax(-1, keepdim=True).clamp(min=1e-10) / 127
    return ((xr / a).round().clamp(-128, 127) * a).reshape(shape).to(x.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--bits", default="8,4")
    args = ap.parse_args()
    path = q.default_model()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tok(real_text("lee")[:6000]).input_ids[:512]])
    dtype = getattr(torch, args.dtype)
    print(f"SmolLM2-135M in {args.dtype}, 512 tokens, torch {torch.__version__}\n")
    print("| weights | activations | perplexity | over exact activations |")
    print("|---|---|---:|---:|")
    for bits in map(int, args.bits.split(",")):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        linears = [m for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and "lm_head" not in name]
        for m in linears:
            m.weight.data = rtn(m.weight.data, bits, 0 if bits == 8 else 64)
        label = "int8 per channel" if bits == 8 else "int4 groups of 64"
        exact = perplexity(model, ids)
        print(f"| {label} | exact | {exact:.2f} | - |")
        for block in BLOCKS:
            hooks = [m.register_forward_pre_hook(
                lambda _, inputs, b=block: (fake_int8(inputs[0], b),)) for m in linears]
            ppl = perplexity(model, ids)
            for h in hooks:
                h.remove()
            name = "int8 per token" if block == 0 else f"int8 blocks of {block}"
            print(f"| {label} | {name} | {ppl:.2f} | {100 * (ppl / exact - 1):+.1f}% |")


if __name__ == "__main__":
    main()

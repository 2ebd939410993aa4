#!/usr/bin/env python3
"""q's native engine end to end on one CUDA GPU: the Triton path against the reference path,
and prefill / decode speed against transformers bf16, for every scheme (online quantization).

    python tests/bench/bench_engine_gpu.py --out $OUT/engine.md    # ~3 min on an H200
    python tests/bench/bench_engine_gpu.py --cpu-smoke             # the plumbing, tiny, CPU

The model is a random-weight Llama (default 8 layers, hidden 2048, MLP 5632, 16 heads / 8 KV
heads, vocab 32000; no hub access on the device machine) saved in bf16 with a word-level
tokenizer. For each scheme the engine loads it with ``q.load_engine(MODEL, scheme=...)``
twice, ``impl="triton"`` and ``impl="reference"`` (the pure-torch spec of every kernel), and
both run the same random prompts. Columns: "worst layer err", each quantized Linear of both
paths on the very same input (the kernels' own error; bound 1e-2); "logit err", ``||tri -
ref|| / ||ref||`` of the whole model, where activation codes flipped by rounding differences
compound over the layers; "quant. err", the reference path against the unquantized model
(the scheme's own error: "logit err" must stay below it). argmax agreement is triton against
reference. The unquantized engine is checked against transformers itself.

Speed (CUDA-synchronized wall clock, median of ``--repeats``): prefill of 4 x 512 tokens
(one forward), and greedy decode of ``--new`` tokens at batch 1 and 16 through the engine's
own scheduler (``session.generate`` with ``ignore_eos``), against transformers bf16
``generate`` on the same prompts. Ratios are transformers time / q time (above 1: q faster).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCHEMES = [  # (label, scheme, args)
    ("bf16 (unquantized)", None, None),
    ("fp8-block", "fp8-block", None),
    ("fp8-dynamic", "fp8-dynamic", None),
    ("fp8-tensor", "fp8-tensor", None),
    ("w8a8-int8", "w8a8-int8", None),
    ("wint8", "wint8", None),
    ("wint4 g128", "wint4", {"group_size": 128}),
]


def build_model(path: Path, layers: int, hidden: int, inter: int, vocab: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from tests.conftest import save_tiny_tokenizer

    torch.manual_seed(0)
    heads = max(hidden // 128, 4)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=max(heads // 2, 1), head_dim=hidden // heads,
                      num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    save_tiny_tokenizer(path, vocab)
    return path


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def timed(fn, repeats: int, sync) -> float:
    """Median seconds of ``fn`` after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    import torch

    import q
    from q.generation import SamplingParams

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--new", type=int, default=64, help="decode tokens per request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", help="comma-separated scheme labels")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.layers, args.hidden, args.inter, args.vocab, args.new, args.repeats = (
            1, 256, 384, 512, 4, 1)
    device = "cpu" if args.cpu_smoke else "cuda"
    impl = "reference" if args.cpu_smoke else "triton"
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --cpu-smoke to check the plumbing")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(1)
    prompt_len, prefill_batch = (32, 2) if args.cpu_smoke else (512, 4)
    prompts = torch.randint(2, args.vocab, (16, prompt_len), generator=gen)
    check_ids = prompts[:2, :128].to(device)
    lines = []

    def say(text=""):
        print(text, flush=True)
        lines.append(text)

    with tempfile.TemporaryDirectory(prefix="q-engine-gpu-") as tmp:
        model_dir = build_model(Path(tmp) / "model", args.layers, args.hidden, args.inter,
                                args.vocab)
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device)
        hf.eval()
        with torch.inference_mode():
            hf_logits = hf(check_ids).logits.float()

            def hf_prefill():
                hf(prompts[:prefill_batch].to(device))

            def hf_decode(bs):
                ids = prompts[:bs].to(device)
                return lambda: hf.generate(ids, attention_mask=torch.ones_like(ids),
                                           max_new_tokens=args.new, min_new_tokens=args.new,
                                           do_sample=False, pad_token_id=0)

            base = {"prefill": timed(hf_prefill, args.repeats, sync),
                    1: timed(hf_decode(1), args.repeats, sync),
                    16: timed(hf_decode(16), args.repeats, sync)}
        del hf
        gc.collect()
        name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke run)"
        say(f"device: {name}; torch {torch.__version__}; model: random Llama, {args.layers} "
            f"layers, hidden {args.hidden}, MLP {args.inter}, vocab {args.vocab}")
        say(f"prefill {prefill_batch} x {prompt_len} tokens; decode {args.new} tokens greedy "
            f"(prompts {prompt_len}); median of {args.repeats}")
        say()
        say("| scheme | layer path | worst layer err | logit err | quant. err | argmax agree | "
            "prefill tok/s (vs HF) | decode b1 tok/s (vs HF) | decode b16 tok/s (vs HF) |")
        say("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        say(f"| transformers bf16 | | | | | | {prefill_batch * prompt_len / base['prefill']:.0f} | "
            f"{args.new / base[1]:.1f} | {16 * args.new / base[16]:.0f} |")
        wanted = args.only.split(",") if args.only else None
        failures = 0
        for label, scheme, sargs in SCHEMES:
            if wanted and label not in wanted:
                continue
            fast = q.load_engine(model_dir, scheme=scheme, args=sargs, device=device, impl=impl)
            ref_session = q.load_engine(model_dir, scheme=scheme, args=sargs, device=device,
                                        impl="reference")
            with torch.inference_mode():
                inputs = {}
                hooks = [m.register_forward_pre_hook(
                    lambda mod, a, name=name: inputs.__setitem__(name, a[0]))
                    for name, m in fast.report.quantized.items()]
                tri = fast.model(input_ids=check_ids, use_cache=False).logits.float()
                for h in hooks:
                    h.remove()
                ref = ref_session.model(input_ids=check_ids, use_cache=False).logits.float()
                # each quantized layer, both paths on the very same input: the kernels' own
                # error, before a random model's 8 layers amplify activation-code flips
                worst_layer = max((rel_err(fast.report.quantized[n](x),
                                           ref_session.report.quantized[n](x))
                                   for n, x in inputs.items()), default=0.0)
                del ref_session, inputs
                gc.collect()
                noise = rel_err(ref, hf_logits)  # the quantization's own error, for scale
                if scheme is None:  # the unquantized engine against transformers itself
                    ref = hf_logits
                rel = rel_err(tri, ref)
                agree = (tri.argmax(-1) == ref.argmax(-1)).float().mean().item()
                ok = (torch.isfinite(tri).all().item() and worst_layer < 1e-2
                      and (rel < 1e-2 if scheme is None else rel < noise))
                failures += not ok

                def prefill(session=fast):
                    session.model(input_ids=prompts[:prefill_batch].to(device), use_cache=False)

                params = SamplingParams(max_tokens=args.new, ignore_eos=True)

                def decode(bs, session=fast):
                    ids = prompts[:bs].tolist()
                    return lambda: session.generate(ids, params)

                t_pre = timed(prefill, args.repeats, sync)
                t1 = timed(decode(1), args.repeats, sync)
                t16 = timed(decode(16), args.repeats, sync)
            path = ", ".join(sorted({m.path.split("->")[-1].strip() for m in
                                     fast.report.quantized.values()})) or "torch"
            say(f"| {label} | {path} | {worst_layer:.1e} | {rel:.1e} | {noise:.1e} | "
                f"{'' if ok else 'FAIL '}{100 * agree:.1f}% | "
                f"{prefill_batch * prompt_len / t_pre:.0f} ({base['prefill'] / t_pre:.2f}x) | "
                f"{args.new / t1:.1f} ({base[1] / t1:.2f}x) | "
                f"{16 * args.new / t16:.0f} ({base[16] / t16:.2f}x) |")
            del fast
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        say()
        say(f"correctness failures: {failures}")
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

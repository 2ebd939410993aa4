"""CPU throughput of the native engine on SmolLM2, per scheme, against transformers.

For each scheme the engine loads the bf16 SmolLM2 with online quantization (the same
tensors as ``q quantize`` + load, tests/test_engine.py) with its defaults (bf16 compute and
torch's CPU kernels on a CPU with bf16 instructions; ``--dtype float32`` for the fp32
reference ops). The peer is transformers running the bf16 checkpoint in fp32 in the same
process. Reported:

- prefill tokens/s: one prompt of ``--prompt-len`` tokens (time of a 1-token generation);
- decode tokens/s at batch 1 and batch ``--batch``: (tokens after the first) / (time after
  the first), greedy, EOS ignored, all prompts the same length (no padding);
- the ratio engine / transformers.

Run: Q_CACHE_DIR=... python tests/bench/bench_engine_cpu.py [--schemes fp8-block,wint8]
     python tests/bench/bench_engine_cpu.py --ops   # the fp8 -> fp32 decode micro-benchmark
"""

from __future__ import annotations

import argparse
import os
import time

import torch

SCHEMES = {  # name -> (scheme, args, ragged)
    "bf16 (unquantized)": (None, None, "skip"),
    "fp8-block": ("fp8-block", None, "quantize"),
    "fp8-dynamic": ("fp8-dynamic", None, "skip"),
    "fp8-tensor": ("fp8-tensor", None, "skip"),
    "wint8": ("wint8", None, "skip"),
    "wint4 g64": ("wint4", {"group_size": 64}, "skip"),
}


def prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    from q.textdata import real_text

    ids = tokenizer(real_text("botchan")[20_000:120_000]).input_ids
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def engine_rates(session, batch_prompts, new_tokens):
    one = batch_prompts[:1]
    session.generate(one, max_tokens=2, ignore_eos=True)  # warm-up
    t0 = time.perf_counter()
    session.generate(one, max_tokens=1, ignore_eos=True)
    prefill = time.perf_counter() - t0
    rates = []
    for group in (one, batch_prompts):
        t0 = time.perf_counter()
        session.generate(group, max_tokens=1, ignore_eos=True)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        session.generate(group, max_tokens=new_tokens, ignore_eos=True)
        rates.append(len(group) * (new_tokens - 1) / (time.perf_counter() - t0 - first))
    return len(one[0]) / prefill, rates[0], rates[1]


def transformers_rates(model, batch_prompts, new_tokens):
    def run(group, n):
        ids = torch.tensor(group)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)
        return time.perf_counter() - t0

    one = batch_prompts[:1]
    run(one, 2)
    prefill = run(one, 1)
    rates = []
    for group in (one, batch_prompts):
        first = run(group, 1)
        rates.append(len(group) * (new_tokens - 1) / (run(group, new_tokens) - first))
    return len(one[0]) / prefill, rates[0], rates[1]


def bench_ops():
    from q.kernels.numerics import fp8_to_float

    w = torch.randn(1536, 576).to(torch.float8_e4m3fn)

    def best(f, n=30):
        f()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3

    a, b = best(lambda: w.float()), best(lambda: fp8_to_float(w))
    print(f"fp8 e4m3 -> fp32, 1536x576, {torch.get_num_threads()} threads: torch cast "
          f"{a:.2f} ms, q.kernels.numerics.fp8_to_float {b:.2f} ms ({a / b:.1f}x)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ops", action="store_true", help="only the fp8 decode micro-benchmark")
    parser.add_argument("--dtype", default="auto", help="the engine's compute dtype")
    opts = parser.parse_args()
    if opts.ops:
        return bench_ops()
    import q
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = q.default_model()
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch_prompts = prompts(tok, opts.batch, opts.prompt_len)
    peer = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    base = transformers_rates(peer, batch_prompts, opts.new_tokens)
    del peer
    print(f"SmolLM2-135M-Instruct, CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"prompt {opts.prompt_len} tokens, {opts.new_tokens} new tokens, batch {opts.batch}")
    print("| model | prefill tok/s | decode tok/s (batch 1) | decode tok/s (batch "
          f"{opts.batch}) | vs transformers (prefill / b1 / b{opts.batch}) |")
    print("|---|---|---|---|---|")
    print(f"| transformers fp32, bf16 weights | {base[0]:.0f} | {base[1]:.1f} | {base[2]:.1f} "
          "| 1.00 / 1.00 / 1.00 |")
    for name in opts.schemes.split(","):
        scheme, args, ragged = SCHEMES[name]
        session = q.load_engine(model_dir, scheme=scheme, args=args, ragged=ragged,
                                dtype=opts.dtype)
        rates = engine_rates(session, batch_prompts, opts.new_tokens)
        ratio = " / ".join(f"{r / b:.2f}" for r, b in zip(rates, base))
        print(f"| q native, {name} | {rates[0]:.0f} | {rates[1]:.1f} | {rates[2]:.1f} "
              f"| {ratio} |", flush=True)


if __name__ == "__main__":
    main()

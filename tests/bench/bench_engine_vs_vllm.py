"""q's native engine against vLLM's CPU engine, on the same checkpoint files, in one run.

Workload (the CPU engine issue's): 32 prompts of 256 tokens (real text) submitted at once,
64 new tokens each, greedy, EOS ignored; then one more prompt alone. The lone prompt and the
warm-up prompt appear nowhere else: vLLM caches prompt blocks (automatic prefix caching, on
by default), and until 2026-12-05 this bench warmed up with the batch's first prompt and
then timed that prompt alone, so vLLM's 1-request time skipped its prefill while q computed
it (q has no prefix cache). Reported per
checkpoint: generated tokens per second for both (32 x 64 / wall time, prefill included;
64 / wall time for one request) and the ratio q / vLLM. q runs through ``q.load_engine``
with its defaults; vLLM through ``LLM.generate`` with its defaults (torch.compile on), in
its own venv (``--vllm-python``, default .venv-vllm/bin/python; tests/run.sh makes it),
twice: with its defaults, which reserve a core for its scheduler process (on 2 cores the
model runs on 1 thread), and with ``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` (all cores); q is
compared with the faster of the two.

Also, for q: the lone request's tokens per second after its first token (its decode alone,
the prompt's prefill left out) and, per quantized checkpoint, both of its 1-request rates
over bf16's; time to first token of a 256-token prompt that arrives while 31 requests are
decoding, against the same prompt alone; and the peak RSS of a process that loads each
checkpoint (``--rss``), beside the checkpoint's size.

Models: SmolLM2-135M-Instruct (the embedded default) and ``--llama-1b``, a random-weight
Llama with TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632,
vocab 32000). Checkpoints are written by q into ``--work`` and reused.

    python tests/bench/bench_engine_vs_vllm.py --models smollm2,llama-1b --rss
    python tests/bench/bench_engine_vs_vllm.py --models llama-1b --schemes bf16,wint8,wint4-g64 \
        --alone-only --alone-rounds 5    # the 1-request quantized-vs-bf16 ratios, interleaved
    python tests/bench/bench_engine_vs_vllm.py --models llama-1b --schemes bf16,wint4-g64 \
        --alone-only --decode-program-ab  # the same, decode replayed or not (decode_program.py)
    python tests/bench/bench_engine_vs_vllm.py --models smollm2 --vllm-after  # q runs first
    python tests/bench/bench_engine_vs_vllm.py --models llama-1b --no-vllm \
        --schemes wint8,wint8-int8acts,wint4-g64,wint4-g64-int8acts  # woq_activations int8

vLLM runs first by default (per model: every vLLM setup, then q's checkpoints); q's first
checkpoint after it has run slow in some runs, so ``--vllm-after`` reverses the order.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SCHEMES = {  # name -> (scheme, args); None: the unquantized model itself
    "bf16": None,
    "w8a8-int8": ("w8a8-int8", {}),
    "wint4-g64": ("wint4", {"group_size": 64}),
    "wint8": ("wint8", {}),
    "fp8-dynamic": ("fp8-dynamic", {}),
}
# more names for --schemes (not run by default): another name's checkpoint loaded with
# engine options, prompts multiplied with int8 activations (woq_activations, docs/engine.md)
LOADED_AS = {"wint8-int8acts": ("wint8", {"woq_activations": "int8"}),
             "wint4-g64-int8acts": ("wint4-g64", {"woq_activations": "int8"})}


def llama_1b(path: Path) -> Path:
    if (path / "config.json").exists():
        return path
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from tests.conftest import save_tiny_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                      max_position_embeddings=2048, tie_word_embeddings=False)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    save_tiny_tokenizer(path, cfg.vocab_size)
    return path


def checkpoints(model_dir: Path, work: Path, names) -> dict[str, Path]:
    import q

    out = {}
    for name in names:
        base = LOADED_AS.get(name, (name,))[0]
        if SCHEMES[base] is None:
            out[name] = model_dir
            continue
        scheme, args = SCHEMES[base]
        dest = work / f"{model_dir.name}-{base}"
        if not (dest / "config.json").exists():
            q.quantize(model_dir, scheme, dest, args=args, progress=False)
        out[name] = dest
    return out


def prompts(vocab: int, n: int = 32, length: int = 256) -> list[list[int]]:
    import q
    from q.modeling import load_tokenizer
    from q.textdata import real_text

    ids = load_tokenizer(q.default_model())(real_text("botchan")[20_000:200_000]).input_ids
    return [[t % vocab for t in ids[i * length:(i + 1) * length]] for i in range(n)]


def load_options(name: str) -> dict:
    """The engine options checkpoint ``name`` loads with (LOADED_AS)."""
    return LOADED_AS.get(name, (name, {}))[1]


def q_rates(path: Path, batch: list[list[int]], new_tokens: int, alone: list[int],
            warmup: list[int], options: dict | None = None) -> dict:
    import q

    session = q.load_engine(path, **(options or {}))
    session.generate([warmup], max_tokens=4, ignore_eos=True)
    t0 = time.perf_counter()
    outs = session.generate(batch, max_tokens=new_tokens, ignore_eos=True)
    batch_s = time.perf_counter() - t0
    assert all(len(o.token_ids) == new_tokens for o in outs)
    first_s, one_s = one_request(session, alone, new_tokens)
    return {"batch_s": batch_s, "one_s": one_s, "first_s": first_s,
            "ttft": ttft(session, batch)}


def one_request(session, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """Wall seconds of one request alone, to its first token and to its last: what
    ``generate`` does, step by step, so that its decode rate can be told from its prefill."""
    from q.generation import SamplingParams

    t0 = time.perf_counter()
    rid = session.add_request(prompt, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    first = None
    while session.has_unfinished():
        for out in session.step():
            if out.request_id == rid and first is None and out.token_ids:
                first = time.perf_counter() - t0
    return first, time.perf_counter() - t0


FORWARD = " (forward)"  # --decode-program-ab: the same checkpoint, decode not replayed


def alone_interleaved(ckpts: dict[str, Path], prompt: list[int], warmup: list[int],
                      new_tokens: int, rounds: int, program_ab: bool = False) -> None:
    """The lone request on every checkpoint in turn, ``rounds`` times, all loaded at once:
    this VM's speed drifts by 20-35% within minutes, so per-checkpoint runs minutes apart
    give ratios that move as much; here a drift hits every checkpoint of a round. Medians
    (and ranges) of q's 1-request tok/s, whole and after its first token, and of each
    checkpoint's ratios over bf16's within the same round. ``program_ab``: each checkpoint
    also loaded a second time with its decode steps run by the decoder forward instead of
    replayed (decode_program.py), as rows named ``... (forward)``, ratios over bf16's own."""
    import statistics

    import q

    sessions = {name: q.load_engine(path, kv_cache_tokens=4096, **load_options(name))
                for name, path in ckpts.items()}
    for name, path in list(ckpts.items()) if program_ab else []:
        session = sessions[name + FORWARD] = q.load_engine(path, kv_cache_tokens=4096,
                                                           **load_options(name))
        session.runner.forward.programs = None
    for session in sessions.values():
        session.generate([warmup], max_tokens=4, ignore_eos=True)
    # per round: (whole tok/s, after-first tok/s, seconds to the first token)
    rates = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            first_s, one_s = one_request(session, prompt, new_tokens)
            rates[name].append((new_tokens / one_s, (new_tokens - 1) / (one_s - first_s),
                                first_s))

    def spread(values, unit=""):
        return (f"{statistics.median(values):.2f}{unit} "
                f"({min(values):.2f}-{max(values):.2f})")

    print(f"\nq alone, {rounds} interleaved rounds of the lone request (medians, range)\n")
    print("| checkpoint | 1 req tok/s | after its first token | first token (s) | over bf16, "
          "whole | over bf16, after its first token |\n|---|---:|---:|---:|---:|---:|")
    for name, runs in rates.items():
        whole, decode, first = zip(*runs)
        over = ["-", "-"]
        bf16 = "bf16" + (FORWARD if name.endswith(FORWARD) else "")
        if bf16 in rates and name != bf16:
            base = rates[bf16]
            over = [spread([r[i] / b[i] for r, b in zip(runs, base)], "x") for i in (0, 1)]
        print(f"| {name} | {spread(whole)} | {spread(decode)} | {spread(first)} | {over[0]} "
              f"| {over[1]} |",
              flush=True)


def ttft(session, batch) -> dict:
    """Seconds to the first token of ``batch[-1]``: alone, and arriving while the other
    requests decode (each has finished its prompt and has tokens left)."""
    from q.generation import SamplingParams

    def first_token(rid):
        t0 = time.perf_counter()
        while True:
            if any(o.request_id == rid for o in session.step()):
                return time.perf_counter() - t0

    alone = first_token(session.add_request(batch[-1], SamplingParams(max_tokens=1)))
    while session.has_unfinished():
        session.step()
    for p in batch[:-1]:
        session.add_request(p, SamplingParams(max_tokens=200, ignore_eos=True))
    while session.num_waiting or any(s.computed < len(s.prompt_ids)
                                     for s in session.scheduler.running):
        session.step()
    busy = first_token(session.add_request(batch[-1], SamplingParams(max_tokens=1)))
    running = session.num_running
    for rid in list(session._live):
        session.abort(rid)
    while session.has_unfinished():
        session.step()
    return {"alone_s": alone, "with_decoding_s": busy, "decoding": running}


# The peak is VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork + exec,
# so a child of this (large, after running engines) process would report the parent's size.
RSS_CODE = """
import q
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
base = status("VmRSS")
s = q.load_engine(%r)
s.generate([[5] * 32], max_tokens=4, ignore_eos=True)
print(base, status("VmRSS"), status("VmHWM"))
"""


def peak_rss(path: Path) -> str:
    """MiB of a fresh process that loads ``path`` and generates 4 tokens: its peak, and what
    stays resident afterwards (imports of torch and transformers included)."""
    out = subprocess.run([sys.executable, "-c", RSS_CODE % str(path)], capture_output=True,
                         text=True, check=True)
    base, now, peak = (int(v) / 1024 for v in out.stdout.strip().splitlines()[-1].split())
    return f"{peak:.0f} / {now:.0f}"


def size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


# vLLM's CPU build reserves cores for its scheduler process by default (one per worker on
# x86: on a 2-core machine the model runs on 1 thread). Both setups are run, and q is
# compared with the faster one for each checkpoint.
VLLM_SETUPS = {"default": {},
               "all cores": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}}


def vllm_rates(python: str, ckpts: dict, batch, new_tokens, work: Path, env: dict,
               alone: list[int], warmup: list[int]) -> dict:
    job, result = work / "vllm-work.json", work / "vllm-result.json"
    job.write_text(json.dumps({"checkpoints": {k: str(v) for k, v in ckpts.items()},
                               "prompts": batch, "alone": alone, "warmup": warmup,
                               "new_tokens": new_tokens}))
    subprocess.run([python, str(Path(__file__).with_name("vllm_cpu_peer.py")), str(job),
                    str(result)], check=True, env={**os.environ, **env})
    return json.loads(result.read_text())


def best_vllm(peers: dict, name: str) -> tuple[dict, str]:
    """The faster vLLM setup for ``name`` (by the 32-request time), and its label."""
    ran = {setup: r[name] for setup, r in peers.items()
           if name in r and "error" not in r[name]}
    if not ran:
        first = next(iter(peers.values()), {})
        return first.get(name, {"error": "not run"}), ""
    setup = min(ran, key=lambda k: ran[k]["batch_s"])
    return ran[setup], setup


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2,llama-1b")
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--work", type=Path, default=ROOT / ".q-cache" / "bench-engine")
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--no-vllm", action="store_true")
    parser.add_argument("--vllm-schemes", default="bf16,w8a8-int8,wint4-g64",
                        help="checkpoints vLLM runs (its CPU build refuses wint8, and runs "
                             "fp8-dynamic at 1.6-2.4 tok/s for 1 request on SmolLM2: compare those "
                             "with q's bf16)")
    parser.add_argument("--vllm-setups", default=",".join(VLLM_SETUPS),
                        help="which vLLM setups run (on 2 cores 'all cores' was the faster in "
                             "every row measured; naming only it halves vLLM's time)")
    parser.add_argument("--rss", action="store_true", help="peak RSS per checkpoint")
    parser.add_argument("--vllm-after", action="store_true",
                        help="run q's checkpoints first, then vLLM's (default: vLLM first), "
                             "to see whether the order moves either engine")
    parser.add_argument("--unfused", action="store_true",
                        help="q with one GEMM per projection (no q/k/v, gate/up fusion), to "
                             "measure what fusing does; timing only (not --rss)")
    parser.add_argument("--rss-only", action="store_true",
                        help="only checkpoint sizes and q's RSS (no timing)")
    parser.add_argument("--alone-rounds", type=int, default=0,
                        help="then time q's lone request on every checkpoint in turn, this "
                             "many rounds, all loaded at once (ratios a drift cannot skew)")
    parser.add_argument("--alone-only", action="store_true",
                        help="only the --alone-rounds table (no 32-request runs, no vLLM)")
    parser.add_argument("--decode-program-ab", action="store_true",
                        help="with --alone-only: every checkpoint also with its decode steps "
                             "run by the decoder forward, not replayed (rows '(forward)')")
    opts = parser.parse_args()
    import q

    if opts.unfused:  # the engine's two fusion points, turned off for this process
        from q.plugins.engines.native import dense, loader

        loader.fusable_groups = lambda *args, **kwargs: {}
        dense.sibling_groups = lambda names: []

    opts.work.mkdir(parents=True, exist_ok=True)
    from q.kernels.configs import cpu_class

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), "unknown CPU")
    print(f"CPU: {cpu} (class {cpu_class()}), {os.cpu_count()} cores, torch "
          f"{torch.__version__}, q engine defaults")
    for model in opts.models.split(","):
        model_dir = Path(q.default_model()) if model == "smollm2" else llama_1b(
            opts.work / "llama-1b")
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        *batch, alone, warmup = prompts(vocab, n=34)
        ckpts = checkpoints(model_dir, opts.work, opts.schemes.split(","))
        if opts.alone_only:
            alone_interleaved(ckpts, alone, warmup, opts.new_tokens, opts.alone_rounds or 5,
                              opts.decode_program_ab)
            continue
        if opts.rss_only:
            print(f"\n{model}: checkpoint MiB, q RSS MiB (peak / after load and 4 tokens)\n")
            print("| checkpoint | size MiB | q RSS MiB, peak / after load |\n|---|---:|---:|")
            for name, path in ckpts.items():
                print(f"| {name} | {size_mib(path):.0f} | {peak_rss(path)} |", flush=True)
            continue
        def run_vllm():
            return {} if opts.no_vllm else {
                setup: vllm_rates(opts.vllm_python, {k: v for k, v in ckpts.items()
                                                     if k in opts.vllm_schemes.split(",")},
                                  batch, opts.new_tokens, opts.work, env, alone, warmup)
                for setup, env in VLLM_SETUPS.items() if setup in opts.vllm_setups.split(",")}

        ours = {}  # with --vllm-after, q's rates before vLLM runs; else each as its row prints
        if opts.vllm_after:
            ours = {name: q_rates(path, batch, opts.new_tokens, alone, warmup,
                                  load_options(name))
                    for name, path in ckpts.items()}
        peers = run_vllm()
        n = len(batch) * opts.new_tokens
        print(f"\n{model}: {len(batch)} requests x 256-token prompts, {opts.new_tokens} new "
              "tokens each (generated tok/s, prefill included)\n")
        print("| checkpoint | vLLM CPU, 32 req | q, 32 req | q / vLLM | vLLM, 1 req | q, 1 req "
              "| q / vLLM | q 1 req after its first token | q TTFT alone / with 31 decoding (s) |"
              + (" size MiB | q RSS MiB, peak / after load |" if opts.rss else ""))
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if opts.rss else ""))
        alone_rates = {}  # checkpoint -> (q 1 req tok/s, its decode tok/s after the first)
        for name, path in ckpts.items():
            mine = ours.get(name) or q_rates(path, batch, opts.new_tokens, alone, warmup,
                                             load_options(name))
            decode = (opts.new_tokens - 1) / (mine["one_s"] - mine["first_s"])
            alone_rates[name] = (opts.new_tokens / mine["one_s"], decode)
            theirs, setup = best_vllm(peers, name)
            for other, r in peers.items():  # every vLLM setup's own numbers, for the record
                if name in r and "error" not in r[name]:
                    print(f"  (vLLM {other}: 32 req {n / r[name]['batch_s']:.1f} tok/s, 1 req "
                          f"{opts.new_tokens / r[name]['one_s']:.1f} tok/s)")
            qb, q1 = n / mine["batch_s"], opts.new_tokens / mine["one_s"]
            if "error" in theirs:
                vb = v1 = rb = r1 = "-"
            else:
                vb_, v1_ = n / theirs["batch_s"], opts.new_tokens / theirs["one_s"]
                v1_ = max(opts.new_tokens / r[name]["one_s"] for r in peers.values()
                          if name in r and "error" not in r[name])  # the faster at 1 req
                vb, v1, rb, r1 = (f"{vb_:.1f} ({setup})", f"{v1_:.1f}", f"{qb / vb_:.2f}",
                                  f"{q1 / v1_:.2f}")
            t = mine["ttft"]
            row = (f"| {name} | {vb} | {qb:.1f} | {rb} | {v1} | {q1:.1f} | {r1} | {decode:.1f} | "
                   f"{t['alone_s']:.2f} / {t['with_decoding_s']:.2f} ({t['decoding']}) |")
            if opts.rss:
                row += f" {size_mib(path):.0f} | {peak_rss(path)} |"
            print(row, flush=True)
            if "error" in theirs and not opts.no_vllm:
                print(f"  (vLLM: {theirs['error'][:160]})")
        if opts.alone_rounds:
            alone_interleaved(ckpts, alone, warmup, opts.new_tokens, opts.alone_rounds)
        if "bf16" in alone_rates:  # the quantized-against-unquantized targets
            base_total, base_decode = alone_rates["bf16"]
            print(f"\n{model}, 1 request, against q's bf16 (whole request / after its first "
                  "token): " + ", ".join(f"{name} {total / base_total:.2f}x / "
                                         f"{decode / base_decode:.2f}x"
                                         for name, (total, decode) in alone_rates.items()
                                         if name != "bf16"))


if __name__ == "__main__":
    main()

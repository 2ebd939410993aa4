#!/usr/bin/env python3
"""Benchmark `q quantize` against llm-compressor on random-weight Llama checkpoints.

Not a pytest test (tests/bench/conftest.py keeps pytest away). Run it with q's venv:

    python tests/bench/bench_quantize.py --sizes 1b,3b --tools q,llmc,llmc-free

What it does:

1. Writes random bf16 Llama checkpoints (TinyLlama-1.1B shape, and a ~3.0B Llama-3.2-3B-like
   shape with vocab 32000) as sharded safetensors + index + config.json, one shard at a time
   so the whole model is never in RAM. Cached under --workdir; skipped when present.
2. Reads the shards with `cat > /dev/null`, cold (pages evicted with
   posix_fadvise(DONTNEED), which needs no root) and warm, and reports MB/s.
3. Runs every (size, tool, scheme) in a fresh subprocess, one at a time, and takes wall time
   and the child's peak RSS from os.wait4's rusage. Before each run the input is made warm
   (default) or cold (--cache cold), and os.sync() flushes the previous run's dirty pages so
   they are not written back on the next run's clock.
4. Prints a markdown table (and writes WORKDIR/results.json).

Tools:
  q          q quantize MODEL --scheme S -o OUT --overwrite --no-progress
  llmc       llm-compressor oneshot(model=..., recipe=QuantizationModifier(targets="Linear",
             scheme="FP8_BLOCK"|"FP8_DYNAMIC", ignore=["lm_head"]), output_dir=OUT) on CPU
  llmc-free  llm-compressor model_free_ptq(MODEL, OUT, scheme=...,
             ignore=["lm_head", "re:.*embed_tokens$"])
llm-compressor lives in its own venv (--llmc-python, default $LLMC_PYTHON or
.bench-venv/bin/python).

--profile runs q once more on the first size under py-spy (--threads --idle) and prints
where each thread's samples went (read / quantize arithmetic / write / fsync / waiting).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

MODELS = {
    # TinyLlama-1.1B: 1.100B params
    "1b": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000),
    # Llama-3.2-3B body with a 32000 vocab and untied head: 3.016B params
    "3b": dict(hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8, vocab=32000),
}
SCHEMES = {"fp8-block": "FP8_BLOCK", "fp8-dynamic": "FP8_DYNAMIC"}
TOOLS = ("q", "llmc", "llmc-free")
GIB = 1024**3

LLMC_ONESHOT = r"""
import sys, torch
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
model, scheme, out = sys.argv[1:4]
oneshot(model=model,
        recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"]),
        output_dir=out)
"""

LLMC_FREE = r"""
import sys
from llmcompressor import model_free_ptq
model, scheme, out = sys.argv[1:4]
# model_free_ptq sees tensors, not modules: without the embedding in `ignore` it
# quantizes model.embed_tokens.weight too (oneshot and q keep it bf16)
model_free_ptq(model, out, scheme=scheme, ignore=["lm_head", "re:.*embed_tokens$"])
"""


# --- checkpoint generation ---------------------------------------------------------------------


def tensor_specs(m: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = m["hidden"], m["intermediate"], m["vocab"]
    hd = h // m["heads"]
    kv = m["kv_heads"] * hd
    specs = [("model.embed_tokens.weight", (v, h))]
    for n in range(m["layers"]):
        p = f"model.layers.{n}."
        specs += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return specs


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def llama_config(m: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": m["hidden"], "intermediate_size": m["intermediate"],
        "num_hidden_layers": m["layers"], "num_attention_heads": m["heads"],
        "num_key_value_heads": m["kv_heads"], "head_dim": m["hidden"] // m["heads"],
        "vocab_size": m["vocab"], "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
        "initializer_range": 0.02, "dtype": "bfloat16", "torch_dtype": "bfloat16",
        "use_cache": True,
    }


def generate(size: str, root: Path, shard_bytes: int) -> Path:
    """Write the random checkpoint shard by shard; atomic (tmp dir + rename)."""
    import torch
    from safetensors.torch import save_file

    path = root / f"llama-{size}-bf16"
    if (path / "config.json").exists():
        return path
    m = MODELS[size]
    specs = tensor_specs(m)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    acc = 0
    for name, shape in specs:
        nb = numel(shape) * 2
        if shards[-1] and acc + nb > shard_bytes:
            shards.append([])
            acc = 0
        shards[-1].append((name, shape))
        acc += nb
    tmp = root / f".llama-{size}-bf16.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1234)
    weight_map, total = {}, 0
    t0 = time.time()
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if len(shape) == 1:
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(
                    torch.bfloat16)
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * 2
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
        print(f"  [gen {size}] {fname} ({time.time() - t0:.0f}s)", file=sys.stderr)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(llama_config(m), indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2}, indent=2))
    os.sync()
    os.rename(tmp, path)
    return path


# --- measurement -------------------------------------------------------------------------------


def shard_files(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


def evict(files) -> None:
    """Drop the files' clean pages from the page cache (no root needed)."""
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_measured(cmd: list[str], log: Path, env=None) -> dict:
    """Run cmd as a fresh child; wall seconds and the child's peak RSS (ru_maxrss)."""
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": wall, "peak_rss_gib": ru.ru_maxrss * 1024 / GIB, "rc": p.returncode,
            "user_s": ru.ru_utime, "sys_s": ru.ru_stime, "minor_faults": ru.ru_minflt}


def cat_devnull(files) -> float:
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as null:
        subprocess.run(["cat", *map(str, files)], stdout=null, check=True)
    return time.perf_counter() - t0


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def tool_cmd(tool: str, scheme: str, model: Path, out: Path, args) -> list[str]:
    if tool == "q":
        return [args.q_bin, "quantize", str(model), "--scheme", scheme, "-o", str(out),
                "--overwrite", "--no-progress"]
    src = LLMC_ONESHOT if tool == "llmc" else LLMC_FREE
    return [args.llmc_python, "-c", src, str(model), SCHEMES[scheme], str(out)]


# --- profile -----------------------------------------------------------------------------------

CATEGORIES = [  # (substring of any frame, category); the first listed that matches wins
    ("ShardWriter.finish", "write: finish (fsync)"),
    ("_pwrite", "write: pwrite"),
    ("copy_range", "write: copy_file_range"),
    ("ModelSource.read", "read: preadv"),
    ("put (queue.py", "wait: queue full (put)"),
    ("get (queue.py", "wait: queue empty (get)"),
    ("join (threading.py", "wait: join"),
    ("isfinite", "compute: NaN/Inf check"),
    ("block_amax", "compute: amax"),
    ("abs_max", "compute: amax"),
    ("padded_blocks", "compute: bf16->fp32 copy"),
    ("expand_blocks", "compute: expand scales"),
    ("quantize_fp8", "compute: float/divide/clamp/cast"),
    ("_quantize_rows", "compute: float/divide/clamp/cast"),
    ("quantize_weight", "compute: other"),
    ("encode", "compute: format encode"),
    ("wait (threading.py", "wait: other"),
]


def classify(frames: list[str]) -> str:
    stack = ";".join(frames)
    for key, cat in CATEGORIES:
        if key in stack:
            return cat
    return "other (startup, plan, imports)"


def profile_q(model: Path, scheme: str, workdir: Path, args) -> str:
    pyspy = shutil.which("py-spy") or str(Path(args.llmc_python).parent / "py-spy")
    if not Path(pyspy).exists():
        return "py-spy not found; skipped the profile\n"
    raw = workdir / f"pyspy-q-{model.name}-{scheme}.txt"
    out = workdir / "out" / f"q-profile-{model.name}"
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    cat_devnull(shard_files(model))
    cmd = [pyspy, "record", "--threads", "--idle", "--rate", "100", "--format", "raw",
           "-o", str(raw), "--", args.q_bin.replace("/q", "/python"), "-c",
           "import sys; from q.cli import main; sys.argv[0]='q'; main()",
           "quantize", str(model), "--scheme", scheme, "-o", str(out), "--overwrite",
           "--no-progress"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    lines = [f"py-spy profile of q {scheme} on {model.name} (100 Hz, --threads --idle; "
             f"wall {wall:.1f}s under py-spy, load {load()}):", ""]
    return "\n".join(lines) + "\n" + summarize_profile(raw)


def summarize_profile(raw: Path) -> str:
    """Samples per thread and category, and the main thread's hottest innermost lines."""
    per_thread: dict[str, Counter] = defaultdict(Counter)
    main_lines: Counter = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = frames[0].partition("): ")[2] or frames[0]  # "thread (TID): NAME"
        per_thread[thread][classify(frames[1:])] += int(count)
        if thread == "MainThread" and len(frames) > 1:
            main_lines[frames[-1]] += int(count)
    lines = []
    lines += ["| thread | category | samples | share of thread |", "|---|---|---|---|"]
    for thread, cnt in sorted(per_thread.items(), key=lambda kv: -sum(kv[1].values())):
        tot = sum(cnt.values())
        for cat, c in cnt.most_common():
            if c / tot >= 0.01:
                lines.append(f"| {thread} | {cat} | {c} | {100 * c / tot:.0f}% |")
    lines += ["", "| MainThread innermost frame | samples |", "|---|---:|"]
    lines += [f"| `{frame}` | {c} |" for frame, c in main_lines.most_common(8)]
    return "\n".join(lines) + "\n"


# --- main --------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1b,3b")
    ap.add_argument("--tools", default="q,llmc,llmc-free")
    ap.add_argument("--schemes", default="fp8-block,fp8-dynamic")
    ap.add_argument("--workdir", default="/tmp/q-bench", type=Path)
    ap.add_argument("--cache", choices=("warm", "cold"), default="warm",
                    help="page-cache state of the input before each tool run")
    ap.add_argument("--gen-shard-gib", type=float, default=1.0)
    ap.add_argument("--q-bin", default=str(Path(sys.executable).parent / "q"))
    ap.add_argument("--llmc-python",
                    default=os.environ.get("LLMC_PYTHON", ".bench-venv/bin/python"))
    ap.add_argument("--keep-outputs", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="also profile q (first scheme) on the first size with py-spy")
    ap.add_argument("--summarize-profile", type=Path, metavar="RAW",
                    help="only summarize an earlier py-spy raw file and exit")
    args = ap.parse_args()
    if args.summarize_profile:
        print(summarize_profile(args.summarize_profile))
        return 0
    sizes = [s for s in args.sizes.split(",") if s]
    tools = [t for t in args.tools.split(",") if t]
    schemes = [s for s in args.schemes.split(",") if s]
    for s in sizes:
        if s not in MODELS:
            ap.error(f"unknown size {s}; choose from {', '.join(MODELS)}")
    for t in tools:
        if t not in TOOLS:
            ap.error(f"unknown tool {t}; choose from {', '.join(TOOLS)}")
    for s in schemes:
        if s not in SCHEMES:
            ap.error(f"unknown scheme {s}; choose from {', '.join(SCHEMES)}")
    work = args.workdir
    (work / "logs").mkdir(parents=True, exist_ok=True)
    (work / "out").mkdir(parents=True, exist_ok=True)

    repo = Path(__file__).resolve().parents[2]
    rev = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip() or "?"
    print(f"q at {rev}; load {load()}", file=sys.stderr)
    rows, reads = [], {}
    for size in sizes:
        model = generate(size, work, int(args.gen_shard_gib * GIB))
        files = shard_files(model)
        nbytes = sum(f.stat().st_size for f in files)
        evict(files)
        cold = cat_devnull(files)
        warm = cat_devnull(files)
        reads[size] = {"bytes": nbytes, "cold_s": cold, "warm_s": warm,
                       "cold_mb_s": nbytes / cold / 1e6, "warm_mb_s": nbytes / warm / 1e6,
                       "load": load()}
        print(f"[{size}] {nbytes / GIB:.2f} GiB in {len(files)} shards; cat cold "
              f"{reads[size]['cold_mb_s']:.0f} MB/s, warm {reads[size]['warm_mb_s']:.0f} MB/s "
              f"(load {load()})", file=sys.stderr)
        for scheme in schemes:
            for tool in tools:
                out = work / "out" / f"{tool}-{size}-{scheme}"
                shutil.rmtree(out, ignore_errors=True)
                if args.cache == "cold":
                    evict(files)
                else:
                    os.sync()
                    cat_devnull(files)
                log = work / "logs" / f"{tool}-{size}-{scheme}.log"
                before = load()
                r = run_measured(tool_cmd(tool, scheme, model, out, args), log)
                r.update(size=size, tool=tool, scheme=scheme, load_before=before,
                         load_after=load(), in_bytes=nbytes,
                         out_bytes=dir_bytes(out) if out.exists() and r["rc"] == 0 else None)
                if r["rc"] != 0:
                    tail = log.read_text(errors="replace").splitlines()[-15:]
                    r["error"] = "\n".join(tail)
                    print(f"[{size}] {tool} {scheme}: FAILED rc={r['rc']}\n" + r["error"],
                          file=sys.stderr)
                else:
                    print(f"[{size}] {tool} {scheme}: {r['wall_s']:.1f}s "
                          f"{r['peak_rss_gib']:.2f} GiB RSS (load {before} -> "
                          f"{r['load_after']})", file=sys.stderr)
                rows.append(r)
                if not args.keep_outputs:
                    shutil.rmtree(out, ignore_errors=True)
                (work / "results.json").write_text(json.dumps(
                    {"q_rev": rev, "reads": reads, "runs": rows}, indent=1))

    base = {(r["size"], r["scheme"]): r["wall_s"] for r in rows
            if r["tool"] == "llmc" and r["rc"] == 0}
    print(f"q at {rev}")
    print()
    print("| model | tool | scheme | wall s | peak RSS GiB | output GiB | input MB/s "
          "| speed-up vs llmc oneshot |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        key = (r["size"], r["scheme"])
        if r["rc"] != 0:
            print(f"| {r['size']} | {r['tool']} | {r['scheme']} | failed (rc {r['rc']}) "
                  "| | | | |")
            continue
        ratio = f"{base[key] / r['wall_s']:.2f}x" if key in base else "n/a"
        print(f"| {r['size']} | {r['tool']} | {r['scheme']} | {r['wall_s']:.1f} "
              f"| {r['peak_rss_gib']:.2f} | {r['out_bytes'] / GIB:.2f} "
              f"| {r['in_bytes'] / r['wall_s'] / 1e6:.0f} | {ratio} |")
    print()
    print("| model | bf16 GiB | cat cold MB/s | cat warm MB/s |")
    print("|---|---:|---:|---:|")
    for size, rd in reads.items():
        print(f"| {size} | {rd['bytes'] / GIB:.2f} | {rd['cold_mb_s']:.0f} "
              f"| {rd['warm_mb_s']:.0f} |")
    if args.profile and sizes:
        print()
        print(profile_q(work / f"llama-{sizes[0]}-bf16", schemes[0], work, args))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

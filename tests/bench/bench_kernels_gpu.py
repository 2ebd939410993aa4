"""Correctness, then speed, of q's Triton kernels on one CUDA GPU, in one call (no internet).

    python tests/bench/bench_kernels_gpu.py                     # ~3-5 min on an H100/H200
    python tests/bench/bench_kernels_gpu.py --quick             # 2 shapes, M in {1, 128, 4096}
    python tests/bench/bench_kernels_gpu.py --out $OUT/bench.md # also write the report there
    python tests/bench/bench_kernels_gpu.py --cpu-smoke         # this script's plumbing, no GPU

Method (/work/.library/device/METHOD.md): both ceilings are measured first in the same run (a
1 GiB device-to-device copy counting bytes read plus written; an 8192^3 bf16 matmul on random
data), and every row gets its floor ``max(FLOP / peak, bytes / bandwidth)`` (fp8/int8 MMA peak
taken as twice the measured bf16 rate: the datasheet ratio, a lead). Correctness first: every
kernel against its torch reference and a float64 computation on fresh random inputs (the seed
is printed), with the allocator poisoned with NaN before each launch so an unwritten output
element fails the finite check; every launch is synchronized so a launch error surfaces there.
Times are medians of ``triton.testing.do_bench`` (CUDA events, warm-up first, L2 flushed
before each run, so small weights are not timed cache-hot). The first rows are timed twice:
the spread printed under the table is the noise floor for comparing versions.

Imports q.kernels from this checkout without importing ``q`` itself (the CLI/pipeline needs
packages a bare GPU image may lack).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (7168, 2048)]  # (N, K): Llama-3-8B, DS-V3
MS = [1, 16, 128, 1024, 4096]


def load_kernels():
    """Register ``q`` (empty, pointing at core/) and ``q.kernels`` from this checkout."""
    if "q" not in sys.modules:
        pkg = types.ModuleType("q")
        pkg.__path__ = [str(ROOT / "core")]
        sys.modules["q"] = pkg
    if "q.kernels" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "q.kernels", ROOT / "kernels" / "__init__.py",
            submodule_search_locations=[str(ROOT / "kernels")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["q.kernels"] = mod
        spec.loader.exec_module(mod)
    from q.kernels.act_quant import reference as aq_ref
    from q.kernels.act_quant import triton_impl as aq
    from q.kernels.block_gemm import reference as bg_ref
    from q.kernels.block_gemm import triton_impl as bg
    from q.kernels.packing.reference import pack_int4_bytes
    from q.kernels.scaled_gemm import reference as sg_ref
    from q.kernels.scaled_gemm import triton_impl as sg
    from q.kernels.weight_only_gemm import reference as wo_ref
    from q.kernels.weight_only_gemm import triton_impl as wo
    return types.SimpleNamespace(aq=aq, aq_ref=aq_ref, bg=bg, bg_ref=bg_ref, sg=sg, sg_ref=sg_ref,
                                 wo=wo, wo_ref=wo_ref, pack_int4=pack_int4_bytes)


class Problem:
    """Fresh random operands of one (M, N, K) for every op, on ``dev``."""

    def __init__(self, k_ops, m, n, k, dev):
        import torch

        self.m, self.n, self.k = m, n, k
        e4m3 = torch.float8_e4m3fn
        self.x = torch.randn(m, k, device=dev).bfloat16()
        self.xq, self.xs = k_ops.aq_ref.quantize_activation(self.x, 128, e4m3)
        self.wq = (torch.randn(n, k, device=dev) * 100).clamp(-448, 448).to(e4m3)
        self.ws = torch.rand(-(-n // 128), -(-k // 128), device=dev) * 1e-3 + 1e-4
        self.tq, self.ts = k_ops.aq_ref.quantize_activation(self.x, None, e4m3)
        self.iq, self.is_ = k_ops.aq_ref.quantize_activation(self.x, None, torch.int8)
        self.w8 = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
        self.ch = torch.rand(n, 1, device=dev) * 1e-3 + 1e-4
        self.w4 = k_ops.pack_int4(torch.randint(-8, 8, (n, k), device=dev, dtype=torch.int8))
        self.s4 = (torch.rand(n, -(-k // 128), device=dev) * 1e-2 + 1e-3).bfloat16()
        self.z4 = torch.randint(-2, 3, (n, -(-k // 128)), device=dev, dtype=torch.int8)
        self.wb = torch.randn(n, k, device=dev).bfloat16()


def ops(kk, p, out):
    """name -> (triton call, reference call, bytes moved once, FLOPs, low-precision MMA)."""
    import torch

    m, n, k = p.m, p.n, p.k
    e4m3 = torch.float8_e4m3fn
    ob = torch.empty((), dtype=out).element_size()
    c_bytes = m * n * ob
    blk = m * -(-k // 128) * 4 + p.ws.numel() * 4
    return {
        "act_quant fp8 g128": (lambda: kk.aq.quantize_activation(p.x, 128, e4m3),
                               lambda: kk.aq_ref.quantize_activation(p.x, 128, e4m3),
                               m * k * 3 + m * -(-k // 128) * 4, 0, False),
        "block fp8": (lambda: kk.bg.fp8_block_gemm(p.xq, p.xs, p.wq, p.ws, (128, 128), out),
                      lambda: kk.bg_ref.fp8_block_gemm(p.xq, p.xs, p.wq, p.ws, (128, 128), out),
                      m * k + n * k + blk + c_bytes, 2 * m * n * k, True),
        "block fp8 + act quant": (
            lambda: kk.bg.fp8_block_gemm(*kk.aq.quantize_activation(p.x, 128, e4m3), p.wq, p.ws,
                                         (128, 128), out),
            None, m * k * 2 + n * k + blk + c_bytes, 2 * m * n * k, True),
        "scaled fp8": (lambda: kk.sg.scaled_gemm(p.tq, p.ts, p.wq, p.ch, out),
                       lambda: kk.sg_ref.scaled_gemm(p.tq, p.ts, p.wq, p.ch, out),
                       m * k + n * k + (m + n) * 4 + c_bytes, 2 * m * n * k, True),
        "scaled int8": (lambda: kk.sg.scaled_gemm(p.iq, p.is_, p.w8, p.ch, out),
                        lambda: kk.sg_ref.scaled_gemm(p.iq, p.is_, p.w8, p.ch, out),
                        m * k + n * k + (m + n) * 4 + c_bytes, 2 * m * n * k, True),
        "w-only int8": (lambda: kk.wo.weight_only_gemm(p.x, p.w8, p.ch, k, 8, None, out),
                        lambda: kk.wo_ref.weight_only_gemm(p.x, p.w8, p.ch, k, 8, None, out),
                        m * k * 2 + n * k + n * 4 + c_bytes, 2 * m * n * k, False),
        "w-only int4 g128 zp": (
            lambda: kk.wo.weight_only_gemm(p.x, p.w4, p.s4, 128, 4, p.z4, out),
            lambda: kk.wo_ref.weight_only_gemm(p.x, p.w4, p.s4, 128, 4, p.z4, out),
            m * k * 2 + n * k // 2 + p.s4.numel() * 3 + c_bytes, 2 * m * n * k, False),
        "w-only fp8 fallback": (lambda: kk.wo.weight_only_gemm(p.x, p.wq, p.ch, k, 8, None, out),
                                lambda: kk.wo_ref.weight_only_gemm(p.x, p.wq, p.ch, k, 8, None,
                                                                   out),
                                m * k * 2 + n * k + n * 4 + c_bytes, 2 * m * n * k, False),
    }


def poisoned(fn, numel, dev):
    """Run ``fn`` right after freeing a NaN-filled block, so its fresh outputs start as NaN."""
    import torch

    junk = torch.full((numel,), float("nan"), device=dev)
    del junk
    out = fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()  # a launch error surfaces here, at its own op
    return out


def check(kk, dev, shapes, seed):
    """Correctness pass: PASS/FAIL per op and shape; returns the number of failures."""
    import torch

    torch.manual_seed(seed)
    fails = 0
    print(f"## correctness (seed {seed})\n")
    print("| op | M | N | K | out | rel err vs reference | rel err vs float64 | result |")
    print("|---|---:|---:|---:|---|---:|---:|---|")
    for i, (m, n, k) in enumerate(shapes):
        # act quant: bit-exact codes and scales, fp8 and int8, group 128 and per token
        for group in (128, None):
            for qd in (torch.float8_e4m3fn, torch.int8):
                x = (torch.randn(m, k, device=dev) * 3).bfloat16()
                q, s = poisoned(lambda x=x, g=group, qd=qd: kk.aq.quantize_activation(x, g, qd),
                                m * k, dev)
                q_ref, s_ref = kk.aq_ref.quantize_activation(x, group, qd)
                exact = torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and \
                    torch.equal(s, s_ref)
                fails += not exact
                name = f"act_quant {str(qd)[6:]} g{group or 'token'}"
                print(f"| {name} | {m} | - | {k} | codes | {'bit-exact' if exact else 'DIFFER'}"
                      f" | - | {'PASS' if exact else 'FAIL'} |")
        p = Problem(kk, m, n, k, dev)
        ref64 = reference64(p)
        for out in (torch.float32, torch.bfloat16) if i == 0 else (torch.float32,):
            for name, (fn, ref_fn, *_rest) in ops(kk, p, out).items():
                if ref_fn is None or name.startswith("act_quant"):
                    continue
                y = poisoned(fn, m * n * 4, dev)
                ref = ref_fn()
                finite = bool(torch.isfinite(y).all())
                e_ref = rel(y, ref)
                e64 = rel(y, ref64[name])
                tol = 1e-2 if out == torch.bfloat16 else (3e-3 if "fp8" in name else 1e-4)
                ok = finite and e_ref <= tol and e64 <= tol
                fails += not ok
                print(f"| {name} | {m} | {n} | {k} | {str(out)[6:]} | {e_ref:.2e} | {e64:.2e} "
                      f"| {'PASS' if ok else 'FAIL' + ('' if finite else ' (non-finite)')} |")
    print()
    return fails


def rel(y, ref):
    ref = ref.double()
    return float((y.double() - ref).norm() / ref.norm())


def reference64(p):
    """Each GEMM's math in float64, written from the operands (no q code)."""
    import torch

    def blocks(v, rows, cols):
        return v.double().repeat_interleave(rows, 0).repeat_interleave(cols, 1)

    n, k = p.n, p.k
    a = p.xq.double() * blocks(p.xs, 1, 128)[:, :k]
    b = p.wq.double() * blocks(p.ws, 128, 128)[:n, :k]
    ch = p.ch.double().reshape(1, -1)
    w4 = torch.stack([(p.w4.view(torch.int8) << 4) >> 4, p.w4.view(torch.int8) >> 4], -1)
    w4 = (w4.reshape(n, -1)[:, :k].double() - blocks(p.z4, 1, 128)[:, :k])
    w4 = w4 * blocks(p.s4, 1, 128)[:, :k]
    x = p.x.double()
    return {
        "block fp8": a @ b.T,
        "scaled fp8": (p.tq.double() @ p.wq.double().T) * p.ts.double() * ch,
        "scaled int8": (p.iq.double() @ p.w8.double().T) * p.is_.double() * ch,
        "w-only int8": (x @ p.w8.double().T) * ch,
        "w-only int4 g128 zp": x @ w4.T,
        "w-only fp8 fallback": (x @ p.wq.double().T) * ch,
    }


def timer(dev, quick):
    """Median milliseconds of ``fn``: do_bench on CUDA, a few wall-clock runs elsewhere."""
    if dev.type == "cuda":
        from triton.testing import do_bench

        warmup, rep = (10, 40) if quick else (25, 100)
        return lambda fn: do_bench(fn, warmup=warmup, rep=rep, return_mode="median")

    def wall(fn):
        fn()
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - start) * 1e3)
        return sorted(runs)[1]
    return wall


def ceilings(dev, bench):
    """Measured memory bandwidth (B/s, read + write) and bf16 matmul rate (FLOP/s)."""
    import torch

    size = (1 << 30) if dev.type == "cuda" else (1 << 24)
    src = torch.randn(size // 4, device=dev)
    dst = torch.empty_like(src)
    bw = 2 * size / (bench(lambda: dst.copy_(src)) * 1e-3)
    d = 8192 if dev.type == "cuda" else 512
    a = torch.randn(d, d, device=dev).bfloat16()
    b = torch.randn(d, d, device=dev).bfloat16()
    rate = 2 * d ** 3 / (bench(lambda: a @ b) * 1e-3)
    return bw, rate


def timing(kk, dev, shapes, ms, bench, bw, rate):
    import torch

    rows, spread = [], []
    for si, (n, k) in enumerate(shapes):
        for m in ms:
            p = Problem(kk, m, n, k, dev)
            t_bf16 = bench(lambda p=p: p.x @ p.wb.T)
            for name, (fn, _ref, nbytes, flops, low) in ops(kk, p, torch.bfloat16).items():
                t = bench(fn)
                if si == 0 and m in (ms[0], ms[-1]):  # the noise floor: time it again
                    spread.append(abs(bench(fn) - t) / t)
                floor = max(flops / (rate * (2 if low else 1)), nbytes / bw) * 1e3
                rows.append((name, m, n, k, t, flops, nbytes, floor, t_bf16))
            print(f"timed N={n} K={k} M={m}", flush=True)
    return rows, spread


def table(rows):
    lines = [("| op | M | N | K | µs | TFLOP/s | GB/s | floor µs | floor/time | bf16 µs "
              "| bf16/kernel |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m, n, k, t, flops, nbytes, floor, t_bf16 in rows:
        tflops = f"{flops / t * 1e-9:.1f}" if flops else "-"
        lines.append(f"| {name} | {m} | {n} | {k} | {t * 1e3:.1f} | {tflops} | "
                     f"{nbytes / t * 1e-6:.0f} | {floor * 1e3:.1f} | {floor / t:.0%} | "
                     f"{t_bf16 * 1e3:.1f} | {t_bf16 / t:.2f} |")
    return "\n".join(lines)


def summary(rows, ms):
    """Geometric mean over shapes of bf16 time / kernel time, per op and M (short: printed last)."""
    import math

    ratios = {}
    for name, m, _n, _k, t, *_rest, t_bf16 in rows:
        ratios.setdefault(name, {}).setdefault(m, []).append(t_bf16 / t)
    lines = ["| bf16 time / kernel time | " + " | ".join(f"M={m}" for m in ms) + " |",
             "|---|" + "---:|" * len(ms)]
    for name, by_m in ratios.items():
        cells = [math.exp(sum(map(math.log, by_m[m])) / len(by_m[m])) for m in ms]
        lines.append(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 shapes, M in {1, 128, 4096}")
    ap.add_argument("--out", type=Path, help="also write the markdown report to this path")
    ap.add_argument("--seed", type=int, help="random seed (default: from the clock)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny shapes on the CPU under TRITON_INTERPRET=1 (numbers meaningless)")
    args = ap.parse_args()
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    import torch
    import triton

    dev = torch.device("cpu" if args.cpu_smoke else "cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU, or pass --cpu-smoke", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references in full fp32
    kk = load_kernels()
    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    started = time.perf_counter()
    if args.cpu_smoke:
        shapes, ms, checks = [(256, 384)], [1, 16], [(3, 200, 300)]
    else:
        shapes = SHAPES[:2] if args.quick else SHAPES
        ms = [1, 128, 4096] if args.quick else MS
        checks = [(1, 4096, 4096), (37, 7168, 2048), (300, 1000, 1500), (2048, 4096, 4096)]
        checks = checks[::2] if args.quick else checks
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (interpreter smoke)"
    head = [f"# q Triton kernels on {name}", "",
            (f"torch {torch.__version__}, triton {triton.__version__}, "
             f"CUDA {torch.version.cuda}, seed {seed}")]
    if dev.type == "cuda":
        cap = torch.cuda.get_device_capability(dev)
        head[-1] += f", sm_{cap[0]}{cap[1]}"
    print("\n".join(head) + "\n", flush=True)
    fails = check(kk, dev, checks, seed)
    bench = timer(dev, args.quick)
    bw, rate = ceilings(dev, bench)
    ceil = (f"measured ceilings: copy {bw / 1e9:.0f} GB/s (read + write), bf16 matmul "
            f"{rate / 1e12:.0f} TFLOP/s (fp8/int8 MMA peak taken as 2x)")
    print(ceil, flush=True)
    rows, spread = timing(kk, dev, shapes, ms, bench, bw, rate)
    method = ("Times: median GPU time, bf16 output, L2 flushed before each run; "
              "floor = max(FLOP / peak, bytes / bandwidth).")
    report = "\n".join(head + ["", ceil, "", method, "", table(rows), "", summary(rows, ms), "",
                               f"noise: timed twice, max spread {max(spread, default=0):.1%}",
                               f"correctness failures: {fails}",
                               f"wall time: {time.perf_counter() - started:.0f} s"])
    # the full table first, the short summary last (a terminal tail shows the summary)
    print("\n" + table(rows) + "\n\n" + summary(rows, ms) + "\n")
    print(f"noise: timed twice, max spread {max(spread, default=0):.1%}; correctness failures: "
          f"{fails}; wall time {time.perf_counter() - started:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())

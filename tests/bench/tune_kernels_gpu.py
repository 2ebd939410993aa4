"""Sweep launch configs of q's Triton GEMMs on a GPU and print the best per (op, M bucket).

One device call: first re-checks activation quantization bit for bit against the reference
(the H200 run of 2026-11-28 found codes that differed), then, for each op and M bucket,
times a small grid of configs on the DeepSeek/Llama shapes of bench_kernels_gpu.py and
keeps the config with the lowest total time over the shapes. Results are written as JSON
after every op (``--out``), so a run cut short still returns what it measured; fold them
into ``kernels/configs/*.json`` by hand and re-run bench_kernels_gpu.py.

Run: python tests/bench/tune_kernels_gpu.py --out $OUT/tuned.json [--ops wo4,wo8,block,sfp8,si8]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels_gpu import SHAPES, Problem, load_kernels  # noqa: E402

DECODE = [dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, GROUP_M=1, num_warps=w,
               num_stages=4)
          for bn, bk, sk, w in itertools.product((32, 64, 128), (128, 256), (1, 4, 8), (4,))]
PREFILL = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, SPLIT_K=1, GROUP_M=8, num_warps=w,
                num_stages=st)
           for bm, bn, w, st in itertools.product((64, 128), (128, 256), (4, 8), (3, 4))]
BUCKETS = {1: DECODE, 16: DECODE, 128: PREFILL, 1024: PREFILL, 4096: PREFILL}


def check_act_quant(kk, dev) -> list[str]:
    import torch

    lines = []
    for m, k, group in ((37, 2048, 128), (300, 1500, None), (2048, 4096, 128), (5, 576, 128)):
        for qd in (torch.float8_e4m3fn, torch.int8):
            x = (torch.randn(m, k, device=dev) * 3).bfloat16()
            q, s = kk.aq.quantize_activation(x, group, qd)
            q_ref, s_ref = kk.aq_ref.quantize_activation(x, group, qd)
            bad = (q.view(torch.uint8) != q_ref.view(torch.uint8)).sum().item()
            lines.append(f"act_quant {qd} g{group} {m}x{k}: codes differing {bad}, scales "
                         f"equal {torch.equal(s, s_ref)}")
    return lines


def op_fn(kk, name, p, cfg):
    import torch

    bf16 = torch.bfloat16
    if name == "block":
        return lambda: kk.bg.fp8_block_gemm(p.xq, p.xs, p.wq, p.ws, (128, 128), bf16, config=cfg)
    if name == "sfp8":
        return lambda: kk.sg.scaled_gemm(p.tq, p.ts, p.wq, p.ch, bf16, config=cfg)
    if name == "si8":
        return lambda: kk.sg.scaled_gemm(p.iq, p.is_, p.w8, p.ch, bf16, config=cfg)
    if name == "wo8":
        return lambda: kk.wo.weight_only_gemm(p.x, p.w8, p.ch, p.k, 8, None, bf16,
                                              config=cfg)
    if name == "wo4":
        return lambda: kk.wo.weight_only_gemm(p.x, p.w4, p.s4, 128, 4, p.z4,
                                              bf16, config=cfg)
    raise KeyError(name)


def main() -> int:
    import torch
    import triton

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ops", default="wo4,block,wo8,si8,sfp8")
    ap.add_argument("--budget-s", type=float, default=330, help="stop sweeping after this")
    args = ap.parse_args()
    start = time.time()
    kk = load_kernels()
    dev = torch.device("cuda")
    report = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__,
              "triton": triton.__version__, "act_quant": check_act_quant(kk, dev), "best": {}}
    print("\n".join(report["act_quant"]), flush=True)
    problems = {}
    for op in args.ops.split(","):
        report["best"][op] = {}
        for m, grid in BUCKETS.items():
            if time.time() - start > args.budget_s:
                print(f"budget spent; stopping before {op} M={m}", flush=True)
                break
            results = []
            for cfg in grid:
                total, ok = 0.0, True
                for n, k in SHAPES:
                    p = problems.get((m, n, k)) or problems.setdefault((m, n, k),
                                                                       Problem(kk, m, n, k, dev))
                    try:
                        fn = op_fn(kk, op, p, cfg)
                        fn()
                        total += triton.testing.do_bench(fn, warmup=5, rep=20,
                                                         return_mode="median")
                    except Exception as exc:  # a config the compiler refuses
                        ok = False
                        print(f"  {op} M={m} {cfg}: {type(exc).__name__}", flush=True)
                        break
                if ok:
                    results.append((total, cfg))
            results.sort(key=lambda r: r[0])
            if results:
                default = next((t for t, c in results if c == grid[0]), None)
                report["best"][op][str(m)] = {"config": results[0][1],
                                              "total_ms": results[0][0],
                                              "grid_first_ms": default}
                print(f"{op} M={m}: best {results[0][0]:.4f} ms {results[0][1]}", flush=True)
            args.out.write_text(json.dumps(report, indent=1))
    print(f"done in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

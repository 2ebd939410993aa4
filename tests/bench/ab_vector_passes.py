"""A/B of the pass shape of the strip kernels' AVX-512 path (``amx_tiles.h``'s vector_loop,
CPUs without AMX tiles): tokens x strips per pass, each variant a build of the same sources
with ``-DQ_VEC_TOKENS=R -DQ_VEC_STRIPS=S`` (and any other of its macros after a ``+``:
``8x2+Q_VEC_LARGE_CHUNK_BYTES=524288`` is 8 x 2 with the token chunks of small weights for
large ones too), all timed interleaved in one process.

    python tests/bench/ab_vector_passes.py [--variants 8x1,8x2,6x4] [--tokens 8,32,256,2048]
        [--model smollm2|tinyllama]

Weights of a whole model (bench_decode_gemms_cpu.py's shapes), each its own tensor, called
in model order so they stream from memory; ms per step, median of --repeat passes. bf16
(``dense_gemm/amx_bf16.cpp``) and int8 W8A8 (``scaled_gemm/amx_int8.cpp``); 1-4 tokens take
the kernels' register paths, which the pass shape does not touch.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from bench_decode_gemms_cpu import SHAPES

from q.kernels import cpp_build
from q.kernels.dense_gemm.cpp_impl import to_amx_bf16_layout
from q.kernels.scaled_gemm.cpp_impl import to_amx_int8_layout, weight_row_sums

KERNELS = Path(cpp_build.__file__).parent
P, L, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def build(variant: str, out: Path) -> dict:
    shape, *overrides = variant.split("+")  # 8x2+Q_VEC_LARGE_WEIGHT=1: other macros too
    r, s = shape.split("x")
    defines = [f"-DQ_VEC_TOKENS={r}", f"-DQ_VEC_STRIPS={s}", *(f"-D{o}" for o in overrides)]
    libs = {}
    for name, src in (("bf16", "dense_gemm/amx_bf16.cpp"), ("int8", "scaled_gemm/amx_int8.cpp")):
        so = out / f"{name}-{variant}.so"
        subprocess.run(["g++", *cpp_build.FLAGS, *defines,
                        str(KERNELS / src), "-o", str(so)], check=True)
        libs[name] = ctypes.CDLL(str(so))
    libs["bf16"].q_bf16_amx.argtypes = [P, P, P, P, L, L, L, I]
    libs["int8"].q_int8_amx.argtypes = [I, P, P, P, P, P, P, L, L, L, I]
    return libs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="8x1,8x2,6x4")
    ap.add_argument("--tokens", default="8,32,256,2048")
    ap.add_argument("--model", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if cpp_build.amx_tiles():
        raise SystemExit("this CPU has AMX tiles: its kernels do not run the vector path")
    layers = {"tinyllama": 22, "smollm2": 30}[args.model]
    g = torch.Generator().manual_seed(0)
    weights = []
    for n, k in SHAPES[args.model] * layers:
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        weights.append((n, k, to_amx_bf16_layout((w.float() / 64).bfloat16()),
                        to_amx_int8_layout(w), torch.rand(n, generator=g) / 100,
                        weight_row_sums(w)))
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        libs = {v: build(v, Path(tmp)) for v in args.variants.split(",")}
        print(f"{args.model}, {threads} threads; ms per step (bf16 / int8 W8A8)\n")
        print("| tokens | " + " | ".join(libs) + " |\n|---:|" + "---:|" * len(libs))
        for m in map(int, args.tokens.split(",")):
            xb = {k: torch.randn(m, k, generator=g).bfloat16() for _, k in SHAPES[args.model]}
            xq = {k: torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
                  for _, k in SHAPES[args.model]}
            xs = torch.rand(m, generator=g)
            outs = {n: torch.empty(m, n, dtype=torch.bfloat16) for n, _ in SHAPES[args.model]}

            def bf16(lib):
                for n, k, wb, _, _, _ in weights:
                    lib.q_bf16_amx(xb[k].data_ptr(), wb.data_ptr(), None, outs[n].data_ptr(),
                                   m, n, k, threads)

            def int8(lib):
                for n, k, _, wq, ws, rs in weights:
                    lib.q_int8_amx(1, xq[k].data_ptr(), xs.data_ptr(), wq.data_ptr(),
                                   ws.data_ptr(), rs.data_ptr(), outs[n].data_ptr(), m, n, k,
                                   threads)

            times = {(v, op): [] for v in libs for op in ("bf16", "int8")}
            for rep in range(args.repeat + 1):  # the first pass warms up
                for v, lib in libs.items():
                    for op, fn in (("bf16", bf16), ("int8", int8)):
                        start = time.perf_counter()
                        fn(lib[op])
                        if rep:
                            times[v, op].append(time.perf_counter() - start)
            cells = [f"{statistics.median(times[v, 'bf16']) * 1e3:.1f} / "
                     f"{statistics.median(times[v, 'int8']) * 1e3:.1f}" for v in libs]
            print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    with torch.inference_mode():
        main()

"""A/B of the pass shape of the strip kernels' AVX-512 path (``amx_tiles.h``'s vector_loop,
CPUs without AMX tiles): tokens x strips per pass, each variant a build of the same sources
with ``-DQ_VEC_TOKENS=R -DQ_VEC_STRIPS=S`` (and any other of its macros after a ``+``:
``8x2+Q_VEC_LARGE_CHUNK_BYTES=524288`` is 8 x 2 with the token chunks of small weights for
large ones too), all timed interleaved in one process. ``8x2@REV`` builds the kernels of git
revision REV instead of the working tree's (their exported functions must take the same
arguments): ``--variants 8x2@HEAD~1,8x2`` times a change against the commit before it.

    python tests/bench/ab_vector_passes.py [--variants 8x1,8x2,6x4] [--tokens 8,32,256,2048]
        [--model smollm2|tinyllama] [--ops bf16,int8,wint8,wint4]

Weights of a whole model (bench_decode_gemms_cpu.py's shapes), each its own tensor, called
in model order so they stream from memory; ms per step, median of --repeat passes. --ops
picks the kernels: bf16 (``dense_gemm/amx_bf16.cpp``) and int8 W8A8
(``scaled_gemm/amx_int8.cpp``) by default, whose 1-4 tokens take register paths that the
pass shape does not touch; wint8 (``weight_only_gemm/amx_gemm.cpp``) and wint4 g64 without
zeros (``amx_int4.cpp``), whose register paths take up to 32 and 16 tokens and whose wider
steps widen each strip to bf16 for the same loop.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_decode_gemms_cpu import SHAPES
from q.kernels import cpp_build
from q.kernels.dense_gemm.cpp_impl import to_amx_bf16_layout
from q.kernels.scaled_gemm.cpp_impl import to_amx_int8_layout, weight_row_sums
from q.kernels.weight_only_gemm.cpp_impl import (
    to_amx_int4_layout,
    to_amx_int4_scales,
    to_amx_layout,
)

KERNELS = Path(cpp_build.__file__).parent
P, L, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


SOURCES = {"bf16": ("dense_gemm/amx_bf16.cpp", "q_bf16_amx", [P, P, P, P, L, L, L, I]),
           "int8": ("scaled_gemm/amx_int8.cpp", "q_int8_amx", [I, P, P, P, P, P, P, L, L, L, I]),
           "wint8": ("weight_only_gemm/amx_gemm.cpp", "q_wo_int8_amx", [P, P, P, P, L, L, L, I]),
           "wint4": ("weight_only_gemm/amx_int4.cpp", "q_wo_int4_amx",
                     [P, P, P, P, L, L, L, L, I, I])}
GROUP = 64  # wint4's group


def sources_at(rev: str, out: Path) -> Path:
    """The kernels/ folder of git revision `rev`, extracted under `out`."""
    tree = out / f"kernels-{rev.replace('/', '_')}"
    if not tree.exists():
        tree.mkdir()
        archive = subprocess.run(["git", "-C", str(KERNELS), "archive", rev, "."],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def build(variant: str, ops: list[str], out: Path) -> dict:
    variant_, _, rev = variant.partition("@")  # 8x2@HEAD~1: that commit's sources
    shape, *overrides = variant_.split("+")  # 8x2+Q_VEC_LARGE_WEIGHT=1: other macros too
    kernels = sources_at(rev, out) if rev else KERNELS
    r, s = shape.split("x")
    defines = [f"-DQ_VEC_TOKENS={r}", f"-DQ_VEC_STRIPS={s}", *(f"-D{o}" for o in overrides)]
    libs = {}
    for name in ops:
        src, symbol, argtypes = SOURCES[name]
        so = out / f"{name}-{variant.replace('/', '_')}.so"
        subprocess.run(["g++", *cpp_build.FLAGS, *defines,
                        str(kernels / src), "-o", str(so)], check=True)
        libs[name] = ctypes.CDLL(str(so))
        getattr(libs[name], symbol).argtypes = argtypes
    return libs


def weights_of(model: str, ops: list[str], g: torch.Generator) -> list[dict]:
    """A whole model's weights for each op, in the kernels' layouts."""
    layers = {"tinyllama": 22, "smollm2": 30}[model]
    weights = []
    for n, k in SHAPES[model] * layers:
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        layer = {"n": n, "k": k}
        if "bf16" in ops:
            layer["bf16"] = to_amx_bf16_layout((w.float() / 64).bfloat16())
        if "int8" in ops:
            layer["int8"] = (to_amx_int8_layout(w), torch.rand(n, generator=g) / 100,
                             weight_row_sums(w))
        if "wint8" in ops:
            layer["wint8"] = (to_amx_layout(w), torch.rand(n, generator=g) / 100 + 1e-3)
        if "wint4" in ops:
            codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
            scale = torch.rand(n, k // GROUP, generator=g) / 100 + 1e-3
            layer["wint4"] = (to_amx_int4_layout(codes), to_amx_int4_scales(scale, None))
        weights.append(layer)
    return weights


@dataclass
class Inputs:
    """One step's activations (bf16, and int8 codes with their scales) and outputs."""
    xb: dict
    xq: dict
    xs: torch.Tensor
    outs: dict
    m: int
    threads: int


def step(op: str, lib, weights: list[dict], a: Inputs) -> None:
    """One model step of `op`: every weight once, in model order."""
    for w in weights:
        n, k = w["n"], w["k"]
        out = a.outs[n].data_ptr()
        if op == "bf16":
            lib.q_bf16_amx(a.xb[k].data_ptr(), w["bf16"].data_ptr(), None, out, a.m, n, k,
                           a.threads)
        elif op == "int8":
            wq, ws, rs = w["int8"]
            lib.q_int8_amx(1, a.xq[k].data_ptr(), a.xs.data_ptr(), wq.data_ptr(), ws.data_ptr(),
                           rs.data_ptr(), out, a.m, n, k, a.threads)
        elif op == "wint8":
            codes, scale = w["wint8"]
            lib.q_wo_int8_amx(a.xb[k].data_ptr(), codes.data_ptr(), scale.data_ptr(), out, a.m,
                              n, k, a.threads)
        else:
            codes, sz = w["wint4"]
            lib.q_wo_int4_amx(a.xb[k].data_ptr(), codes.data_ptr(), sz.data_ptr(), out, a.m,
                              n, k, GROUP, 0, a.threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="8x1,8x2,6x4")
    ap.add_argument("--tokens", default="8,32,256,2048")
    ap.add_argument("--model", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ops", default="bf16,int8", help=f"of {','.join(SOURCES)}")
    args = ap.parse_args()
    if cpp_build.amx_tiles():
        raise SystemExit("this CPU has AMX tiles: its kernels do not run the vector path")
    ops = args.ops.split(",")
    if unknown := set(ops) - set(SOURCES):
        raise SystemExit(f"--ops: unknown {sorted(unknown)}; known: {', '.join(SOURCES)}")
    g = torch.Generator().manual_seed(0)
    weights = weights_of(args.model, ops, g)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        libs = {v: build(v, ops, Path(tmp)) for v in args.variants.split(",")}
        print(f"{args.model}, {threads} threads; ms per step ({' / '.join(ops)})\n")
        print("| tokens | " + " | ".join(libs) + " |\n|---:|" + "---:|" * len(libs))
        for m in map(int, args.tokens.split(",")):
            xb = {k: torch.randn(m, k, generator=g).bfloat16() for _, k in SHAPES[args.model]}
            xq = {k: torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
                  for _, k in SHAPES[args.model]}
            xs = torch.rand(m, generator=g)
            outs = {n: torch.empty(m, n, dtype=torch.bfloat16) for n, _ in SHAPES[args.model]}

            data = Inputs(xb, xq, xs, outs, m, threads)
            times = {(v, op): [] for v in libs for op in ops}
            for rep in range(args.repeat + 1):  # the first pass warms up
                for v, lib in libs.items():
                    for op in ops:
                        start = time.perf_counter()
                        step(op, lib[op], weights, data)
                        if rep:
                            times[v, op].append(time.perf_counter() - start)
            cells = [" / ".join(f"{statistics.median(times[v, op]) * 1e3:.1f}" for op in ops)
                     for v in libs]
            print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    with torch.inference_mode():
        main()

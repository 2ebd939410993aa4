"""Measure torch's CPU kernels per op and M, and write the crossovers to kernels/configs/cpu.json.

For each op the engine runs on torch's built-in CPU kernels with more than one candidate:

- ``weight_only_int8``: ``int8pack`` (``_weight_int8pack_mm``) or ``dequantize`` (bf16 weight
  for the call, bf16 GEMM);
- ``weight_only_int4``: ``int4pack`` (``_weight_int4pack_mm_for_cpu``, group 64) or
  ``dequantize``;
- ``scaled_int8`` (W8A8): ``gemv`` (q's C++ GEMV, ``scaled_gemm/int8_gemm.cpp``), ``int8pack``
  (activation codes as bf16) or ``int_mm`` (``_int_mm``);
- ``dense_bf16`` (unquantized Linears, fp8 weights dequantized at load): ``linear``
  (``F.linear`` on the plain bf16 weight) or ``prepacked`` (oneDNN's blocked layout, made
  once: ``q.kernels.dense_gemm.torch_impl.PackedLinear``). The engine keeps one copy of a
  weight, so it prepacks when this table picks ``prepacked`` at M = 1 (decode),

every candidate is first checked against the fp32 reference op on each shape (relative
error printed; a candidate off by more than 1% is dropped), then timed (median of
``--repeat`` calls after warm-up, fresh activations, the weights of SmolLM2-135M's and a
1.1B Llama's layers). A buffer of twice the last-level cache (at least 64 MiB) is read
between timed calls, outside the timing: in a decode step of a model larger than the cache
each weight comes from memory, not from a cache that the same call warmed a moment earlier
(every weight here fits any L3 of 32 MiB or more). Read, not written: the dirty lines a
write leaves were written back during the next timed call and slowed every kernel (up to
5.7x for q's W8A8 GEMV at M = 1 in the run that found it, docs/benchmarks.md). Per M the candidate with the
least total time over the shapes wins; the winners become ``[[largest M, kernel], ..., [null, kernel]]``
buckets, written under this CPU's class (``q.kernels.configs.cpu_class``: with AMX the
winners differ in kind) and leaving other classes' tables as they are. Timing runs in this
process with torch's default threads (all cores), as the engine does.

    python tests/bench/tune_kernels_cpu.py            # measure, print, write cpu.json
    python tests/bench/tune_kernels_cpu.py --dry-run  # measure and print only
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from q.kernels.scaled_gemm.reference import scaled_gemm
from q.kernels.scaled_gemm.torch_impl import Int8Scaled
from q.kernels.act_quant.reference import quantize_activation
from q.kernels.configs import cpu_class
from q.kernels.dense_gemm.reference import dense_gemm
from q.kernels.dense_gemm.torch_impl import PackedLinear
from q.kernels.packing.reference import pack_int4_bytes
from q.kernels.weight_only_gemm.reference import weight_only_gemm
from q.kernels.weight_only_gemm.torch_impl import WeightOnlyTorch

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "kernels" / "configs" / "cpu.json"
SHAPES = [(1536, 576), (576, 1536), (5632, 2048), (2048, 5632), (2048, 2048)]  # (N, K)
MS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _Dense:
    kernels = ("linear", "prepacked")

    def __init__(self, w: torch.Tensor):
        self.w, self.packed = w, PackedLinear(w, amx=False)  # oneDNN: the AMX kernel has no rival

    def run(self, x, kernel: str):
        return torch.nn.functional.linear(x, self.w) if kernel == "linear" else self.packed(x)


def make_op(op: str, n: int, k: int):
    """(torch implementation, fp32 reference function of x)."""
    g = torch.Generator().manual_seed(n * 7 + k)
    if op == "dense_bf16":
        w = torch.randn(n, k, generator=g).bfloat16()
        return _Dense(w), lambda x: dense_gemm(x, w)
    if op == "scaled_int8":
        wq = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        ws = torch.rand(n, 1, generator=g) / 100 + 1e-3
        ws = ws.bfloat16().float()  # checkpoints store bf16 scales
        impl = Int8Scaled(wq, ws, torch.bfloat16)

        def ref(x):
            xq, xs = quantize_activation(x.float(), None, torch.int8)
            return scaled_gemm(xq, xs, wq, ws, torch.float32)
        return impl, ref
    bits = 8 if op == "weight_only_int8" else 4
    group = k if bits == 8 else 64
    lo, hi = (-127, 128) if bits == 8 else (-8, 8)
    codes = torch.randint(lo, hi, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, k // group, generator=g) / 100 + 1e-3).bfloat16().float()
    impl = WeightOnlyTorch(codes, scale, group, bits)
    packed = pack_int4_bytes(codes) if bits == 4 else codes

    def ref(x):
        return weight_only_gemm(x.float(), packed, scale, group, bits)
    return impl, ref


def last_level_cache_bytes() -> int:
    sizes = [0]
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes)


EVICT = torch.empty(max(64 * 2**20, 2 * last_level_cache_bytes()) // 4)


def timed(fn, xs, repeat: int) -> float:
    for x in xs[:2]:
        fn(x)
    times = []
    for i in range(repeat):
        # the weight leaves the caches, as between a model's layers: read, not written (a
        # write leaves that many dirty lines, whose write-back ran during the timed call)
        EVICT.sum()
        t0 = time.perf_counter()
        fn(xs[i % len(xs)])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(op: str, repeat: int) -> dict[int, dict[str, float]]:
    """seconds[m][kernel], summed over SHAPES."""
    totals: dict[int, dict[str, float]] = {m: {} for m in MS}
    for n, k in SHAPES:
        impl, ref = make_op(op, n, k)
        for m in MS:
            xs = [torch.randn(m, k).bfloat16() for _ in range(4)]
            want = ref(xs[0])
            for kernel in impl.kernels:
                got = impl.run(xs[0], kernel).float()
                err = ((got - want).norm() / want.norm()).item()
                if err > 1e-2:
                    print(f"  {op} {kernel} N={n} K={k} M={m}: relative error {err:.2e}, "
                          "dropped")
                    totals[m][kernel] = float("inf")
                    continue
                s = timed(lambda x, kn=kernel: impl.run(x, kn), xs, repeat)
                totals[m][kernel] = totals[m].get(kernel, 0.0) + s
    return totals


def buckets(totals: dict[int, dict[str, float]]) -> list:
    winners = [(m, min(t, key=t.get)) for m, t in sorted(totals.items())]
    out = []
    for (m, kernel), nxt in zip(winners, winners[1:] + [(None, None)]):
        if nxt[1] != kernel:
            out.append([m if nxt[0] is not None else None, kernel])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--ops", default="weight_only_int8,weight_only_int4,scaled_int8,dense_bf16")
    ap.add_argument("--dry-run", action="store_true", help="do not write cpu.json")
    args = ap.parse_args()
    config = json.loads(CONFIG.read_text()) if CONFIG.exists() else {}
    table = config.setdefault(cpu_class(), {})
    print(f"{cpu_name()} (class {cpu_class()}), {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{EVICT.numel() * 4 >> 20} MiB read between timed calls")
    for op in args.ops.split(","):
        only = make_op(op, *SHAPES[0])[0].kernels
        if len(only) == 1:  # e.g. the AMX kernels: no table to choose from on this CPU
            print(f"\n{op}: one kernel here ({only[0]}), nothing to tune; table left as is")
            continue
        totals = measure(op, args.repeat)
        kernels = list(next(iter(totals.values())))
        print(f"\n{op}: ms per call, summed over {len(SHAPES)} shapes (N x K: "
              f"{', '.join(f'{n}x{k}' for n, k in SHAPES)})\n")
        print("| M | " + " | ".join(kernels) + " | winner |")
        print("|---:|" + "---:|" * len(kernels) + "---|")
        for m, t in sorted(totals.items()):
            print(f"| {m} | " + " | ".join(f"{t[kn] * 1e3:.2f}" for kn in kernels)
                  + f" | {min(t, key=t.get)} |")
        table[op] = buckets(totals)
        print(f"-> {table[op]}")
    table["_note"] = (f"Measured by tests/bench/tune_kernels_cpu.py on {cpu_name()}, "
                      f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
                      f"{datetime.date.today()}.")
    config["_note"] = ("Per CPU class (q.kernels.configs.cpu_class), as measured by "
                       "tests/bench/tune_kernels_cpu.py on a CPU of that class. Buckets: "
                       "[largest M, kernel], null = any M.")
    if not args.dry_run:
        CONFIG.write_text(format_config(config))
        print(f"\nwrote the {cpu_class()} table of {CONFIG.relative_to(ROOT)}")


def format_config(config: dict) -> str:
    """cpu.json with one line per op: notes first, then classes and ops sorted."""
    def block(d: dict, indent: str) -> str:
        keys = sorted(d, key=lambda k: (k != "_note", k))
        lines = [f"{indent}{json.dumps(k)}: " + (block(d[k], indent + " ")
                 if isinstance(d[k], dict) else json.dumps(d[k])) for k in keys]
        return "{\n" + ",\n".join(lines) + "\n" + indent[:-1] + "}"
    return block(config, " ") + "\n"


if __name__ == "__main__":
    main()

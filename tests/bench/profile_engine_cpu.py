"""Where a decode step of the native engine spends its time on CPU: torch's profiler over
10 decode steps, the top ops by self CPU time.

    python tests/bench/profile_engine_cpu.py --requests 1      # SmolLM2 (the default model)
    python tests/bench/profile_engine_cpu.py --requests 32 --model CKPT

Prompts are 256 tokens; the first 10 steps (prefill, then decode) run unprofiled. The
step time printed includes the profiler's overhead.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import profile

import q
from q.generation import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: embedded SmolLM2)")
    ap.add_argument("--requests", type=int, default=1)
    ap.add_argument("--rows", type=int, default=22)
    args = ap.parse_args()
    session = q.load_engine(args.model or q.default_model())
    for i in range(args.requests):
        session.add_request(list(range(100 + i, 356 + i)),
                            SamplingParams(max_tokens=40, ignore_eos=True))
    for _ in range(10):
        session.step()
    with profile() as prof:
        start = time.perf_counter()
        for _ in range(10):
            session.step()
        elapsed = time.perf_counter() - start
    print(f"{args.requests} requests: {elapsed / 10 * 1e3:.1f} ms per decode step (profiled)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    with torch.inference_mode():
        main()
